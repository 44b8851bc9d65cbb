"""Migrate one entity of one sistema: stream, transform (§6), write, account for every row.

The source is read in legacy-id order through a server-side cursor, one batch at a time, so
memory depends on the batch size, never on the table. Every batch is one transaction on the
target: deletions, a COPY-staged upsert, the ledger (with the overwritten version), the
quarantine and a checkpoint. A killed run leaves the last committed checkpoint; the next run
with the same parameters resumes after it, and upserts keyed by (sistema, legacy_id) make a
replayed batch harmless.

In a *full* run each batch also owns the legacy-id range since the previous batch, so target
rows whose source is gone, soft-deleted or now quarantined are deleted as the run passes them.
"""

from __future__ import annotations

import resource
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import polars as pl
from sqlalchemy import Connection, Engine, Table, and_, delete, func, not_, or_, select
from sqlalchemy.exc import DBAPIError

from worker import batch, locks, rules, schema, store
from worker.params import RunParameters
from worker.runbook import RunBook, utcnow
from worker.source import COLUMNS, LegacyReader, latest_update

KEY = ("sistema", "legacy_id")
TARGET_COLUMNS = {
    "patients": [*batch.PATIENT_FIELDS, batch.HASH],
    "encounters": [*batch.ENCOUNTER_FIELDS, batch.HASH],
}
QUARANTINE_TYPES = {"legacy_id": pl.Int64, "reason": pl.String, "detail": pl.String}
LEDGER_TYPES = {
    "entity": pl.String, "partition_key": pl.String, "legacy_id": pl.Int64, "target_id": pl.String,
    "action": pl.String, "content_hash": pl.String, "previous": pl.String, "run_id": pl.String,
    "at": pl.Datetime("us", "UTC"),
}  # fmt: skip
LOWEST = -(2**62)
HIGHEST = 2**62
ANALYZE_FIRST = 10_000
QUIET_CHECKPOINT_SECONDS = 2.0
GUARD_IDS = 200_000  # target ids the mass-delete guard compares at a time
LOOKUP_COLUMNS = {"patients": ("sistema", "legacy_id", "national_id"), "encounters": ("sistema", "legacy_id")}
DUPLICATE_DETAIL = "a lower legacy id of the sistema holds the same document"
SOURCES: dict[str, Table] = schema.SOURCES
# Entities whose batches read and write only target rows of their own scope (a range, or the ids read):
# one batch's writes, not committed yet, change nothing another batch decides.
BATCHES_INDEPENDENT = frozenset({"encounters"})
# Entities whose batches also decide against rows outside their scope (DUPLICATE_DOCUMENT: the holders of
# their documents, whom they may evict): written beside the batch before when that one's effects stay in
# its own range, the documents it will hold handed over (Migration._land_beside).
BATCHES_HANDED_OVER = frozenset({"patients"})
WRITERS = 2  # batches of such an entity written at once (Migration._land_beside)
WRITER_LOCK_TIMEOUT_S = 60


@dataclass
class Counts:
    read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    rehashed: int = 0  # unchanged records whose stored hash was brought up to date (counted in unchanged)
    quarantined: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "inserted": self.inserted,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "rehashed": self.rehashed,
            "quarantined": dict(sorted(self.quarantined.items())),
        }

    def add(self, other: Counts) -> None:
        for name in ("read", "inserted", "updated", "unchanged", "deleted", "rehashed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.quarantined.update(other.quarantined)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Counts:
        return cls(**{**data, "quarantined": Counter(data.get("quarantined", {}))})

    @property
    def migrated(self) -> int:
        return self.inserted + self.updated + self.unchanged


@dataclass
class Outcome:
    """What a batch did besides its target writes: what the control DB must record."""

    quarantined: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=QUARANTINE_TYPES))
    evicted: list[int] = field(default_factory=list)  # target ids of holders that lost their document
    evicted_legacy: list[int] = field(default_factory=list)
    ledger: pl.DataFrame | None = None
    at: datetime | None = None


@dataclass
class Handoff:
    """What a patients batch written beside the next one (:meth:`Migration._land_beside`) tells it."""

    # Once decided: what the next batch must count (``Before``), or None when its effects reach beyond its
    # scope (it evicts holders outside it): the next batch is then decided on it committed.
    decided: Future[Before | None] = field(default_factory=Future)
    redone: bool = False  # decided again (a value the target refused): the next batch's decision may be stale


@dataclass(frozen=True)
class Before:
    """The batch before, decided and not committed yet, as a batch written beside it must see it: the
    documents it will hold (``legacy_id``, ``national_id``), and the legacy ids whose target rows it
    rewrites or deletes (what those rows hold now is not theirs once it commits)."""

    held: pl.DataFrame
    released: pl.Series


@dataclass
class Beside:
    """A batch's part in the handoff: its own, to publish, and the batch before it, not committed yet
    (None: that batch is committed)."""

    own: Handoff
    before: Before | None


@dataclass
class Result:
    counts: Counts
    mode: str
    resumed_from: str | None
    watermark: datetime | None
    seconds: float
    read_this_run: int  # rows read by this run alone (a resumed run's counts include its predecessor's)

    def metadata(self, entity: str, partition: Mapping[str, str], dry_run: bool) -> dict[str, Any]:
        """The run's materialization metadata, the same keys for every entity (``partition``: e.g.
        ``{"sistema": "HSJ"}`` or ``{"shard": "shard-03"}``)."""
        counts = self.counts
        quarantined = dict(sorted(counts.quarantined.items()))
        return {
            "entity": entity,
            **partition,
            "mode": self.mode,
            "dry_run": dry_run,
            "rows_read": counts.read,
            "inserted": counts.inserted,
            "updated": counts.updated,
            "unchanged": counts.unchanged,
            "deleted": counts.deleted,
            "rehashed": counts.rehashed,
            "migrated": counts.migrated,
            "quarantined": sum(quarantined.values()),
            "quarantined_by_reason": {"raw_value": quarantined, "type": "json"},
            **{f"quarantined_{reason}": count for reason, count in quarantined.items()},
            "resumed_from_run": self.resumed_from or "",
            "duration_s": round(self.seconds, 3),
            "rows_per_s": round(self.read_this_run / self.seconds, 1) if self.seconds > 0 else 0.0,
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


class MassDeleteRefused(RuntimeError):
    """A full run would delete more of the partition than the run allows (DESIGN §5, Modes)."""


class TargetRefused(Exception):
    """The target refused a value of one of ``writes`` (the batch is redone without that record)."""

    def __init__(self, writes: pl.DataFrame) -> None:
        super().__init__("the target refused a value")
        self.writes = writes


class Migration:
    """One run of one entity over one sistema."""

    def __init__(
        self,
        params: RunParameters,
        legacy: Engine,
        target: Engine,
        state: Engine | None = None,
        *,
        today: date | None = None,
        log: Callable[[str], None] = lambda _: None,
        progress: Callable[[Counts], None] = lambda _: None,
        lock_wait_seconds: float = 120.0,
    ) -> None:
        self.params = params
        self.legacy = legacy
        self.target = target
        self.state = state if state is not None else target
        self.same_db = self.state is target  # then each batch's data and bookkeeping commit together
        self.today = today or date.today()
        self.log = log
        self.progress = progress
        self.lock_wait_seconds = lock_wait_seconds
        self.source = SOURCES[params.entity]
        self.table = schema.TARGETS[params.entity]
        self.delete_budget: int | None = None  # deletions this full run may make; None: unlimited (or not yet known)
        self._guarding: Future[None] | None = None  # the mass-delete guard's verdict, while it runs beside the run
        self._eligible: Future[int | None] | None = None  # E, counted beside the run (:attr:`counts_eligible`)
        self._deletions: tuple[Counts, int] = (Counts(), 0)  # the run's counts, and their deletions before it
        self.book = RunBook(
            entity=params.entity,
            partition_key=params.sistema,
            run_id=params.run_id,
            usuario=params.usuario,
            mode=params.mode,
            dry_run=params.dry_run,
            parameters={"mode": params.mode, "pract_source": params.pract_source, "pract_target": params.pract_target},
            extra={"allow_mass_delete": params.allow_mass_delete},
            log=log,
        )

    # --- the run -------------------------------------------------------------------------

    def run(self) -> Result:
        started = time.monotonic()
        schema.create_schemas(self.target, schema.target_metadata, log=self.log)
        schema.create_schemas(self.state, schema.state_metadata, log=self.log)
        p = self.params
        with ExitStack() as stack:
            target = stack.enter_context(self.target.connect())
            state = target if self.same_db else stack.enter_context(self.state.connect())
            # One writer per entity and sistema: the lock is held by every connection this run
            # writes through, and nothing of the run's state is read or written before it is.
            for conn in dict.fromkeys((state, target)):
                stack.enter_context(locks.exclusive(conn, p.entity, p.sistema, self.lock_wait_seconds))
            source = stack.enter_context(self.legacy.connect())
            store.prefer_index_lookups(target)
            self.book.close_interrupted_runs(state)
            checkpoint = None if p.dry_run else self.book.resumable_checkpoint(state)
            since = self.book.last_watermark(state) if p.mode == "incremental" else None
            mode = "incremental" if since is not None else "full"
            if p.mode == "incremental" and since is None:
                self.log("no earlier successful run: this incremental run sweeps the whole sistema")
            counts = Counts.from_dict(checkpoint["counts"]) if checkpoint else Counts()
            watermark = checkpoint["watermark"] if checkpoint else self._source_watermark(source)
            after = checkpoint["last_legacy_id"] if checkpoint else LOWEST
            resumed_from = checkpoint["run_id"] if checkpoint else None
            if resumed_from:
                self.log(f"resuming after legacy id {after}, checkpointed by run {resumed_from}")
            read_before = counts.read
            self.book.record_start(state, mode, resumed_from)
            try:
                if mode == "full":
                    self._guard_beside(stack, source, target, after)
                self._migrate(source, target, state, mode, since, after, counts, watermark)
                if p.dry_run:
                    target.rollback()
                    state.rollback()
            except BaseException:
                self.book.record_end(state, "failed", counts.as_dict(), None, self.state.begin)
                raise
            self.book.record_end(state, "succeeded", counts.as_dict(), watermark, self.state.begin)
        return Result(counts, mode, resumed_from, watermark, time.monotonic() - started, counts.read - read_before)

    def _guard_beside(self, stack: ExitStack, source: Connection, target: Connection, after: int) -> None:
        """The mass-delete guard (:meth:`_guard_mass_delete`), on PostgreSQL on a thread and connections of
        its own while the run reads and decides its first batches: its verdict is awaited before the run
        commits anything (:meth:`_await_guard`), so a refused run still leaves nothing behind. It reads
        every id of the partition on both sides: 0.3–0.5 s of a 3.5 s unchanged re-run of 480k rows,
        which the run no longer waits for. Elsewhere (SQLite, the demo's) in line, on the run's connections.

        Then, on the same thread, the partition's eligible rows (E, :attr:`counts_eligible`): from the
        source ids the guard read, when it read them all, else counted. A second count of the source beside
        the guard cost an unchanged re-run 0.10–0.12 s of its 3.3–4.9 s (six alternating rounds)."""
        if self.target.dialect.name != "postgresql":
            self._guard_mass_delete(source, target, after)
            return
        verdict: Future[None] = Future()
        eligible: Future[int | None] = Future()

        def guard() -> None:
            try:
                with self.target.connect() as own_target, self.legacy.connect() as own_source:
                    seen = self._guard_mass_delete(own_source, own_target, after)
            except BaseException as problem:
                verdict.set_exception(problem)
                eligible.set_exception(problem)
                return
            verdict.set_result(None)
            try:
                if seen is None and self.counts_eligible:
                    from worker.counts import count_eligible

                    seen = count_eligible(self.params.entity, self.params.sistema, self.legacy)
                eligible.set_result(seen)
            except BaseException as problem:
                eligible.set_exception(problem)

        beside = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="mass-delete-guard"))
        beside.submit(guard)
        self._guarding, self._eligible = verdict, eligible

    @property
    def counts_eligible(self) -> bool:
        """Whether :meth:`run` counts the partition's eligible rows itself (:meth:`eligible`): a full run on
        PostgreSQL that writes (not a dry run). Others leave E to the caller."""
        p = self.params
        return p.mode == "full" and not p.dry_run and self.target.dialect.name == "postgresql"

    def eligible(self) -> int:
        """E as this run counted it (:attr:`counts_eligible`), once :meth:`run` has returned."""
        if self._eligible is None:
            raise RuntimeError("this run counted no eligible rows")
        return int(self._eligible.result() or 0)

    def _await_guard(self) -> None:
        """The guard's verdict, once: raises :class:`MassDeleteRefused` (or what the guard met) before the
        run's first commit; then the deletions made meanwhile, unchecked until the budget was known, are
        held to it."""
        if self._guarding is None:
            return
        guarding, self._guarding = self._guarding, None
        guarding.result()
        counts, before = self._deletions
        self._refuse_mass_delete(counts.deleted - before)

    def _guard_mass_delete(self, source: Connection, target: Connection, after: int) -> int | None:
        """Stop a full run that would delete more than ``max_delete_share`` of the partition's
        migrated rows, before it deletes anything: an empty or wrong source must never empty a target.
        Returns the partition's eligible source rows when it read all their ids (a run from the start of
        a partition that has migrated rows, without ``allow_mass_delete``), else None.

        Rows whose source is gone or soft-deleted are counted exactly up front, ``GUARD_IDS`` target ids
        at a time against the source's eligible ids of the same range (memory: a range's ids, not the
        partition's; all of a 1.92M-row partition's ids at once raised an unchanged re-run's peak RSS
        to 320 MB). Rows deleted because they are now quarantined only show as the run reads them:
        they count against the same budget, and the batch that would exceed it is rolled back.
        """
        p = self.params
        if p.allow_mass_delete:
            return None
        t = self.table
        migrated = target.scalar(select(func.count()).select_from(t).where(t.c.sistema == p.sistema)) or 0
        self.delete_budget = int(migrated * p.max_delete_share)
        if migrated == 0:
            return None
        reader = LegacyReader(self.legacy, p.entity, p.sistema, p.batch_size)
        gone, seen, lo = 0, 0, after
        while True:
            ours = store.frame_of(
                target,
                select(t.c.legacy_id)
                .where(t.c.sistema == p.sistema, t.c.legacy_id > lo)
                .order_by(t.c.legacy_id)
                .limit(GUARD_IDS),
                {"legacy_id": pl.Int64},
            )["legacy_id"]
            if ours.len() == 0:
                break
            hi = int(ours.max())  # type: ignore[arg-type]
            theirs = reader.eligible_ids(lo, source, upto=hi)["id"]
            gone += ours.filter(~ours.is_in(theirs.implode())).len()
            seen += theirs.len()
            lo = hi
            if ours.len() < GUARD_IDS:
                break
        counted = seen + reader.eligible_count(lo, source) if after == LOWEST else None  # those past the target's
        source.rollback()
        target.rollback()
        self._refuse_mass_delete(gone, migrated)
        return counted

    def _refuse_mass_delete(self, deleting: int, migrated: int | None = None) -> None:
        if self.delete_budget is None or deleting <= self.delete_budget:
            return
        p = self.params
        share = f"{p.max_delete_share:.0%}"
        raise MassDeleteRefused(
            f"a full run would delete {deleting} {p.entity} of sistema {p.sistema}"
            + (f" ({deleting / migrated:.1%} of {migrated} migrated)" if migrated else "")
            + f", more than the {share} a run may delete: stopped before deleting. Check LEGACY_DB_URL "
            "and the source; if the deletions are meant, run again with allow_mass_delete: true"
        )

    def _migrate(
        self,
        source: Connection,
        target: Connection,
        state: Connection,
        mode: str,
        since: datetime | None,
        after: int,
        counts: Counts,
        watermark: datetime | None,
    ) -> None:
        read_before = counts.read
        deleted_before = counts.deleted
        self._deletions = (counts, deleted_before)
        last_report = checkpointed = time.monotonic()
        lo = after
        next_analyze = ANALYZE_FIRST
        analyzed_at = self._writes(counts)
        p = self.params
        beside = self._lands_beside()
        reader = LegacyReader(self.legacy, p.entity, p.sistema, p.batch_size, writers=WRITERS if beside else 1)
        with ExitStack() as helpers:
            # The §6 rules run on the reader thread, for the next page while this one is written
            # (polars and the drivers release the GIL). The patients' need nothing of the target;
            # the encounters' read the patients' ids through a connection of that thread alone.
            prepare: Callable[[pl.DataFrame], pl.DataFrame] | None = None
            if self.params.entity == "patients":
                prepare = self._rules_of_page
            elif self.target.dialect.name == "postgresql":
                lookups = helpers.enter_context(self.target.connect())
                store.prefer_index_lookups(lookups)
                prepare = lambda rows: self._rules_of_page(rows, lookups)  # noqa: E731
            # Closed before the look-up connection, even when a batch fails: the reader thread
            # is done with it by then.
            quiet = threading.Event()  # the last batch changed nothing: longer pages (LegacyReader.pages)
            pages = helpers.enter_context(closing(reader.pages(after, since, prepare, quiet)))

            def settle(conn: Connection, conn_state: Connection, hi: int, done: Counts, wrote: bool) -> bool:
                """Count a written batch into the run, then checkpoint and commit it through ``conn`` (every
                few seconds when it wrote nothing). Returns whether it committed."""
                nonlocal checkpointed, next_analyze, analyzed_at, last_report
                counts.add(done)
                if wrote:
                    quiet.clear()
                else:
                    quiet.set()
                self._refuse_mass_delete(counts.deleted - deleted_before)
                committed = False
                # A batch that wrote nothing (a re-run's) is checkpointed every few seconds, not
                # every time: a run resumed from an earlier checkpoint redoes only unchanged batches.
                if wrote or time.monotonic() - checkpointed >= QUIET_CHECKPOINT_SECONDS:
                    self.book.checkpoint(conn_state, hi, counts.as_dict(), watermark, "running")
                    if conn is not target:  # the lock is held by the run's own connection, idle meanwhile
                        locks.require_held(target, self.params.entity, self.params.sistema)
                        target.rollback()
                    self._commit(conn, conn_state)
                    checkpointed = time.monotonic()
                    committed = True
                if counts.read - read_before >= next_analyze:  # at 10k, 20k, 40k … rows, until one wrote
                    next_analyze *= 2
                    if self._writes(counts) != analyzed_at:  # statistics only go stale by writes
                        self._analyze(conn, conn_state)
                        analyzed_at = self._writes(counts)
                        # Once: what the look-ups need of the statistics stays true as the table grows (the
                        # looked-up columns are unique; sizes come from the table's pages, ranges past
                        # the histogram's end from the index). The run's end analyzes again.
                        next_analyze = HIGHEST
                if time.monotonic() - last_report >= 5:
                    self.progress(counts)
                    last_report = time.monotonic()
                return committed

            if not beside:
                for rows, ruled in pages:
                    hi = int(rows["id"][-1])
                    done = Counts()
                    wrote = self._apply_batch(target, state, rows, mode, lo, hi, done, ruled)
                    settle(target, state, hi, done, wrote)
                    lo = hi
            else:
                lo = self._land_beside(helpers, pages, mode, lo, settle)
        if mode == "full":  # the tail: target rows past the last eligible source row
            nothing = pl.DataFrame(schema=COLUMNS[self.params.entity].schema())
            self._apply_batch(target, state, nothing, mode, lo, HIGHEST, counts)
            self._refuse_mass_delete(counts.deleted - deleted_before)
        self.book.checkpoint(state, lo, counts.as_dict(), watermark, "done")
        self._commit(target, state)
        written = self._writes(counts) - analyzed_at
        # The next entity looks this one up; an incremental run's few changes leave the statistics
        # as good as they were (its ANALYZE would cost more than the run).
        if written and (mode == "full" or written >= ANALYZE_FIRST):
            self._analyze(target, state)
        self.progress(counts)

    def _lands_beside(self) -> bool:
        """Whether batches are written WRITERS at a time (:meth:`_land_beside`): an entity whose batches
        are independent or handed over (BATCHES_INDEPENDENT, BATCHES_HANDED_OVER), written to PostgreSQL
        with its control tables, for real."""
        p = self.params
        return (
            p.entity in BATCHES_INDEPENDENT | BATCHES_HANDED_OVER
            and self.target.dialect.name == "postgresql"
            and self.same_db
            and not p.dry_run
        )

    def _land_beside(
        self,
        helpers: ExitStack,
        pages: Iterator[tuple[pl.DataFrame, pl.DataFrame | None]],
        mode: str,
        lo: int,
        settle: Callable[[Connection, Connection, int, Counts, bool], bool],
    ) -> int:
        """Write the pages' batches WRITERS at a time, each on a thread and connection of its own, and
        commit them one at a time in legacy-id order: a batch is counted, checkpointed and committed
        only once the batch before it is, so a failure — or a kill — leaves the same prefix of batches
        committed as one writer would. What a batch is decided on must not depend on the batch before
        it, not committed yet: an independent batch's reads and writes stay in its own scope; a patients
        batch waits for the decision of the one before (its :class:`Handoff`) and counts the documents
        that batch will hold among their holders, in place of what the rows it rewrites or deletes hold
        now — or, when that batch evicts holders beyond its scope, waits for its commit — and is decided
        again, on it committed, if that batch was decided again. Two
        PostgreSQL backends then share a first run's writes, which one backend could not keep up
        with (its index and COPY work was the run's critical path). Returns the last batch's end."""
        local = threading.local()
        opened: list[Connection] = []

        def connection() -> Connection:
            conn: Connection | None = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = self.target.connect()
                opened.append(conn)
                store.prefer_index_lookups(conn)
                # The writers never wait for each other's rows by design; should they ever, PostgreSQL cannot
                # see the cycle (one side waits here, in Python): fail the run rather than hang.
                conn.exec_driver_sql(f"SET lock_timeout = '{WRITER_LOCK_TIMEOUT_S}s'")
                conn.commit()
            return conn

        handing = self.params.entity in BATCHES_HANDED_OVER

        def land(
            rows: pl.DataFrame,
            ruled: pl.DataFrame | None,
            lo: int,
            hi: int,
            before: Future[None] | None,
            handed: Handoff | None,
            own: Handoff | None,
        ) -> None:
            conn = connection()
            done = Counts()
            try:
                decided_before = None
                if handed is not None and before is not None:
                    decided_before = handed.decided.result()  # the batch before decided (or failed)
                    if decided_before is None:  # it evicts holders beyond its scope: decide on it committed
                        before.result()
                beside = Beside(own, decided_before) if own is not None else None
                wrote = self._apply_batch(conn, conn, rows, mode, lo, hi, done, ruled, beside)
                if before is not None:
                    before.result()  # the batch before committed; its failure is this batch's too
                if handed is not None and handed.redone and decided_before is not None and own is not None:
                    # decided on documents the batch before then gave up: decide again on it committed
                    conn.rollback()
                    own.redone = True
                    done = Counts()
                    wrote = self._apply_batch(conn, conn, rows, mode, lo, hi, done, ruled, Beside(own, None))
                if not settle(conn, conn, hi, done, wrote):
                    conn.rollback()  # it wrote nothing: end its snapshot
            except BaseException as problem:
                conn.rollback()
                if own is not None and not own.decided.done():
                    own.decided.set_exception(problem)
                raise

        helpers.callback(lambda: [conn.close() for conn in opened])  # once the writers are done
        writers = helpers.enter_context(ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="batch-writer"))
        landing: deque[Future[None]] = deque()
        handoff: Handoff | None = None
        for rows, ruled in pages:
            while len(landing) >= WRITERS:
                landing.popleft().result()
            hi = int(rows["id"][-1])
            own = Handoff() if handing else None
            before = landing[-1] if landing else None
            landing.append(writers.submit(land, rows, ruled, lo, hi, before, handoff, own))
            handoff = own
            lo = hi
        while landing:
            landing.popleft().result()
        return lo

    @staticmethod
    def _writes(counts: Counts) -> int:
        return counts.inserted + counts.updated + counts.deleted

    def _analyze(self, target: Connection, state: Connection) -> None:
        """Statistics of the columns the worker looks rows up by (the tables' sizes come with them)."""
        store.analyze(target, self.table, LOOKUP_COLUMNS[self.params.entity])
        # Cleared by range each batch; the ledger is only appended to.
        store.analyze(state, schema.quarantine, ("entity", "partition_key", "legacy_id"))
        self._commit(target, state)

    def _commit(self, target: Connection, state: Connection) -> None:
        self._await_guard()
        if self.params.dry_run:
            return
        target.commit()
        if state is not target:
            state.commit()

    # --- source --------------------------------------------------------------------------

    def _source_watermark(self, source: Connection) -> datetime | None:
        latest = latest_update(source, self.source, self.params.sistema)
        source.rollback()
        return rules.coerce_datetime(latest)

    # --- one batch -----------------------------------------------------------------------

    def _apply_batch(
        self,
        target: Connection,
        state: Connection,
        rows: pl.DataFrame,
        mode: str,
        lo: int,
        hi: int,
        counts: Counts,
        ruled: pl.DataFrame | None = None,
        beside: Beside | None = None,
    ) -> bool:
        """Apply one batch; a record whose value the target refuses is quarantined (INVALID_VALUE)
        and the batch is decided again without it, so no single row can fail a batch. ``ruled``:
        the §6 rules of the batch's rows if already applied (:meth:`_rules_of_page`); ``beside``: its
        part in a handoff (:class:`Beside`). Returns whether it wrote anything (target, ledger or
        quarantine)."""
        refused: dict[int, str] = {}
        while True:
            attempt = Counts()
            try:
                with store.savepoint(target):
                    outcome = self._apply_batch_once(target, rows, mode, lo, hi, attempt, refused, ruled, beside)
            except TargetRefused as problem:
                if beside is not None:
                    beside.own.redone = True
                found = store.refused_rows(target, self.table, KEY, problem.writes.to_dicts())
                if not found:
                    raise RuntimeError("the target refused a batch, but no single record of it") from None
                for index, column in found.items():
                    detail = f"the target cannot hold the value of {column}" if column else "the target refused a value"
                    refused[int(problem.writes["legacy_id"][index])] = detail
                continue
            break
        counts.add(attempt)
        wrote_state = self._write_state(state, outcome, mode, lo, hi, rows["id"])
        return wrote_state or self._writes(attempt) + attempt.rehashed > 0

    def _rules_of_page(self, rows: pl.DataFrame, lookups: Connection | None = None) -> pl.DataFrame:
        """§6 for a page read (on the reader thread): see :func:`rules_of_page`."""
        p = self.params
        return rules_of_page(p.entity, p.sistema, rows, today=self.today, mapping=p.mapping, lookups=lookups)

    def _transform(self, target: Connection | None, eligible: pl.DataFrame) -> pl.DataFrame:
        """§6 for the batch: see :func:`transform`."""
        p = self.params
        return transform(p.entity, p.sistema, eligible, today=self.today, mapping=p.mapping, patients=target)

    def _apply_batch_once(
        self,
        target: Connection,
        rows: pl.DataFrame,
        mode: str,
        lo: int,
        hi: int,
        counts: Counts,
        refused: Mapping[int, str],
        ruled: pl.DataFrame | None = None,
        beside: Beside | None = None,
    ) -> Outcome:
        p = self.params
        t = self.table
        counts.read += rows.height
        if ruled is None:
            ruled = self._transform(target, rows.filter(pl.col("eliminado") == 0))
        decided = ruled
        if refused:  # a value the target refused is a rule broken, decided before duplicates
            hit = pl.col("legacy_id").is_in(list(refused))
            decided = decided.with_columns(
                pl.when(hit).then(pl.lit(rules.INVALID_VALUE)).otherwise(pl.col(batch.REASON)).alias(batch.REASON),
                pl.when(hit)
                .then(pl.col("legacy_id").replace_strict(refused, default=None, return_dtype=pl.String))
                .otherwise(pl.col(batch.DETAIL))
                .alias(batch.DETAIL),
            )
        if mode == "full":  # the batch decides every legacy id of its range
            scope = and_(t.c.legacy_id > lo, t.c.legacy_id <= hi)
            in_scope = (pl.col("legacy_id") > lo) & (pl.col("legacy_id") <= hi)
        else:  # the batch decides the ids it read
            batch_ids = rows["id"]
            scope = store.one_of(target, t.c.legacy_id, batch_ids)
            in_scope = pl.col("legacy_id").is_in(batch_ids.implode())
        outcome = Outcome()
        # The target rows the batch decides (its range, or its ids); of patients, their documents too.
        held = [t.c.national_id] if p.entity == "patients" else []
        existing = store.frame_of(
            target,
            select(t.c.legacy_id, t.c.id, t.c.content_hash, *held).where(t.c.sistema == p.sistema, scope),
            {"legacy_id": pl.Int64, "id": pl.Int64, "old_hash": pl.String} | {c.name: pl.String for c in held},
        )
        if p.entity == "patients":
            before = beside.before if beside is not None else None
            held_in_scope = existing["national_id"]
            decided = self._decide_duplicates(target, decided, scope, in_scope, outcome, held_in_scope, before)
            existing = existing.drop("national_id")
        passing = decided.filter(pl.col(batch.REASON).is_null())
        if beside is not None and not beside.own.decided.done():
            handed = Before(passing.select("legacy_id", "national_id"), existing["legacy_id"])
            beside.own.decided.set_result(None if outcome.evicted else handed)
        failing = decided.filter(pl.col(batch.REASON).is_not_null())
        outcome.quarantined = failing.select(
            "legacy_id", pl.col(batch.REASON).alias("reason"), pl.col(batch.DETAIL).alias("detail")
        )
        now = utcnow()
        joined = passing.join(existing, on="legacy_id", how="left")
        same = joined["old_hash"] == joined[batch.HASH]
        counts.unchanged += int(same.sum())
        changed = joined.filter(~same.fill_null(False))
        if p.entity == "encounters" and changed["id"].is_not_null().any():
            # Same content, hashed the way an earlier release did (with the target's patient_id):
            # bring the stored hash up to date in place — not a change: no ledger row, run_id kept.
            known = changed.filter(pl.col("id").is_not_null())
            earlier = batch.hashes(known, batch.ENCOUNTER_FIELDS)
            rehash = known.filter(earlier == known["old_hash"])
            store.set_hashes(target, t, rehash["id"].to_list(), rehash[batch.HASH].to_list())
            counts.unchanged += rehash.height
            counts.rehashed += rehash.height
            changed = changed.filter(~pl.col("legacy_id").is_in(rehash["legacy_id"].implode()))
        doomed = existing.filter(~pl.col("legacy_id").is_in(passing["legacy_id"].implode()))["id"].to_list()
        doomed += outcome.evicted  # outside the scope, so never in ``existing``
        entries: list[pl.DataFrame] = []
        if doomed:
            gone = store.previous_versions(target, t, doomed, delete_them=True)
            entries.append(self._entries(_versions(gone), "deleted", None, now))
            counts.deleted += len(gone)
        updated = changed.filter(pl.col("id").is_not_null())
        if updated.height:
            before = store.previous_versions(target, t, updated["id"].to_list(), delete_them=False)
            entries.append(self._entries(_versions(before), "updated", updated, now))
            counts.updated += updated.height
        writes = changed.select(
            *TARGET_COLUMNS[p.entity], pl.lit(p.run_id).alias("run_id"), pl.lit(now).alias("migrated_at")
        )
        try:
            written = store.upsert_frame(target, t, KEY, writes, fresh=existing.height == 0)
        except DBAPIError as problem:
            if store.is_refused_value(problem):
                raise TargetRefused(writes) from None
            raise
        fresh = changed.filter(pl.col("id").is_null())
        if fresh.height:
            inserted = fresh.select("legacy_id").join(written, on="legacy_id", how="left", maintain_order="left")
            if inserted["id"].null_count():
                raise RuntimeError("the target returned no id for an inserted record")
            entries.append(self._entries(inserted, "inserted", fresh, now))
            counts.inserted += fresh.height
        reasons = outcome.quarantined["reason"].value_counts()
        counts.quarantined.update(dict(zip(reasons["reason"].to_list(), reasons["count"].to_list(), strict=True)))
        outcome.ledger = pl.concat(entries) if entries else None
        outcome.at = now
        return outcome

    def _entries(self, rows: pl.DataFrame, action: str, hashes: pl.DataFrame | None, now: datetime) -> pl.DataFrame:
        """Ledger rows, in the order of ``rows`` (``legacy_id``, target ``id``, ``previous`` JSON if
        any), with the new content hash of each from ``hashes`` (by legacy id) if given."""
        p = self.params
        if hashes is not None:
            rows = rows.join(hashes.select("legacy_id", batch.HASH), on="legacy_id", how="left", maintain_order="left")
        return rows.select(
            pl.lit(p.entity, pl.String).alias("entity"),
            pl.lit(p.sistema, pl.String).alias("partition_key"),
            pl.col("legacy_id").cast(pl.Int64),
            pl.col("id").cast(pl.String).alias("target_id"),
            pl.lit(action, pl.String).alias("action"),
            (pl.col(batch.HASH) if hashes is not None else pl.lit(None)).cast(pl.String).alias("content_hash"),
            (pl.col("previous") if "previous" in rows.columns else pl.lit(None)).cast(pl.String).alias("previous"),
            pl.lit(p.run_id, pl.String).alias("run_id"),
            pl.lit(now, LEDGER_TYPES["at"]).alias("at"),
        )

    def _write_state(
        self, state: Connection, outcome: Outcome, mode: str, lo: int, hi: int, batch_ids: pl.Series
    ) -> bool:
        """Ledger rows, and the quarantine as it now stands for the rows this batch covers (rewritten
        only if it differs). Returns whether it wrote anything."""
        p = self.params
        q = schema.quarantine
        if outcome.ledger is not None:
            store.copy_frame(state, schema.ledger, outcome.ledger)
        covered = (
            and_(q.c.legacy_id > lo, q.c.legacy_id <= hi)
            if mode == "full"
            else store.one_of(state, q.c.legacy_id, batch_ids)
        )
        mine = and_(q.c.entity == p.entity, q.c.partition_key == p.sistema)
        evicted = outcome.evicted_legacy  # outside the covered rows
        decided = and_(mine, or_(covered, store.one_of(state, q.c.legacy_id, evicted)) if evicted else covered)
        quarantined = pl.concat(
            [
                outcome.quarantined,
                pl.DataFrame(
                    {"legacy_id": evicted, "reason": rules.DUPLICATE_DOCUMENT, "detail": DUPLICATE_DETAIL},
                    schema={"legacy_id": pl.Int64, "reason": pl.String, "detail": pl.String},
                ),
            ]
        ).sort("legacy_id")
        held = store.frame_of(state, select(q.c.legacy_id, q.c.reason, q.c.detail).where(decided), QUARANTINE_TYPES)
        if held.sort("legacy_id").equals(quarantined):
            return outcome.ledger is not None  # the quarantine as it stands (a re-run's) is not rewritten
        if held.height:
            state.execute(delete(q).where(decided))
        store.copy_frame(
            state,
            q,
            quarantined.select(
                pl.lit(p.entity).alias("entity"),
                pl.lit(p.sistema).alias("partition_key"),
                "legacy_id",
                "reason",
                "detail",
                pl.lit(p.run_id).alias("run_id"),
                pl.lit(outcome.at or utcnow()).alias("created_at"),
            ),
        )
        return True

    def _decide_duplicates(
        self,
        target: Connection,
        decided: pl.DataFrame,
        scope: Any,
        in_scope: pl.Expr,
        outcome: Outcome,
        held_in_scope: pl.Series,
        before: Before | None = None,
    ) -> pl.DataFrame:
        """DUPLICATE_DOCUMENT (rules.first_claim_wins): per national id, the lowest legacy id among the
        batch's passing rows and the target rows outside the batch that hold it now.
        ``held_in_scope``: the documents the target rows of the batch's scope hold; ``before``: the batch
        before this one, not committed yet (:meth:`_land_beside`): the documents it will hold, whose legacy
        ids are below this batch's, so they own what they hold, in place of what the target rows it
        rewrites or deletes hold now."""
        claims = decided.filter(pl.col(batch.REASON).is_null()).select("legacy_id", "national_id")
        if claims.height == 0:
            return decided
        t = self.table
        # Target rows this batch decides (its range, or its ids) hold nothing: they are about to
        # be rewritten or deleted. Only rows outside the batch can already own a document — and
        # none owns one a row inside holds: a document has one holder at most in the sistema
        # (a unique constraint, checked at every commit). So only the others are looked up.
        claimed = claims["national_id"].unique()
        unheld = claimed.filter(~claimed.is_in(held_in_scope.drop_nulls().implode()))
        holder_types = {"legacy_id": pl.Int64, "id": pl.Int64, "national_id": pl.String}
        if unheld.len() == 0:
            holders = pl.DataFrame(schema=holder_types)
        else:
            holders = store.frame_of(
                target,
                select(t.c.legacy_id, t.c.id, t.c.national_id).where(
                    t.c.sistema == self.params.sistema, store.one_of(target, t.c.national_id, unheld), not_(scope)
                ),
                holder_types,
            ).filter(~in_scope)
        if before is not None:
            holders = holders.filter(~pl.col("legacy_id").is_in(before.released.implode()))
            held = before.held.filter(pl.col("national_id").is_in(claimed.implode()))
            holders = pl.concat([holders, held.select("legacy_id", pl.lit(None, pl.Int64).alias("id"), "national_id")])
        if holders.height == 0 and claimed.len() == claims.height:
            return decided  # every document claimed once, and held by no row outside: no loser, none evicted
        owners = (
            pl.concat([claims, holders.select("legacy_id", "national_id")])
            .group_by("national_id")
            .agg(pl.col("legacy_id").min().alias("owner"))
        )
        losers = claims.join(owners, on="national_id").filter(pl.col("legacy_id") != pl.col("owner"))["legacy_id"]
        evicted = holders.join(owners, on="national_id").filter(pl.col("legacy_id") != pl.col("owner"))
        if evicted["id"].null_count():
            raise RuntimeError("a document of the batch before was to be evicted by a later batch")
        outcome.evicted = evicted["id"].to_list()
        outcome.evicted_legacy = evicted["legacy_id"].to_list()
        if losers.len() == 0:
            return decided
        lost = pl.col("legacy_id").is_in(losers.implode())
        return decided.with_columns(
            pl.when(lost).then(pl.lit(rules.DUPLICATE_DOCUMENT)).otherwise(pl.col(batch.REASON)).alias(batch.REASON),
            pl.when(lost).then(pl.lit(DUPLICATE_DETAIL)).otherwise(pl.col(batch.DETAIL)).alias(batch.DETAIL),
            pl.when(lost).then(None).otherwise(pl.col(batch.HASH)).alias(batch.HASH),
        )


def transform(
    entity: str,
    sistema: str,
    eligible: pl.DataFrame,
    *,
    today: date,
    mapping: rules.PractitionerMapping | None,
    patients: Connection | None,
) -> pl.DataFrame:
    """§6 for a batch of eligible legacy rows (worker/batch.py): target fields, ``_reason``/``_detail``,
    content hash. Encounters look their patients up in the target through ``patients`` (ORPHAN_PATIENT:
    not migrated in this sistema). The migration and its verification (worker/verify_clinical.py)
    both decide a page through this function. DUPLICATE_DOCUMENT is not decided here."""
    if entity == "patients":
        return batch.transform_patients(eligible, today=today, mapping=mapping)
    assert patients is not None, "the encounters' rules look their patients up"
    return batch.transform_encounters(eligible, migrated_patients(patients, sistema, eligible), mapping=mapping)


def migrated_patients(conn: Connection, sistema: str, encounters: pl.DataFrame) -> pl.DataFrame:
    """``legacy_id`` → target ``id`` of the patients of ``sistema`` that the encounters of a page
    name (``paciente_id``) and that are migrated."""
    pt = schema.patients
    wanted = encounters["paciente_id"].drop_nulls().unique()
    return store.frame_of(
        conn,
        select(pt.c.legacy_id, pt.c.id).where(pt.c.sistema == sistema, store.one_of(conn, pt.c.legacy_id, wanted)),
        {"legacy_id": pl.Int64, "id": pl.Int64},
    )


def rules_of_page(
    entity: str,
    sistema: str,
    rows: pl.DataFrame,
    *,
    today: date,
    mapping: rules.PractitionerMapping | None,
    lookups: Connection | None = None,
) -> pl.DataFrame:
    """:func:`transform` of a page read (its ``eliminado = 0`` rows), on the reader thread: patients
    need no database; encounters read their patients' ids through ``lookups``, whose transaction
    ends with the look-up."""
    eligible = rows.filter(pl.col("eliminado") == 0)
    if lookups is None:
        return transform(entity, sistema, eligible, today=today, mapping=mapping, patients=None)
    try:
        return transform(entity, sistema, eligible, today=today, mapping=mapping, patients=lookups)
    finally:
        lookups.rollback()


def _versions(rows: Sequence[tuple[int, int, str]]) -> pl.DataFrame:
    """:func:`store.previous_versions` as a frame: ``legacy_id``, ``id``, ``previous``."""
    return pl.DataFrame(rows, schema={"legacy_id": pl.Int64, "id": pl.Int64, "previous": pl.String}, orient="row")
