"""Migrate one app entity of one shard: the List Cutter Django DB → Firestore (and, for files, the
blob store). In-process, on the Dagster host (DESIGN §5 "App").

The shard's source rows are read in id order, a batch at a time (keyset pages: memory depends on
the batch size, never on the table). For each batch:

1. the §6 rules (worker/app_rules.py) make each row a document or a quarantine reason; ``files``
   stream their content from the media source into the blob store, verified by SHA-256;
2. the documents already in Firestore are read (``get_many``): a document whose content hash is
   unchanged is not written again (counted, no ledger row);
3. **write-ahead**: the ledger rows (with the previous document, and the previous blob's backup
   key) and the quarantine rows are committed to the control DB *before* Firestore is written, so
   every document a run changes has its ledger row even if the run is killed in between; then the
   Firestore writes, in requests of at most 500 writes / ~3 MiB; then the checkpoint.

Steps 1 and 2 of a page run on reader threads up to ``LOOKAHEAD`` pages ahead of the page whose ledger
and commit are under way (with the shard's count, read once at the start, and each parent looked up
once per run), so Firestore, the Django DB, the disk and the rules' Python work at the same time;
step 3 stays on the run's own connection and thread, in page order.

A shard this control DB has no record of writing to the target database (``app_shards_written``) is
taken to be empty: not counted, nothing read back, its inserts written as creates. Firestore refuses a
create whose document exists (and a file's blob already at its key is found before it is overwritten):
the run then goes on from its checkpoint as a resumed run does, counting and reading (``ShardNotEmpty``).

A killed run leaves its last checkpoint; the next run resumes after it, and a replayed batch finds
its documents already written (same hash: unchanged). One writer per entity and shard: the
advisory lock is held on the control DB connection and re-checked before every Firestore commit.

A *full* run ends with a sweep that deletes the shard's documents whose source row is gone; it is
guarded like the clinical path: more than ``max_delete_share`` of the shard's documents stops the
run before anything is deleted, unless ``allow_mass_delete``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Connection, Engine, and_, delete, func, select

from resources.blobstore import BlobStore, copy_blob, hash_source
from resources.firestore import DocumentWriter, PartialCommit, Write
from resources.media import MediaError, MediaSource
from worker import app_rules, django_schema, locks, rules, schema, store
from worker.engine import Counts, MassDeleteRefused, Result
from worker.params import InvalidParameters, common_problems, shard_problem
from worker.runbook import RunBook

ENTITIES: tuple[str, ...] = tuple(app_rules.APP_ENTITIES)  # users, files, filters: the registry's order
SOURCES = django_schema.SOURCES
BACKUP_PREFIX = "previous"  # blobs a run overwrote or deleted: previous/{run_id}/files/{user_id}/{file_id}
TIMESTAMP = "$timestamp"  # how a Firestore timestamp is kept in the ledger's JSON
# Source rows a page unless a run names its batch_size; a Firestore request still carries at most 500 writes
# (the writer splits a page's). A page's fixed cost (its look-ups, ledger commit, Firestore commit and
# checkpoint) is paid per page, and a shard a few rows past 500 paid it twice with pages of 500: 16 shards
# of ~520 filters took 1.35 s against 1.53 s, of ~500 users 0.94 s against 1.35 s (medians of 6 alternating
# rounds); shards of ~1,700 filters 4.27-4.61 s against 4.41-5.60 s (3 rounds). Files keep pages of 500:
# a page's blobs are copied while the page before is committed, and 16 shards of ~770 files took 3.48 s
# in pages of 500 against 3.60 s in one page (medians of 8 alternating rounds).
PAGE_ROWS: dict[str, int] = {"users": 1000, "files": 500, "filters": 1000}
SWEEP_PAGE = 500  # documents a full run's sweep checks against the source, and deletes, at a time
IN_FLIGHT = 2  # Firestore commit requests a run keeps going at once
LOOKAHEAD = 2  # pages read and decided ahead of the one whose ledger and commit are under way
READERS = 2 + LOOKAHEAD  # the shard's count, the page reader, and the pages being prepared


_POOLS: dict[str, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _forget_pools() -> None:
    """In a forked child: none of the parent's threads exist there (nor may its lock ever be released)."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)


def shared_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of threads kept from run to run, for tasks that never wait on another task
    (Firestore commits, parent look-ups). A run once started its own: a thread started while the run's
    other threads held the GIL took 2-4 ms to start, and a shard's run started 3-5 of them (users: 205 ms
    of a 1.28 s pass of 16 shards, 2026-12-05). Every run waits for its own tasks before it ends."""
    with _POOLS_LOCK:
        pool = _POOLS.get(name)
        if pool is None:
            pool = _POOLS[name] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        return pool


def _resolved(value: Any) -> Future[Any]:
    """A future that already holds ``value``."""
    done: Future[Any] = Future()
    done.set_result(value)
    return done


_SCHEMAS_READY: weakref.WeakSet[Engine] = weakref.WeakSet()  # control DB engines whose tables this process made


@dataclass(frozen=True)
class AppRunParameters:
    entity: str
    shard: str
    usuario: str
    run_id: str
    mode: Literal["full", "incremental"] = "full"
    dry_run: bool = False
    batch_size: int | None = None  # source rows a page; None: the entity's own (PAGE_ROWS)
    allow_mass_delete: bool = False
    max_delete_share: float = 0.10


def validate_app(params: AppRunParameters) -> AppRunParameters:
    """``params`` unchanged if every §8 rule holds (the clinical path's checks, shared), else raise."""
    problems: list[str] = []
    if params.entity not in ENTITIES:
        problems.append(f"entity must be one of {', '.join(ENTITIES)}")
    if problem := shard_problem(params.shard):
        problems.append(problem)
    problems += common_problems(params, batch_size_optional=True)
    if problems:
        raise InvalidParameters("; ".join(problems))
    return params


def page_rows(params: AppRunParameters) -> int:
    """Source rows a page of the run reads: its batch size, else its entity's own."""
    return params.batch_size if params.batch_size is not None else PAGE_ROWS[params.entity]


# --- the ledger's JSON form of a Firestore document ------------------------------------------


def to_ledger(value: Any) -> Any:
    """A Firestore document as JSON: timestamps become ``{"$timestamp": ISO 8601 UTC}``."""
    if isinstance(value, datetime):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return {TIMESTAMP: aware.isoformat()}
    if isinstance(value, Mapping):
        return {key: to_ledger(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_ledger(item) for item in value]
    return value


def from_ledger(value: Any) -> Any:
    """The inverse of :func:`to_ledger`: the document as it was, with its timestamps."""
    if isinstance(value, Mapping):
        if set(value) == {TIMESTAMP}:
            return datetime.fromisoformat(value[TIMESTAMP])
        return {key: from_ledger(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_ledger(item) for item in value]
    return value


# --- one batch's decisions ---------------------------------------------------------------------


@dataclass
class Pending:
    """A batch whose ledger is committed: its Firestore writes, and what follows them."""

    writes: list[Write] = field(default_factory=list)
    blob_deletions: list[tuple[str, str]] = field(default_factory=list)
    future: Future[None] | None = None
    last_id: int = 0
    counts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Parents:
    """The parents a batch's rows name that are migrated: users (files, filters) and files (filters)."""

    users: set[Any] = field(default_factory=set)
    files: set[Any] = field(default_factory=set)


@dataclass(frozen=True)
class Prepared:
    """A page of source rows, the documents they already have in Firestore, and the rules' decisions."""

    rows: list[dict[str, Any]]
    existing: Mapping[str, Any]
    decisions: list[Decision]


class Lookahead(Iterator[Prepared]):
    """Prepared pages handed from a producer thread to the run, in order, at most ``depth`` ahead.

    The producer ``offer``s each page's future (``None`` at the end); iterating yields their results
    (a failed page raises). ``close`` stops the producer: its ``offer`` then returns False."""

    def __init__(self, depth: int) -> None:
        self._ready: queue.Queue[Future[Prepared] | None] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def offer(self, item: Future[Prepared] | None) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> Prepared:
        if self._done:
            raise StopIteration
        item = self._ready.get()
        if item is None:
            self._done = True
            raise StopIteration
        try:
            return item.result()
        except BaseException:
            self._done = True
            raise

    def close(self) -> None:
        self._done = True
        self._stop.set()


@dataclass
class Decision:
    """What the rules made of one source row: its document, or why it is quarantined."""

    legacy_id: int
    document: dict[str, Any] | None = None
    reason: str | None = None
    detail: str | None = None
    blob_backup: str | None = None  # where this run kept the blob it overwrote
    digest: str | None = None  # the document's content hash


# --- the decisions, shared with the checks (checks/app_verify.py) ----------------------------


def source_page(
    django: Engine, entity: str, shard_number: int, after: int, limit: int, since: datetime | None = None
) -> list[dict[str, Any]]:
    """The shard's next ``limit`` eligible source rows of ``entity`` after id ``after``, in id order (a keyset
    page), only those changed since ``since`` when given (the entity's ``updated_at`` column)."""
    t = SOURCES[entity]
    query = select(t).where(django_schema.shard_filter(t, shard_number), t.c.id > after)
    if since is not None:
        updated_at = app_rules.APP_ENTITIES[entity].updated_at_column
        if updated_at is None:
            raise ValueError(f"{entity} have no updated_at column")
        query = query.where(t.c[updated_at] > since)
    with django.connect() as source:
        result = source.execute(query.order_by(t.c.id).limit(limit))
        names = tuple(result.keys())
        return [dict(zip(names, row, strict=True)) for row in result.all()]  # one fetch, no row mappings


FileContent = Callable[[Mapping[str, Any], Decision], dict[str, Any]]


def decide_row(entity: str, row: Mapping[str, Any], parents: Parents, file: FileContent | None = None) -> Decision:
    """What §6 makes of one source row: its document and content hash, or its quarantine reason.

    ``parents`` are the migrated users (files, filters) and files (filters) the row may name; ``file``
    makes a file's document (its content read, and for a run its blob copied): :func:`read_file_document`
    reads only, ``AppMigration._file`` copies too."""
    decision = Decision(legacy_id=int(row["id"]))
    try:
        if entity == "users":
            document = app_rules.transform_user(row)
        elif entity == "files":
            if file is None:
                raise ValueError("files need a way to read their content")
            document = file(row, decision)
        elif entity == "filters":
            app_rules.require_user(row["user_id"] in parents.users)
            app_rules.require_file(row["file_id"], row["file_id"] in parents.files)
            document = app_rules.filter_document(row)
        else:
            raise ValueError("unknown app entity")
        decision.document = document  # the transforms refuse what Firestore cannot hold
        decision.digest = app_rules.document_hash(entity, document)
    except rules.Quarantined as refused:
        decision.reason, decision.detail = refused.reason, refused.detail
    except MediaError as refused:
        decision.reason, decision.detail = refused.reason, refused.detail
    return decision


@dataclass(frozen=True)
class FilePlan:
    """A file row past the rules that need no content (ORPHAN_USER, UNSAFE_PATH): its blob's key and its
    document but for the content's size and hash; or ``refused`` (INVALID_VALUE), which §6 puts after the
    content's own reasons, so it is raised only once the content is read (:func:`read_file_content`)."""

    key: str
    fields: dict[str, Any]
    refused: rules.Quarantined | None = None

    def document(self, size_bytes: int, sha256: str) -> dict[str, Any]:
        return {**self.fields, "size_bytes": size_bytes, "sha256": sha256}


def plan_file(row: Mapping[str, Any], users: set[Any], blobs: BlobStore) -> FilePlan:
    """ORPHAN_USER, UNSAFE_PATH (lexically: the media source finds the symlinks), then the document's own
    values, before any content is read or blob written (the real size and hash come later: a 64-bit size
    and a 64-character hash cannot make a valid document invalid)."""
    app_rules.require_user(row["user_id"] in users)
    app_rules.require_safe_path(row["file_path"])
    key = app_rules.blob_key(row["user_id"], row["file_id"])
    try:
        fields = app_rules.file_document(row, size_bytes=0, sha256="0" * 64, blob_url=blobs.url(key))
    except rules.Quarantined as problem:
        return FilePlan(key, {}, problem)
    return FilePlan(key, fields)


def read_file_content(media: MediaSource, row: Mapping[str, Any], plan: FilePlan) -> tuple[int, str]:
    """Size and SHA-256 of the file's real content, streamed from the media source, nothing written; in §6
    order MISSING_BLOB / UNSAFE_PATH (a symlink leading outside), CHECKSUM_MISMATCH, then the plan's refusal."""
    size, sha256 = hash_source(media, row["file_path"])
    app_rules.require_checksum(row["sha256"], sha256)
    if plan.refused is not None:
        raise plan.refused
    return size, sha256


def read_file_document(row: Mapping[str, Any], users: set[Any], media: MediaSource, blobs: BlobStore) -> dict[str, Any]:
    """A file row's document as a dry run makes it: every §6 rule, the content read to get its real size
    and hash, no blob written (``blob_url`` is where the blob belongs)."""
    plan = plan_file(row, users, blobs)
    return plan.document(*read_file_content(media, row, plan))


class ShardNotEmpty(Exception):
    """A run that took its shard to be empty (the control DB had no record of writing it) found one of
    its documents, or a file's blob, there. Nothing of the refused request was written; the run goes on
    from its last checkpoint, counting and reading the shard as any other run does."""


class AppMigration:
    """One run of one app entity over one shard."""

    def __init__(
        self,
        params: AppRunParameters,
        django: Engine,
        state: Engine,
        firestore: DocumentWriter,
        *,
        media: MediaSource | None = None,
        blobs: BlobStore | None = None,
        log: Callable[[str], None] = lambda _: None,
        progress: Callable[[Counts], None] = lambda _: None,
        lock_wait_seconds: float = 120.0,
    ) -> None:
        if params.entity == "files" and (media is None or blobs is None):
            raise ValueError("files need a media source and a blob store")
        self.params = params
        self.django = django
        self.state = state
        self.firestore = firestore
        self.media = media
        self.blobs = blobs
        self.log = log
        self.progress = progress
        self.lock_wait_seconds = lock_wait_seconds
        self.source = SOURCES[params.entity]
        self.updated_at = app_rules.APP_ENTITIES[params.entity].updated_at_column  # None: auth_user has none
        self.shard_number = app_rules.shard_number(params.shard)
        self.delete_budget: int | None = None  # deletions this full run may make; None: unlimited
        self.migrated_before = 0  # the shard's documents when the run started
        # The shard is taken to be empty (see _run): nothing is read back, and inserts are creates.
        self.creates = False
        self.copier: ThreadPoolExecutor | None = None  # the run's blob-copy thread, while it runs
        self._parents_seen: dict[str, dict[Any, bool]] = {}  # collection → parent id → migrated?
        self._parents_locks = {"users": threading.Lock(), "files": threading.Lock()}
        self.book = RunBook(
            entity=params.entity,
            partition_key=params.shard,
            run_id=params.run_id,
            usuario=params.usuario,
            mode=params.mode,
            dry_run=params.dry_run,
            parameters={"mode": params.mode},
            extra={"allow_mass_delete": params.allow_mass_delete},
            log=log,
        )

    def path(self, legacy_id: int) -> str:
        return f"{self.params.entity}/{legacy_id}"

    # --- the run -------------------------------------------------------------------------

    def run(self) -> Result:
        started = time.monotonic()
        if self.state not in _SCHEMAS_READY:  # once per control DB engine and process, not per shard's run
            schema.create_schemas(self.state, schema.state_metadata, schema.app_state_metadata, log=self.log)
            _SCHEMAS_READY.add(self.state)
        p = self.params
        # One writer per entity and shard; nothing of the run's state is touched before the lock.
        with self.state.connect() as state, locks.exclusive(state, p.entity, p.shard, self.lock_wait_seconds):
            self.book.close_interrupted_runs(state)
            try:
                return self._run(state, started)
            except ShardNotEmpty as found:
                state.rollback()
                self.log(f"{found}: counting and reading the shard's documents from here on")
                return self._run(state, started, going_on=True)

    def _run(self, state: Connection, started: float, going_on: bool = False) -> Result:
        """The run, under its lock; ``going_on``: again, after the shard was found not to be empty. Nothing of
        the refused request was written: the run goes on as if resuming itself (its ledger rows past its
        checkpoint settled), and counts the shard and reads its documents before each page is written. (A run
        takes its shard to be empty only when it resumes nothing, so it goes on from its own checkpoint, if
        any, and has resumed no other run.)"""
        p = self.params
        with ExitStack() as stack:
            checkpoint = None if p.dry_run else self.book.resumable_checkpoint(state)
            incremental = p.mode == "incremental" and self.updated_at is not None
            if p.mode == "incremental" and not incremental:
                self.log(f"{p.entity} have no updated_at: this incremental run reads the whole shard, deletes nothing")
            since = self.book.last_watermark(state) if incremental else None
            mode = "incremental" if since is not None else "full"
            if incremental and since is None:
                self.log("no earlier successful run: this incremental run sweeps the whole shard")
            counts = Counts.from_dict(checkpoint["counts"]) if checkpoint else Counts()
            watermark = checkpoint["watermark"] if checkpoint else self._source_watermark()
            after = checkpoint["last_legacy_id"] if checkpoint else -1
            resumed_from = checkpoint["run_id"] if checkpoint and not going_on else None
            if resumed_from:
                self.log(f"resuming after legacy id {after}, checkpointed by run {resumed_from}")
            if resumed_from or going_on:
                self._settle_write_ahead(state, resumed_from or p.run_id, after)
            # A shard this control DB never saw written to this database is taken to be empty, not counted
            # (the emulator scans the whole collection to count one shard). Its inserts are creates, which
            # Firestore refuses if a document exists after all (ShardNotEmpty).
            written = p.dry_run or self._written_before(state)
            self.creates = not written and checkpoint is None
            read_before = counts.read
            # Reads run ahead of the batches on threads of their own (they wait on Firestore and the
            # Django DB, not on the GIL): the shard's document count, the next page of source rows and
            # the parents its rows name; so do a batch's blob copies (see _decide).
            self.copier = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-copy"))
            readers = stack.enter_context(ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="app-read"))
            # The shard's documents before this run (a count aggregation, nothing read): a full run's
            # deletion budget, and, when there are none (a first run), no document needs reading back.
            # Counted while the run is recorded and its first pages are read.
            counted = readers.submit(self.firestore.count, p.entity, p.shard) if not self.creates else _resolved(0)
            batches = stack.enter_context(closing(self._prepared_batches(readers, counted, after, since)))
            if not written:
                self._record_written(state)  # before any write; committed with the run's start
            self.book.record_start(state, mode, resumed_from)
            sweeps = mode == "full" and p.mode == "full"
            try:
                self.migrated_before = counted.result()
                if sweeps and not p.allow_mass_delete:
                    self.delete_budget = int(self.migrated_before * p.max_delete_share)
                last_report = time.monotonic()
                before = Counts.from_dict(counts.as_dict())
                # Firestore commits run on threads, IN_FLIGHT batches at a time, while the next batch is
                # read and decided (the client waits on the network without the GIL); each batch's
                # checkpoint follows its own commit and every earlier one, in order.
                in_flight: deque[Pending] = deque()
                committer = shared_pool("firestore-commit", 2 * IN_FLIGHT)
                try:
                    for prepared in batches:
                        batch = self._apply_batch(state, prepared, counts, before.deleted)
                        while len(in_flight) >= IN_FLIGHT:
                            self._finish(state, in_flight.popleft(), watermark)
                        if batch.writes:
                            locks.require_held(state, p.entity, p.shard)
                        batch.future = committer.submit(self._commit_writes, batch.writes)
                        batch.last_id, batch.counts = int(prepared.rows[-1]["id"]), counts.as_dict()
                        in_flight.append(batch)
                        after = batch.last_id
                        if time.monotonic() - last_report >= 5:
                            self.progress(counts)
                            last_report = time.monotonic()
                    while in_flight:
                        self._finish(state, in_flight.popleft(), watermark)
                finally:  # nothing of this run's is left running when it ends (its ledger settles on that)
                    wait([batch.future for batch in in_flight if batch.future is not None])
                if sweeps:
                    self._sweep_gone(state, counts, before)
                self.book.checkpoint(state, after, counts.as_dict(), watermark, "done")
                self._commit(state)
                self.progress(counts)
            except ShardNotEmpty:  # not a failure: the caller goes on from the last checkpoint
                raise
            except BaseException:
                self.book.record_end(state, "failed", counts.as_dict(), None, self.state.begin)
                raise
            self.book.record_end(state, "succeeded", counts.as_dict(), watermark, self.state.begin)
        return Result(counts, mode, resumed_from, watermark, time.monotonic() - started, counts.read - read_before)

    def _written_before(self, state: Connection) -> bool:
        """Whether a run may have written documents of this entity and shard to the writer's database: it
        recorded so, or runs of this entity and shard are on record while no database is (a release that
        kept no such record wrote them)."""
        w, r = schema.app_shards_written, schema.runs
        p = self.params
        databases = set(state.scalars(select(w.c.database).where(w.c.entity == p.entity, w.c.partition_key == p.shard)))
        if databases:
            return self.firestore.database in databases
        earlier = select(r.c.run_id).where(
            r.c.entity == p.entity, r.c.partition_key == p.shard, r.c.run_id != p.run_id, r.c.dry_run.is_(False)
        )
        return state.scalar(earlier.limit(1)) is not None

    def _record_written(self, state: Connection) -> None:
        """Record that this run may write documents of its shard to the writer's database (under the lock,
        so no other run of this entity and shard inserts the same row)."""
        state.execute(
            schema.app_shards_written.insert().values(
                database=self.firestore.database,
                entity=self.params.entity,
                partition_key=self.params.shard,
                run_id=self.params.run_id,
                at=datetime.now(UTC),
            )
        )

    def _commit_writes(self, writes: Sequence[Write]) -> None:
        if writes and not self.params.dry_run:
            self.firestore.commit(writes)

    def _finish(self, state: Connection, batch: Pending | None, watermark: datetime | None) -> None:
        """Wait for ``batch``'s Firestore commit, then move the blobs of its deleted files away and
        checkpoint it."""
        if batch is None:
            return
        assert batch.future is not None
        try:
            batch.future.result()  # a failed commit fails the run here; its checkpoint is never written
        except PartialCommit as failed:
            if failed.already_exists:
                raise ShardNotEmpty(f"{self.params.entity} of {self.params.shard}: a document taken to be new "
                                    "exists already") from failed  # fmt: skip
            raise
        self._move_blobs_away(batch.blob_deletions)
        self.book.checkpoint(state, batch.last_id, batch.counts, watermark, "running")
        self._commit(state)

    def _commit(self, state: Connection) -> None:
        if self.params.dry_run:
            state.rollback()
        else:
            state.commit()

    # --- source --------------------------------------------------------------------------

    def _eligible(self) -> Any:
        return django_schema.shard_filter(self.source, self.shard_number)

    def _source_watermark(self) -> datetime | None:
        if self.updated_at is None:
            return None
        with self.django.connect() as source:
            latest = source.scalar(select(func.max(self.source.c[self.updated_at])).where(self._eligible()))
        return rules.coerce_datetime(latest)

    def _page(self, after: int, since: datetime | None) -> list[dict[str, Any]]:
        """The shard's next ``batch_size`` source rows after legacy id ``after`` (changed since ``since``)."""
        return source_page(self.django, self.params.entity, self.shard_number, after, page_rows(self.params), since)

    def _prepared_batches(
        self, readers: ThreadPoolExecutor, counted: Future[int], after: int, since: datetime | None
    ) -> Lookahead:
        """The shard's source rows in id order, a page of ``batch_size`` at a time (keyset pages), each page
        prepared (:meth:`_prepare`: its parents and documents read, its rows decided, its blobs copied) on
        ``readers`` up to ``LOOKAHEAD`` pages ahead of the caller, who writes a page's ledger and commits
        it meanwhile. Reading starts at once; close it to stop when the caller stops early."""
        lookahead = Lookahead(LOOKAHEAD)

        def produce() -> None:
            position = after
            try:
                while not lookahead.stopped:
                    rows = self._page(position, since)
                    if not rows:
                        break
                    position = int(rows[-1]["id"])
                    if not lookahead.offer(readers.submit(self._prepare, rows, counted)):
                        return
                    if len(rows) < page_rows(self.params):  # a short page is the shard's last: no query for none
                        break
            except BaseException as problem:
                failed: Future[Prepared] = Future()
                failed.set_exception(problem)
                lookahead.offer(failed)
                return
            lookahead.offer(None)

        readers.submit(produce)
        return lookahead

    def _prepare(self, rows: list[dict[str, Any]], counted: Future[int]) -> Prepared:
        """What a page needs before its ledger is written: the parents its rows name, the documents its
        rows already have (none to read when the shard was empty at the start: ``counted``), and each
        row's decision — users' and filters' before the count is known (they do not depend on what is
        stored), files' after (a stored file may keep its blob)."""
        parents = self._parents(rows)
        files = self.params.entity == "files"
        decisions = [] if files else self._decide(rows, {}, parents)
        fresh = counted.result() == 0
        existing = {} if fresh else self.firestore.get_many([self.path(int(row["id"])) for row in rows])
        return Prepared(rows, existing, self._decide(rows, existing, parents) if files else decisions)

    def _parents(self, rows: Sequence[Mapping[str, Any]]) -> Parents:
        """Which users (files, filters) and files (filters) that ``rows`` name are migrated (a filter's
        two lookups at once)."""
        entity = self.params.entity
        file_ids = {row["file_id"] for row in rows} if entity == "filters" else set()
        files = shared_pool("parent-lookup", 2).submit(self._migrated, "files", file_ids) if file_ids else None
        users = self._migrated("users", {row["user_id"] for row in rows} if entity != "users" else set())
        return Parents(users, files.result() if files is not None else self._migrated("files", file_ids))

    # --- one batch -----------------------------------------------------------------------

    def _apply_batch(self, state: Connection, prepared: Prepared, counts: Counts, deleted_before: int) -> Pending:
        """Count a prepared page's decisions and commit their ledger and quarantine rows (write-ahead); the
        Firestore writes and blob moves are returned, for the caller to carry out."""
        p = self.params
        rows, existing, decisions = prepared.rows, prepared.existing, prepared.decisions
        writes: list[Write] = []
        ledger: list[dict[str, Any]] = []
        quarantine: list[dict[str, Any]] = []
        blob_deletions: list[tuple[str, str]] = []
        now = datetime.now(UTC)
        counts.read += len(rows)
        for decision in decisions:
            path = self.path(decision.legacy_id)
            old = existing.get(path)
            previous = to_ledger(old) if old is not None else None
            if decision.document is None:
                counts.quarantined[decision.reason or ""] += 1
                quarantine.append(self._quarantine_row(decision, now))
                if old is not None:  # once migrated, now refused: the document goes (kept in the ledger)
                    counts.deleted += 1
                    move = self._blob_move(old)
                    blob_deletions += [move] if move else []
                    writes.append(Write(path, None))
                    kept = move[1] if move else None
                    ledger.append(self._ledger_row(decision.legacy_id, path, "deleted", None, previous, kept, now))
                continue
            digest = decision.digest or app_rules.document_hash(p.entity, decision.document)
            if old is not None and old.get("content_hash") == digest:
                counts.unchanged += 1
                continue
            action = "inserted" if old is None else "updated"
            setattr(counts, action, getattr(counts, action) + 1)
            stored = {**decision.document, "shard": p.shard, "content_hash": digest, "run_id": p.run_id,
                      "migrated_at": now}  # fmt: skip
            writes.append(Write(path, stored, create=self.creates and old is None))
            ledger.append(
                self._ledger_row(decision.legacy_id, path, action, digest, previous, decision.blob_backup, now)
            )
        self._refuse_mass_delete(counts.deleted - deleted_before)
        if p.dry_run:
            return Pending()
        ids = [decision.legacy_id for decision in decisions]
        q = schema.quarantine
        # One array parameter, not an IN list: psycopg re-parses a long query's text on every execution.
        mine = and_(q.c.entity == p.entity, q.c.partition_key == p.shard)
        state.execute(delete(q).where(mine, store.one_of(state, q.c.legacy_id, ids)))
        store.insert_rows(state, q, quarantine)  # COPY on PostgreSQL
        store.insert_rows(state, schema.ledger, ledger)
        state.commit()  # write-ahead: the ledger knows before Firestore changes
        return Pending(writes, blob_deletions)

    def _settle_write_ahead(self, state: Connection, killed: str, after: int) -> None:
        """The killed run's ledger rows past its checkpoint were written ahead of Firestore: keep those
        whose change did reach Firestore (the document carries that run's id, or is gone for a
        delete) and drop the others, which this run will redo and record as its own."""
        ledger = schema.ledger
        rows = state.execute(
            select(ledger.c.id, ledger.c.target_id, ledger.c.action).where(
                ledger.c.run_id == killed,
                ledger.c.entity == self.params.entity,
                ledger.c.partition_key == self.params.shard,
                ledger.c.legacy_id > after,
            )
        ).all()
        if not rows:
            return
        found = self.firestore.get_many([row.target_id for row in rows], fields=["run_id"])

        def happened(action: str, document: Mapping[str, Any] | None) -> bool:
            if action == "deleted":
                return document is None
            return document is not None and document.get("run_id") == killed

        never = [row.id for row in rows if not happened(row.action, found.get(row.target_id))]
        if never:
            state.execute(delete(ledger).where(store.one_of(state, ledger.c.id, never)))
        state.commit()

    def _write(self, state: Connection, writes: Sequence[Write]) -> None:
        if not writes:
            return
        locks.require_held(state, self.params.entity, self.params.shard)
        self.firestore.commit(writes)

    def _quarantine_row(self, decision: Decision, at: datetime) -> dict[str, Any]:
        return {
            "entity": self.params.entity,
            "partition_key": self.params.shard,
            "legacy_id": decision.legacy_id,
            "reason": decision.reason,
            "detail": (decision.detail or "")[:255],
            "run_id": self.params.run_id,
            "created_at": at,
        }

    def _ledger_row(
        self,
        legacy_id: int,
        path: str,
        action: str,
        digest: str | None,
        previous: Any,
        blob_backup: str | None,
        at: datetime,
    ) -> dict[str, Any]:
        kept = None if previous is None and blob_backup is None else {"document": previous, "blob": blob_backup}
        return {
            "entity": self.params.entity,
            "partition_key": self.params.shard,
            "legacy_id": legacy_id,
            "target_id": path,
            "action": action,
            "content_hash": digest,
            "previous": kept,
            "run_id": self.params.run_id,
            "at": at,
        }

    # --- the rules, per entity ---------------------------------------------------------------

    def _decide(
        self, rows: Sequence[Mapping[str, Any]], existing: Mapping[str, Any], parents: Parents
    ) -> list[Decision]:
        """Each row's decision, in the rows' order. Files are read and copied on the run's one blob-copy
        thread, a page at a time in the order the pages come: a media source is used by one thread (an
        SFTP session must be), and a copy is a dozen short system calls, each giving up the GIL. Two
        threads copying local files at once took 228-237 µs a file against 125-130 µs on one, with
        twice the CPU (10,000 small files, tmpfs and ext4 alike); a files pass of 10,636 files on tmpfs
        took 7.5-7.6 s with two copy threads and 5.3-6.1 s with one."""

        def file(row: Mapping[str, Any], decision: Decision) -> dict[str, Any]:
            return self._file(row, existing.get(self.path(decision.legacy_id)), parents.users, decision)

        def decide(row: Mapping[str, Any]) -> Decision:
            return decide_row(entity, row, parents, file)

        def decide_all(rows: Sequence[Mapping[str, Any]]) -> list[Decision]:
            return [decide(row) for row in rows]

        entity = self.params.entity
        if entity == "files" and self.copier is not None:
            return self.copier.submit(decide_all, rows).result()
        return decide_all(rows)

    def _migrated(self, collection: str, ids: set[Any]) -> set[Any]:
        """Which of ``ids`` have a document in ``collection`` (a reference must name a migrated record).

        Each parent is looked up once per run (pages of one shard name the same users again and again):
        the answer is the parent collection as the run first found it."""
        with self._parents_locks[collection]:  # pages prepared at once share their lookups, not repeat them
            known = self._parents_seen.setdefault(collection, {})
            wanted = sorted(i for i in ids if i is not None and i not in known)
            if wanted:
                found = self.firestore.get_many([f"{collection}/{i}" for i in wanted], fields=["legacy_id"])
                known.update((i, found.get(f"{collection}/{i}") is not None) for i in wanted)
            return {i for i in ids if i is not None and known.get(i)}

    def _file(
        self, row: Mapping[str, Any], old: Mapping[str, Any] | None, users: set[Any], decision: Decision
    ) -> dict[str, Any]:
        """The file's document, its blob in place. Reasons in §6 order: ORPHAN_USER, UNSAFE_PATH,
        MISSING_BLOB, CHECKSUM_MISMATCH, INVALID_VALUE; a quarantined file gets no blob."""
        assert self.media is not None and self.blobs is not None
        plan = plan_file(row, users, self.blobs)
        key = plan.key
        if plan.refused is not None or self.params.dry_run or (old is not None and old.get("sha256")):
            # read the content only: an invalid or dry-run file gets no blob, a known one may be unchanged
            size, sha256 = read_file_content(self.media, row, plan)
            stored = self.blobs.stat(key)
            same = old is not None and old.get("sha256") == sha256 and stored is not None and stored.size == size
            if not (self.params.dry_run or same):
                decision.blob_backup = self._backup_blob(key) if old is not None else None
                copied = copy_blob(self.media, row["file_path"], self.blobs, key, expected_sha256=sha256)
                size, sha256 = copied.size, copied.sha256
        else:  # a blank recorded sha256 (CHAR(64): spaces) counts as NULL, as in app_rules.require_checksum
            if self.creates and self.blobs.stat(key) is not None:  # an empty shard's blob is never overwritten
                raise ShardNotEmpty(f"files of {self.params.shard}: a blob taken to be new exists already")
            recorded = (row["sha256"] or "").strip() or None
            copied = copy_blob(self.media, row["file_path"], self.blobs, key, expected_sha256=recorded)
            size, sha256 = copied.size, copied.sha256
        return plan.document(size, sha256)

    # --- blobs a run overwrites or deletes -----------------------------------------------------

    def _kept_as(self, key: str) -> str:
        """Where this run keeps a blob it overwrites or deletes (the ledger names it, for a rollback)."""
        return f"{BACKUP_PREFIX}/{self.params.run_id}/{key}"

    def _blob_move(self, document: Mapping[str, Any]) -> tuple[str, str] | None:
        """A file document about to be deleted: its blob's key and where it is kept (None: not a file)."""
        if self.params.entity != "files":
            return None
        key = app_rules.blob_key(document["user_id"], document["file_id"])
        return key, self._kept_as(key)

    def _backup_blob(self, key: str) -> str | None:
        """Keep the blob at ``key`` before it is overwritten; its backup key, or None if none was there."""
        assert self.blobs is not None
        if self.blobs.stat(key) is None:
            return None
        backup = self._kept_as(key)
        self.blobs.copy(key, backup)
        return backup

    def _move_blobs_away(self, moves: Sequence[tuple[str, str]]) -> None:
        """The blobs of deleted file documents, moved to their backup keys (the ledger names them)."""
        assert not moves or self.blobs is not None
        for key, backup in moves:
            if self.blobs is not None and self.blobs.stat(key) is not None:
                self.blobs.copy(key, backup)
                self.blobs.delete(key)

    # --- deletions of a full run -----------------------------------------------------------

    def _gone(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """The shard's documents whose source row no longer exists in the shard (streamed)."""
        page: list[tuple[str, dict[str, Any]]] = []

        def missing(page: list[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
            ids = [int(data["legacy_id"]) for _, data in page]
            t = self.source
            with self.django.connect() as source:
                present = set(source.scalars(select(t.c.id).where(self._eligible(), store.one_of(source, t.c.id, ids))))
            yield from ((path, data) for path, data in page if int(data["legacy_id"]) not in present)

        for document in self.firestore.stream_collection(self.params.entity, self.params.shard):
            page.append((document.path, document.data))
            if len(page) >= SWEEP_PAGE:
                yield from missing(page)
                page = []
        if page:
            yield from missing(page)

    def _refuse_mass_delete(self, deleting: int) -> None:
        if self.delete_budget is None or deleting <= self.delete_budget:
            return
        p = self.params
        migrated = self.migrated_before
        raise MassDeleteRefused(
            f"a full run would delete {deleting} {p.entity} of {p.shard}"
            + (f" ({deleting / migrated:.1%} of {migrated} migrated)" if migrated else "")
            + f", more than the {p.max_delete_share:.0%} a run may delete: stopped before deleting. Check "
            "DJANGO_DB_URL and the source; if the deletions are meant, run again with allow_mass_delete: true"
        )

    def _sweep_gone(self, state: Connection, counts: Counts, before: Counts) -> None:
        """Delete the documents whose source row is gone (each kept in the ledger first).

        Every row this run (and the run it resumed) migrated has exactly one document, and the shard
        now holds the documents it held at the start plus those this run inserted, less those it
        deleted: when the two agree nothing is gone and nothing is read. Otherwise the gone
        documents are counted first and the run stops — before deleting any of them — if they would
        take its deletions past ``max_delete_share`` (an empty or wrong source never empties a shard).
        """
        p = self.params
        held = self.migrated_before + (counts.inserted - before.inserted) - (counts.deleted - before.deleted)
        if held == counts.migrated:
            return
        self._refuse_mass_delete(counts.deleted - before.deleted + sum(1 for _ in self._gone()))
        now = datetime.now(UTC)
        batch: list[tuple[str, dict[str, Any]]] = []

        def flush() -> None:
            counts.deleted += len(batch)
            if p.dry_run:
                return
            moves = []
            ledger = []
            for path, data in batch:
                move = self._blob_move(data)
                moves += [move] if move else []
                kept = move[1] if move else None
                ledger.append(
                    self._ledger_row(int(data["legacy_id"]), path, "deleted", None, to_ledger(data), kept, now)
                )
            store.insert_rows(state, schema.ledger, ledger)
            state.commit()
            self._write(state, [Write(path, None) for path, _ in batch])
            self._move_blobs_away(moves)

        for item in self._gone():
            batch.append(item)
            if len(batch) >= SWEEP_PAGE:
                flush()
                batch = []
        if batch:
            flush()
