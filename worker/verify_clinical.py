"""The three streams of one clinical partition for worker/verify.py, read on the legacy host
(``clinic-migrate verify``, DESIGN §5 "Verification on the legacy host", §7).

- *source*: the eligible legacy rows (``eliminado = 0``, the sistema) in id order, read in pages by
  the migration's own reader (worker/source.py) and decided by the migration's own §6 code
  (worker/engine.py :func:`~worker.engine.rules_of_page`, worker/batch.py), with the practitioner
  mapping and the day of the partition's latest finished real run. Encounters look their patients
  up in the target exactly as the migration does (ORPHAN_PATIENT). DUPLICATE_DOCUMENT is decided
  here, streaming: the first passing row of a national id (the lowest legacy id) claims it; the
  documents claimed so far are kept as 128-bit hashes in sorted arrays (16 bytes each).
- *target*: the partition's stored rows in ``legacy_id`` order (keyset pages), each hashed again from
  its stored fields with :func:`worker.batch.hashes` — never the stored ``content_hash``. An
  encounter's patient enters as that patient's legacy id (joined in the same sistema); an encounter
  whose patient is not there is ``dangling:patient``.
- *quarantine*: ``migration.quarantine`` of the entity and sistema, by legacy id.

Every stream is a stream of polars frames (:func:`worker.verify.compare_frames`): nothing is done
in Python per row. Source and target are read on threads of their own, a page ahead (the drivers,
polars and numpy release the GIL), while this thread compares. Memory: a few pages per stream, plus
the claimed documents. No Dagster here: the worker installs on the legacy host.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeVar

import numpy as np
import polars as pl
from sqlalchemy import Connection, Engine, and_, select, tuple_

from worker import batch, engine, rules, schema
from worker.counts import quarantine_frames
from worker.params import ENTITIES, InvalidParameters, sistema_problem
from worker.source import LegacyReader, PageBudget
from worker.verify import Report, compare_frames

# Pages of source and target sized by memory, larger than the migration's: a verification writes
# nothing, so its page costs are a query each, and fewer, larger pages keep the CPU on the rows
# (50,000 narrow rows a page; wide ones, long notes, fewer). Memory: a few pages a stream, flat over
# the partition (480k rows, measured interleaved: pages of 20,000 rows 3.37–3.51 s, 30,000 3.21–3.25 s,
# 50,000 3.08–3.12 s).
VERIFY_PAGES = PageBudget(bytes=4_500_000, max_rows=50_000)
NO_PATIENTS = pl.DataFrame(schema={"legacy_id": pl.Int64, "id": pl.Int64})
DANGLING_PATIENT = "dangling:patient"
_T = TypeVar("_T")


# --- what the migration used -------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationSettings:
    """The §6 inputs a run chose: the practitioner mapping and the day that bounds birth dates."""

    today: date
    mapping: rules.PractitionerMapping | None = None
    run_id: str | None = None  # the run they were taken from (None: no finished real run yet)


def migration_settings(state: Engine, entity: str, sistema: str) -> MigrationSettings:
    """The settings of the latest finished (succeeded or failed), non-dry run of ``entity`` over
    ``sistema`` in ``migration.runs``: its practitioner pair, and the local date it started on (the
    migration's ``date.today()``, on this same host). Without such a run: no mapping, today."""
    r = schema.runs
    if not schema.has_table(state, r):
        return MigrationSettings(date.today())
    with state.connect() as conn:
        row = conn.execute(
            select(r.c.run_id, r.c.parameters, r.c.started_at)
            .where(
                r.c.entity == entity,
                r.c.partition_key == sistema,
                r.c.dry_run.is_(False),
                r.c.finished_at.is_not(None),
            )
            .order_by(r.c.finished_at.desc())
            .limit(1)
        ).first()
    if row is None:
        return MigrationSettings(date.today())
    parameters = row.parameters if isinstance(row.parameters, dict) else {}
    source, target = parameters.get("pract_source"), parameters.get("pract_target")
    both = isinstance(source, int) and isinstance(target, int)
    mapping = rules.PractitionerMapping(source, target) if both else None
    started = rules.coerce_datetime(row.started_at)
    return MigrationSettings(started.astimezone().date() if started else date.today(), mapping, str(row.run_id))


# --- the source --------------------------------------------------------------------------------


class ClaimedDocuments:
    """The national ids claimed so far, as 128-bit hashes (two 64-bit ones of different seeds):
    sorted runs of the first halves with the second halves beside them, two runs merged whenever the
    older is no longer than the newer — O(log n) runs, each hash copied O(log n) times."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(high) for high, _ in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(high.nbytes + low.nbytes for high, low in self.runs)

    @staticmethod
    def hashes(documents: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        frame = documents.to_frame("d").select(
            pl.col("d").hash(seed=0x5EED).alias("high"), pl.col("d").hash(seed=0xC0FFEE).alias("low")
        )
        return frame["high"].to_numpy(), frame["low"].to_numpy()

    def contains(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        """Which of these hashes were claimed."""
        order = np.argsort(high)  # sorted queries: each search starts where the one before ended
        high, low = high[order], low[order]
        found = np.zeros(len(high), dtype=bool)
        for run_high, run_low in self.runs:
            last = len(run_high) - 1
            at = np.minimum(np.searchsorted(run_high, high), last)
            same = run_high[at] == high
            found |= same & (run_low[at] == low)
            # First halves that occur more than once in the run (a 64-bit collision): look at them all.
            for i in np.flatnonzero(same & ~found & (at < last) & (run_high[np.minimum(at + 1, last)] == high)):
                j = int(at[i])
                while j <= last and run_high[j] == high[i] and not found[i]:
                    found[i] = run_low[j] == low[i]
                    j += 1
        claimed = np.empty_like(found)
        claimed[order] = found
        return claimed

    def add(self, high: np.ndarray, low: np.ndarray) -> None:
        """Claim these hashes (none of them claimed yet)."""
        if len(high) == 0:
            return
        order = np.argsort(high, kind="stable")
        self.runs.append((high[order], low[order]))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= len(self.runs[-1][0]):
            (high_a, low_a), (high_b, low_b) = self.runs[-2], self.runs[-1]
            at = np.searchsorted(high_a, high_b, side="right")  # a linear merge: the newer run slotted in
            self.runs[-2:] = [(np.insert(high_a, at, high_b), np.insert(low_a, at, low_b))]

    def decide(self, ruled: pl.DataFrame) -> pl.DataFrame:
        """DUPLICATE_DOCUMENT in a page of transformed patients (ascending legacy ids, each page after
        the one before): a passing row whose national id a passing row before it claimed loses —
        §6: the lowest legacy id of a document in the sistema is the one migrated."""
        passing = ruled[batch.REASON].is_null()
        documents = ruled["national_id"].filter(passing)
        if documents.len() == 0:
            return ruled
        high, low = self.hashes(documents)
        first = documents.is_first_distinct().to_numpy()
        claimed = self.contains(high, low)
        winners = first & ~claimed
        self.add(high[winners], low[winners])
        if winners.all():
            return ruled
        lost = np.zeros(ruled.height, dtype=bool)
        lost[passing.arg_true().to_numpy()[~winners]] = True
        hit = pl.lit(pl.Series(lost))
        return ruled.with_columns(
            pl.when(hit).then(pl.lit(rules.DUPLICATE_DOCUMENT)).otherwise(pl.col(batch.REASON)).alias(batch.REASON),
            pl.when(hit).then(pl.lit(engine.DUPLICATE_DETAIL)).otherwise(pl.col(batch.DETAIL)).alias(batch.DETAIL),
            pl.when(hit).then(None).otherwise(pl.col(batch.HASH)).alias(batch.HASH),
        )


def source_frames(
    entity: str,
    sistema: str,
    legacy: Engine,
    target: Engine,
    settings: MigrationSettings,
    page: int | None = None,
) -> Iterator[pl.DataFrame]:
    """The source stream, a page at a time (``verify.SOURCE_SCHEMA``): every eligible legacy row after
    §6, in id order — its ``digest``, or the ``reason`` §6 quarantines it for. ``page``: rows per
    page (None: sized by memory, ``VERIFY_PAGES``)."""
    reader = LegacyReader(legacy, entity, sistema, page, VERIFY_PAGES)
    claims = ClaimedDocuments() if entity == "patients" else None

    def decide(rows: pl.DataFrame, lookups: Connection | None) -> pl.DataFrame:
        if entity == "encounters" and lookups is None:  # no patients table: nothing migrated, every one orphan
            eligible = rows.filter(pl.col("eliminado") == 0)
            ruled = batch.transform_encounters(eligible, NO_PATIENTS, mapping=settings.mapping)
        else:
            ruled = engine.rules_of_page(
                entity, sistema, rows, today=settings.today, mapping=settings.mapping, lookups=lookups
            )
        if claims is not None:
            ruled = claims.decide(ruled)
        return ruled.select(
            pl.col("legacy_id").alias("key"), pl.col(batch.HASH).alias("digest"), pl.col(batch.REASON).alias("reason")
        )

    with ExitStack() as stack:
        # Three stages, each a page ahead of the next: the reader's thread fetches, a thread of its
        # own applies §6, the caller compares. The encounters' look-ups go through a connection of
        # the rules' thread alone (as the migration's); SQLite's (the demo's) stay on the caller's.
        lookups: Connection | None = None
        threaded = entity == "patients" or target.dialect.name == "postgresql"
        if entity == "encounters" and schema.has_table(target, schema.patients):
            lookups = stack.enter_context(target.connect())
        # Closed in the reverse order: the rules' thread, then the reader, then the look-ups' connection.
        pages = stack.enter_context(closing(reader.pages(engine.LOWEST)))
        ruled = (decide(rows, lookups) for rows, _ in pages)
        yield from stack.enter_context(closing(ahead(ruled, "source-rules"))) if threaded else ruled


# --- the target --------------------------------------------------------------------------------

_PATIENT_TYPES: dict[str, Any] = {
    "id": pl.Int64, "legacy_id": pl.Int64, "sistema": pl.String, "national_id": pl.String,
    "document_type": pl.String, "given_name": pl.String, "family_name": pl.String, "birth_date": pl.Date,
    "sex": pl.String, "email": pl.String, "phone": pl.String, "practitioner_id": pl.Int64,
    "source_updated_at": pl.Datetime("us", "UTC"),
}  # fmt: skip
_ENCOUNTER_TYPES: dict[str, Any] = {
    "id": pl.Int64, "legacy_id": pl.Int64, "sistema": pl.String, "patient_legacy_id": pl.Int64,
    "practitioner_id": pl.Int64, "occurred_at": pl.Datetime("us", "UTC"), "kind": pl.String, "icd10": pl.String,
    "notes": pl.String, "status": pl.String, "source_updated_at": pl.Datetime("us", "UTC"),
}  # fmt: skip
TARGET_TYPES = {"patients": _PATIENT_TYPES, "encounters": _ENCOUNTER_TYPES}
HASHED = {"patients": batch.PATIENT_FIELDS, "encounters": batch.ENCOUNTER_HASH_FIELDS}


def _target_query(entity: str, sistema: str, after: tuple[int, int] | None, rows: int, unique: bool = False) -> Any:
    """One keyset page of the stored rows, ordered by (legacy_id, id): a legacy id stored twice is
    read twice, wherever the pages break. ``unique``: the target holds a legacy id once per sistema
    (:func:`worker.schema.unique_within`), so the order and the keyset are the legacy id's alone —
    its index's order, where (legacy_id, id) costs PostgreSQL a sort of every page (a third of the
    page's time). An encounter's patient is joined in the same sistema."""
    t = schema.TARGETS[entity]
    if entity == "patients":
        columns = [t.c[name] for name in _PATIENT_TYPES]
        joined: Any = t
    else:
        p = schema.patients
        patient = p.c.legacy_id.label("patient_legacy_id")
        columns = [patient if name == "patient_legacy_id" else t.c[name] for name in _ENCOUNTER_TYPES]
        joined = t.outerjoin(p, and_(p.c.id == t.c.patient_id, p.c.sistema == t.c.sistema))
    query = select(*columns).select_from(joined).where(t.c.sistema == sistema)
    if unique:
        query = query if after is None else query.where(t.c.legacy_id > after[0])
        return query.order_by(t.c.legacy_id).limit(rows)
    if after is not None:
        query = query.where(tuple_(t.c.legacy_id, t.c.id) > tuple_(*after))
    return query.order_by(t.c.legacy_id, t.c.id).limit(rows)


def _postgres_page(conn: Connection, query: Any, types: dict[str, Any]) -> pl.DataFrame:
    """A page through ``COPY (…) TO STDOUT (FORMAT csv)``, parsed by polars (no Python per row).
    Dates travel as days and timestamps as microseconds since the epoch (exact integers); a NULL is
    an unquoted empty field, an empty string a quoted one."""
    compiled = query.compile(dialect=conn.dialect)
    picked = []
    for i, kind in enumerate(types.values()):
        if kind == pl.Date:
            picked.append(f"q.c{i} - DATE '1970-01-01'")
        elif isinstance(kind, pl.Datetime):
            picked.append(f"(EXTRACT(EPOCH FROM q.c{i}) * 1000000)::bigint")
        else:
            picked.append(f"q.c{i}")
    aliases = ", ".join(f"c{i}" for i in range(len(types)))
    sql = f"COPY (SELECT {', '.join(picked)} FROM ({compiled}) AS q({aliases})) TO STDOUT (FORMAT csv)"
    buffer = io.BytesIO()
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor, cursor.copy(sql, compiled.params) as copy:
        for chunk in copy:
            buffer.write(chunk)
    if buffer.tell() == 0:
        return pl.DataFrame(schema=types)
    wire = {n: pl.Int32 if k == pl.Date else pl.Int64 if isinstance(k, pl.Datetime) else k for n, k in types.items()}
    frame = pl.read_csv(buffer.getvalue(), has_header=False, new_columns=list(types), schema=wire)
    return frame.with_columns(pl.col(n).cast(k) for n, k in types.items() if k != wire[n])


def _generic_page(conn: Connection, query: Any, types: dict[str, Any]) -> pl.DataFrame:
    """A page through the driver (SQLite, the demo's target): a naive timestamp is UTC, as written."""
    stamps = {i for i, kind in enumerate(types.values()) if isinstance(kind, pl.Datetime)}
    rows = [
        tuple(rules.coerce_datetime(v) if i in stamps else v for i, v in enumerate(row))
        for row in conn.execute(query).all()
    ]
    return pl.DataFrame(rows, schema=types, orient="row")


def target_frames(entity: str, sistema: str, target: Engine, page: int | None = None) -> Iterator[pl.DataFrame]:
    """The target stream, a page at a time (``verify.TARGET_SCHEMA``): every stored row of the
    partition by legacy id, its ``digest`` recomputed from its stored fields; an encounter whose
    patient is not in the target has no digest and the problem ``dangling:patient``. ``page``: rows
    per page (None: sized by memory, ``VERIFY_PAGES``)."""
    types = TARGET_TYPES[entity]
    if not schema.has_table(target, schema.TARGETS[entity]):
        return
    fetch = _postgres_page if target.dialect.name == "postgresql" else _generic_page
    after: tuple[int, int] | None = None
    rows = page or VERIFY_PAGES.min_rows
    with target.connect() as conn:
        unique = schema.unique_within(conn, schema.TARGETS[entity], ("sistema", "legacy_id"))
        conn.rollback()
        while True:
            frame = fetch(conn, _target_query(entity, sistema, after, rows, unique), types)
            conn.rollback()
            if frame.height == 0:
                return
            after = (int(frame["legacy_id"][-1]), int(frame["id"][-1]))
            digests = batch.hashes(frame, HASHED[entity])
            if entity == "encounters":
                dangling = pl.col("patient_legacy_id").is_null()
                problems = pl.when(dangling).then(pl.concat_list([pl.lit(DANGLING_PATIENT)]))
                digest = pl.when(dangling).then(None).otherwise(pl.lit(digests))
            else:
                problems, digest = pl.lit(None, dtype=pl.List(pl.String)), pl.lit(digests)
            yield frame.select(pl.col("legacy_id").alias("key"), digest.alias("digest"), problems.alias("problems"))
            if frame.height < rows:
                return
            rows = page or VERIFY_PAGES.next_rows(frame)


# --- the quarantine ----------------------------------------------------------------------------


# --- all of it ---------------------------------------------------------------------------------


def ahead(items: Iterator[_T], name: str = "verify-reader") -> Iterator[_T]:
    """``items`` produced on a thread of their own, one ahead of the consumer. A failure there is
    raised here; closing this generator stops the producer (and closes ``items`` on its thread)."""
    handed: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    break
                handed.put(("item", item))
            outcome: tuple[str, Any] = ("done", None)
        except BaseException as problem:  # handed to the consumer, raised there
            outcome = ("error", problem)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        handed.put(outcome)

    producer = threading.Thread(target=produce, name=name, daemon=True)
    producer.start()
    try:
        while True:
            kind, value = handed.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting to hand over
            with contextlib.suppress(queue.Empty):
                handed.get(timeout=0.1)


def verify_partition(
    entity: str,
    sistema: str,
    legacy: Engine,
    target: Engine,
    state: Engine,
    *,
    page: int | None = None,
    settings: MigrationSettings | None = None,
) -> Report:
    """Compare one clinical partition: the legacy source through §6, the fields stored in the target,
    the quarantine. ``page``: legacy rows per page (None: sized by memory, as the migration's);
    ``settings``: the §6 inputs (None: those of the partition's latest finished real run)."""
    if entity not in ENTITIES:
        raise InvalidParameters(f"entity must be one of {', '.join(ENTITIES)}")
    if problem := sistema_problem(sistema):
        raise InvalidParameters(problem)
    chosen = settings or migration_settings(state, entity, sistema)
    with (
        closing(source_frames(entity, sistema, legacy, target, chosen, page)) as source,
        closing(ahead(target_frames(entity, sistema, target), "target-reader")) as stored,
        closing(quarantine_frames(state, entity, sistema)) as quarantine,
    ):
        return compare_frames(source, stored, quarantine)
