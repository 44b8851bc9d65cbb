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

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Connection, Engine, RowMapping, Table, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from worker import locks, rules, schema, store
from worker.params import RunParameters

LOWEST = -(2**62)
HIGHEST = 2**62
ANALYZE_FIRST = 10_000
DUPLICATE_DETAIL = "a lower legacy id of the sistema holds the same document"
SOURCES: dict[str, Table] = {"patients": schema.pacientes, "encounters": schema.atenciones}


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
    """What a batch decided: records to hold in the target, rows to quarantine, rows to evict."""

    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    hashes: dict[int, str] = field(default_factory=dict)
    quarantined: dict[int, rules.Quarantined] = field(default_factory=dict)
    evicted: list[RowMapping] = field(default_factory=list)
    # The hash an earlier release stored for the same content, for records whose hash scheme changed.
    previous_scheme: Callable[[Mapping[str, Any]], str | None] = lambda _: None


@dataclass
class Result:
    counts: Counts
    mode: str
    resumed_from: str | None
    watermark: datetime | None
    seconds: float
    read_this_run: int  # rows read by this run alone (a resumed run's counts include its predecessor's)


def utcnow() -> datetime:
    return datetime.now(UTC)


class MassDeleteRefused(RuntimeError):
    """A full run would delete more of the partition than the run allows (DESIGN §5, Modes)."""


class TargetRefused(Exception):
    """The target refused a value of one of ``writes`` (the batch is redone without that record)."""

    def __init__(self, writes: Sequence[Mapping[str, Any]]) -> None:
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
        self.delete_budget: int | None = None  # deletions this full run may make; None: unlimited

    # --- the run -------------------------------------------------------------------------

    def run(self) -> Result:
        started = time.monotonic()
        schema.create_schemas(self.target, schema.target_metadata)
        schema.create_schemas(self.state, schema.state_metadata)
        p = self.params
        with ExitStack() as stack:
            target = stack.enter_context(self.target.connect())
            state = target if self.same_db else stack.enter_context(self.state.connect())
            # One writer per entity and sistema: the lock is held by every connection this run
            # writes through, and nothing of the run's state is read or written before it is.
            for conn in dict.fromkeys((state, target)):
                stack.enter_context(locks.exclusive(conn, p.entity, p.sistema, self.lock_wait_seconds))
            source = stack.enter_context(self.legacy.connect())
            self._close_interrupted_runs(state)
            checkpoint = None if p.dry_run else self._resumable_checkpoint(state)
            since = self._last_watermark(state) if p.mode == "incremental" else None
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
            self._record_run_start(state, mode, resumed_from)
            try:
                if mode == "full":
                    self._guard_mass_delete(source, target, after)
                self._migrate(source, target, state, mode, since, after, counts, watermark)
                if p.dry_run:
                    target.rollback()
                    state.rollback()
            except BaseException:
                self._record_run_end(state, "failed", counts, None)
                raise
            self._record_run_end(state, "succeeded", counts, watermark)
        return Result(counts, mode, resumed_from, watermark, time.monotonic() - started, counts.read - read_before)

    def _guard_mass_delete(self, source: Connection, target: Connection, after: int) -> None:
        """Stop a full run that would delete more than ``max_delete_share`` of the partition's
        migrated rows, before it deletes anything: an empty or wrong source must never empty a target.

        Rows whose source is gone or soft-deleted are counted exactly up front (a merge of the two
        sorted id lists). Rows deleted because they are now quarantined only show as the run reads
        them: they count against the same budget, and the batch that would exceed it is rolled back.
        """
        p = self.params
        if p.allow_mass_delete:
            return
        t, s = self.table, self.source
        migrated = target.scalar(select(func.count()).select_from(t).where(t.c.sistema == p.sistema)) or 0
        self.delete_budget = int(migrated * p.max_delete_share)
        if migrated == 0:
            return
        streamed = {"stream_results": True, "yield_per": 10_000}  # per statement: Connection options stick
        ours = target.scalars(
            select(t.c.legacy_id)
            .where(t.c.sistema == p.sistema, t.c.legacy_id > after)
            .order_by(t.c.legacy_id)
            .execution_options(**streamed)
        )
        theirs = source.scalars(
            select(s.c.id)
            .where(s.c.sistema == p.sistema, s.c.eliminado == 0, s.c.id > after)
            .order_by(s.c.id)
            .execution_options(**streamed)
        )
        gone = sum(1 for _ in store.missing_from(ours, theirs))
        source.rollback()
        target.rollback()
        self._refuse_mass_delete(gone, migrated)

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
        last_report = time.monotonic()
        lo = after
        next_analyze = ANALYZE_FIRST
        for rows in self._stream(source, after, since):
            hi = rows[-1]["id"]
            self._apply_batch(target, state, rows, mode, lo, hi, counts)
            self._refuse_mass_delete(counts.deleted - deleted_before)
            lo = hi
            self._checkpoint(state, hi, counts, watermark, "running")
            self._commit(target, state)
            if counts.read - read_before >= next_analyze:  # at 10k, 20k, 40k … rows: O(log n) times
                self._analyze(target, state)
                next_analyze *= 2
            if time.monotonic() - last_report >= 5:
                self.progress(counts)
                last_report = time.monotonic()
        if mode == "full":  # the tail: target rows past the last eligible source row
            self._apply_batch(target, state, [], mode, lo, HIGHEST, counts)
            self._refuse_mass_delete(counts.deleted - deleted_before)
        self._checkpoint(state, lo, counts, watermark, "done")
        self._commit(target, state)
        self._analyze(target, state)  # the next entity looks this one up
        self.progress(counts)

    def _analyze(self, target: Connection, state: Connection) -> None:
        store.analyze(target, self.table)
        store.analyze(state, schema.quarantine)  # cleared by range each batch; the ledger is only appended to
        self._commit(target, state)

    def _commit(self, target: Connection, state: Connection) -> None:
        if self.params.dry_run:
            return
        target.commit()
        if state is not target:
            state.commit()

    # --- source --------------------------------------------------------------------------

    def _stream(self, source: Connection, after: int, since: datetime | None) -> Iterator[Sequence[RowMapping]]:
        """Batches of source rows in id order. Incremental runs see soft-deleted rows too."""
        t = self.source
        query = select(t).where(t.c.sistema == self.params.sistema, t.c.id > after).order_by(t.c.id)
        if since is None:
            query = query.where(t.c.eliminado == 0)
        else:
            query = query.where(t.c.actualizado_en >= since.replace(tzinfo=None))
        result = source.execute(query.execution_options(stream_results=True, yield_per=self.params.batch_size))
        yield from result.mappings().partitions()

    def _source_watermark(self, source: Connection) -> datetime | None:
        t = self.source
        latest = source.scalar(select(func.max(t.c.actualizado_en)).where(t.c.sistema == self.params.sistema))
        source.rollback()
        return rules.coerce_datetime(latest)

    # --- one batch -----------------------------------------------------------------------

    def _apply_batch(
        self,
        target: Connection,
        state: Connection,
        rows: Sequence[RowMapping],
        mode: str,
        lo: int,
        hi: int,
        counts: Counts,
    ) -> None:
        """Apply one batch; a record whose value the target refuses is quarantined (INVALID_VALUE)
        and the batch is decided again without it, so no single row can fail a batch."""
        refused: dict[int, rules.Quarantined] = {}
        while True:
            attempt = Counts()
            try:
                with store.savepoint(target):
                    ledger, outcome = self._apply_batch_once(target, rows, mode, lo, hi, attempt, refused)
            except TargetRefused as problem:
                found = store.refused_rows(target, self.table, ("sistema", "legacy_id"), problem.writes)
                if not found:
                    raise RuntimeError("the target refused a batch, but no single record of it") from None
                for index, column in found.items():
                    detail = f"the target cannot hold the value of {column}" if column else "the target refused a value"
                    refused[problem.writes[index]["legacy_id"]] = rules.Quarantined(rules.INVALID_VALUE, detail)
                continue
            break
        counts.add(attempt)
        batch_ids = [r["id"] for r in rows]
        self._write_state(state, ledger, outcome, mode, lo, hi, batch_ids, utcnow())

    def _apply_batch_once(
        self,
        target: Connection,
        rows: Sequence[RowMapping],
        mode: str,
        lo: int,
        hi: int,
        counts: Counts,
        refused: Mapping[int, rules.Quarantined],
    ) -> tuple[list[dict[str, Any]], Outcome]:
        p = self.params
        t = self.table
        eligible = [r for r in rows if not r["eliminado"]]
        counts.read += len(rows)
        batch_ids = [r["id"] for r in rows]
        if mode == "full":  # the batch decides every legacy id of its range
            scope = and_(t.c.legacy_id > lo, t.c.legacy_id <= hi)
            outcome = self._decide(target, eligible, lambda legacy_id: lo < legacy_id <= hi, refused)
        else:  # the batch decides the ids it read
            scope = t.c.legacy_id.in_(batch_ids)
            outcome = self._decide(target, eligible, set(batch_ids).__contains__, refused)
        existing = {
            r["legacy_id"]: r for r in target.execute(select(t).where(t.c.sistema == p.sistema, scope)).mappings()
        }
        now = utcnow()
        ledger: list[dict[str, Any]] = []

        def entry(legacy_id: int, action: str, target_id: Any, content: str | None, previous: Any) -> None:
            ledger.append(
                {
                    "entity": p.entity,
                    "partition_key": p.sistema,
                    "legacy_id": legacy_id,
                    "target_id": None if target_id is None else str(target_id),
                    "action": action,
                    "content_hash": content,
                    "previous": previous,
                    "run_id": p.run_id,
                    "at": now,
                }
            )

        doomed = [row for legacy_id, row in existing.items() if legacy_id not in outcome.records]
        doomed += outcome.evicted  # outside the scope, so never in ``existing``
        if doomed:
            target.execute(delete(t).where(t.c.id.in_([row["id"] for row in doomed])))
            for row in doomed:
                entry(row["legacy_id"], "deleted", row["id"], None, store.jsonable(row))
            counts.deleted += len(doomed)

        writes: list[dict[str, Any]] = []
        inserted: list[int] = []
        rehash: list[dict[str, Any]] = []
        for legacy_id, record in outcome.records.items():
            digest = outcome.hashes[legacy_id]
            old = existing.get(legacy_id)
            if old is not None and old["content_hash"] == digest:
                counts.unchanged += 1  # counted, never given a ledger row (§5: the ledger records changes)
                continue
            if old is not None and outcome.previous_scheme(record) == old["content_hash"]:
                # Same content, hashed the way an earlier release did: bring the stored hash up to
                # date in place. Not a change of the record: no ledger row, run_id kept.
                rehash.append({"_id": old["id"], "_hash": digest})
                counts.unchanged += 1
                counts.rehashed += 1
                continue
            writes.append({**record, "content_hash": digest, "run_id": p.run_id, "migrated_at": now})
            if old is None:
                inserted.append(legacy_id)
                counts.inserted += 1
            else:
                entry(legacy_id, "updated", old["id"], digest, store.jsonable(old))
                counts.updated += 1
        if rehash:
            target.execute(update(t).where(t.c.id == bindparam("_id")).values(content_hash=bindparam("_hash")), rehash)
        try:
            returned = store.upsert_rows(target, t, ("sistema", "legacy_id"), writes, returning=("legacy_id", "id"))
        except DBAPIError as problem:
            if store.is_refused_value(problem):
                raise TargetRefused(writes) from None
            raise
        new_ids = dict(returned)
        for legacy_id in inserted:
            entry(legacy_id, "inserted", new_ids[legacy_id], outcome.hashes[legacy_id], None)
        counts.quarantined.update(problem.reason for problem in outcome.quarantined.values())
        return ledger, outcome

    def _write_state(
        self,
        state: Connection,
        ledger: list[dict[str, Any]],
        outcome: Outcome,
        mode: str,
        lo: int,
        hi: int,
        batch_ids: Sequence[int],
        now: datetime,
    ) -> None:
        """Ledger rows, and the quarantine as it now stands for the rows this batch covers."""
        p = self.params
        q = schema.quarantine
        store.insert_rows(state, schema.ledger, ledger)
        covered = and_(q.c.legacy_id > lo, q.c.legacy_id <= hi) if mode == "full" else q.c.legacy_id.in_(batch_ids)
        mine = and_(q.c.entity == p.entity, q.c.partition_key == p.sistema)
        evicted = [row["legacy_id"] for row in outcome.evicted]  # outside the covered rows
        state.execute(delete(q).where(mine, or_(covered, q.c.legacy_id.in_(evicted)) if evicted else covered))
        quarantined = {
            **outcome.quarantined,
            **{legacy_id: rules.Quarantined(rules.DUPLICATE_DOCUMENT, DUPLICATE_DETAIL) for legacy_id in evicted},
        }
        store.insert_rows(
            state,
            q,
            [
                {
                    "entity": p.entity,
                    "partition_key": p.sistema,
                    "legacy_id": legacy_id,
                    "reason": problem.reason,
                    "detail": problem.detail,
                    "run_id": p.run_id,
                    "created_at": now,
                }
                for legacy_id, problem in sorted(quarantined.items())
            ],
        )

    def _decide(
        self,
        target: Connection,
        eligible: Sequence[RowMapping],
        in_scope: Callable[[int], bool],
        refused: Mapping[int, rules.Quarantined],
    ) -> Outcome:
        """Apply the per-row rules; a record the target refused earlier is quarantined like a row
        that broke a rule, before duplicates are decided, so it never holds a document."""
        outcome = Outcome()
        transform = self._patient if self.params.entity == "patients" else self._encounter_transform(target, eligible)
        for row in eligible:
            try:
                if row["id"] in refused:
                    raise refused[row["id"]]
                outcome.records[row["id"]], outcome.hashes[row["id"]] = transform(row)
            except rules.Quarantined as problem:
                outcome.quarantined[row["id"]] = problem
        if self.params.entity == "patients":
            self._decide_duplicates(target, outcome, in_scope)
        else:
            outcome.previous_scheme = rules.content_hash  # before 0.2 an encounter hashed its target patient_id
        return outcome

    def _patient(self, row: RowMapping) -> tuple[dict[str, Any], str]:
        record = rules.transform_patient(row, today=self.today, mapping=self.params.mapping)
        return record, rules.content_hash(record)

    def _encounter_transform(
        self, target: Connection, eligible: Sequence[RowMapping]
    ) -> Callable[[RowMapping], tuple[dict[str, Any], str]]:
        """Encounters hang off the patients migrated in this sistema: one lookup per batch."""
        p = schema.patients
        wanted = {r["paciente_id"] for r in eligible if r["paciente_id"] is not None}
        patient_ids = (
            dict(
                target.execute(
                    select(p.c.legacy_id, p.c.id).where(p.c.sistema == self.params.sistema, p.c.legacy_id.in_(wanted))
                ).all()
            )
            if wanted
            else {}
        )

        def transform(row: RowMapping) -> tuple[dict[str, Any], str]:
            record = rules.transform_encounter(
                row, patient_id=patient_ids.get(row["paciente_id"]), mapping=self.params.mapping
            )
            return record, rules.encounter_hash(record, row["paciente_id"])

        return transform

    def _decide_duplicates(self, target: Connection, outcome: Outcome, in_scope: Callable[[int], bool]) -> None:
        claims = {legacy_id: record["national_id"] for legacy_id, record in outcome.records.items()}
        if not claims:
            return
        t = self.table
        # Target rows this batch decides (its range, or its ids) hold nothing: they are about to
        # be rewritten or deleted. Only rows outside the batch can already own a document.
        holders = {
            r["national_id"]: r
            for r in target.execute(
                select(t).where(t.c.sistema == self.params.sistema, t.c.national_id.in_(set(claims.values())))
            ).mappings()
            if not in_scope(r["legacy_id"])
        }
        owners, losers = rules.first_claim_wins(claims, {n: r["legacy_id"] for n, r in holders.items()})
        for legacy_id in losers:
            del outcome.records[legacy_id]
            del outcome.hashes[legacy_id]
            outcome.quarantined[legacy_id] = rules.Quarantined(rules.DUPLICATE_DOCUMENT, DUPLICATE_DETAIL)
        outcome.evicted = [row for national_id, row in holders.items() if owners[national_id] != row["legacy_id"]]

    # --- control tables (read and written only while the lock is held) ---------------------

    def _parameters(self) -> dict[str, Any]:
        p = self.params
        return {"mode": p.mode, "pract_source": p.pract_source, "pract_target": p.pract_target}

    def _resumable_checkpoint(self, conn: Connection) -> RowMapping | None:
        c = schema.checkpoints
        row = (
            conn.execute(select(c).where(c.c.entity == self.params.entity, c.c.partition_key == self.params.sistema))
            .mappings()
            .first()
        )
        conn.rollback()
        if row is None or row["status"] != "running":
            return None
        if row["parameters"] != self._parameters():
            self.log(f"checkpoint of run {row['run_id']} had other parameters: starting over")
            return None
        return row

    def _close_interrupted_runs(self, conn: Connection) -> None:
        """Runs of this entity and sistema still marked running were killed: say so. Only ever
        called while this run holds the lock, so the run it marks cannot be alive."""
        r = schema.runs
        conn.execute(
            update(r)
            .where(r.c.entity == self.params.entity, r.c.partition_key == self.params.sistema,
                   r.c.status == "running", r.c.run_id != self.params.run_id)
            .values(status="interrupted")
        )  # fmt: skip
        conn.commit()

    def _last_watermark(self, conn: Connection) -> datetime | None:
        r = schema.runs
        latest = conn.scalar(
            select(func.max(r.c.watermark)).where(
                r.c.entity == self.params.entity,
                r.c.partition_key == self.params.sistema,
                r.c.status == "succeeded",
                r.c.dry_run.is_(False),
            )
        )
        conn.rollback()
        return rules.coerce_datetime(latest)

    def _checkpoint(
        self, state: Connection, last: int, counts: Counts, watermark: datetime | None, status: str
    ) -> None:
        if self.params.dry_run:
            return
        values = {
            "entity": self.params.entity,
            "partition_key": self.params.sistema,
            "run_id": self.params.run_id,
            "mode": self.params.mode,
            "parameters": self._parameters(),
            "last_legacy_id": last,
            "counts": counts.as_dict(),
            "watermark": watermark,
            "status": status,
            "updated_at": utcnow(),
        }
        dialect = postgresql if state.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(schema.checkpoints).values(values)
        state.execute(
            stmt.on_conflict_do_update(
                index_elements=["entity", "partition_key"],
                set_={k: v for k, v in values.items() if k not in ("entity", "partition_key")},
            )
        )

    def _record_run_start(self, conn: Connection, mode: str, resumed_from: str | None) -> None:
        p = self.params
        values = {
            "usuario": p.usuario,
            "parameters": {
                **self._parameters(),
                "dry_run": p.dry_run,
                "effective_mode": mode,
                "allow_mass_delete": p.allow_mass_delete,
            },
            "mode": mode,
            "dry_run": p.dry_run,
            "status": "running",
            "resumed_from": resumed_from,
            "started_at": utcnow(),
            "finished_at": None,
            "counts": None,
            "watermark": None,
        }
        r = schema.runs
        key = and_(r.c.run_id == p.run_id, r.c.entity == p.entity, r.c.partition_key == p.sistema)
        if conn.execute(update(r).where(key).values(values)).rowcount == 0:  # a retried step re-uses its run id
            conn.execute(r.insert().values(run_id=p.run_id, entity=p.entity, partition_key=p.sistema, **values))
        conn.commit()

    def _record_run_end(self, conn: Connection, status: str, counts: Counts, watermark: datetime | None) -> None:
        """On the run's own connection; if that session is gone (a lost lock, a dropped server), on a
        new one: the run's own row is all it touches."""
        p = self.params
        r = schema.runs
        stmt = (
            update(r)
            .where(r.c.run_id == p.run_id, r.c.entity == p.entity, r.c.partition_key == p.sistema)
            .values(status=status, counts=counts.as_dict(), watermark=watermark, finished_at=utcnow())
        )
        try:
            conn.rollback()
            conn.execute(stmt)
            conn.commit()
        except DBAPIError:
            with self.state.begin() as fresh:
                fresh.execute(stmt)
