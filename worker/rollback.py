"""Undo one run of one entity and partition from the ledger (DESIGN §5, §7 ``rollback_job``).

No Dagster here: the clinical half runs on the legacy host (``clinic-migrate rollback``); the app half
(``migration_assets/app/rollback.py``) reuses :func:`plan_rollback`, the ledger being in the control DB.

**The plan.** A run's ledger rows, grouped by record (legacy id). The *earliest* row of a record says
what it was before the run (``inserted``: nothing; ``updated``/``deleted``: its ``previous``), so a
record the run touched twice (a retried step re-using its run id) goes back to its state before the
run. Steps come latest change first. A plan is *refused* (:class:`RollbackRefused`, named by run ids,
never by values) when

- a later run (not rolled back) of the same entity and partition changed a record this run changed:
  that run must be rolled back first;
- a run of a *child* entity (``PARENTS``; the registry's, checked by a test) in the same partition,
  not rolled back, wrote to the ledger after this run started: children are undone before parents.

**Applying.** Under the partition's writer lock (worker/locks.py) the plan is made again (what was
shown may be stale), then the target is changed (clinical: one transaction; inserted rows deleted by
id, the others deleted and re-inserted from ``previous`` with their original ids, every column as it
was — content_hash, run_id, migrated_at included), then, in the control DB:

- the run is marked ``rolled_back`` in ``migration.runs``: a second rollback of it is a no-op
  ("already rolled back"), a run so marked never blocks another's rollback, and ``last_watermark``
  (worker/runbook.py; successful runs only) no longer counts it, so an incremental run re-reads
  what it had read;
- the quarantine rows the run wrote in the partition (``run_id`` = the run) are deleted. A run
  rewrites the quarantine of the ranges it covers, so rows it replaced are not brought back: until
  the next run the partition's quarantine may be short (``coverage`` may then count records missing);
- the partition's checkpoint is deleted. A checkpoint only matters while ``running`` (a killed run's
  resume point, ``RunBook.resumable_checkpoint``); left there, the next run could resume after
  records the rollback just undid. Without it the next run starts from the first record.

If the control DB step fails after the target's commit, running the rollback again re-applies the
same steps: deleting and re-inserting by id is idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, Engine, and_, delete, exists, func, insert, select, update

from worker import locks, schema, store
from worker.params import RUN_ID_PATTERN, InvalidParameters, matches, sistema_problem

# Each entity's parents, as in migration_assets/registry.py (which imports Dagster, absent on the
# legacy host); tests/test_rollback.py checks the two agree.
PARENTS: dict[str, tuple[str, ...]] = {
    "patients": (),
    "encounters": ("patients",),
    "users": (),
    "files": ("users",),
    "filters": ("users", "files"),
}
ROLLED_BACK = "rolled_back"
ACTIONS = ("inserted", "updated", "deleted")
UNDO = {"inserted": "delete", "updated": "restore", "deleted": "reinsert"}
CHUNK = 1000
Undo = Literal["delete", "restore", "reinsert"]


class RollbackRefused(InvalidParameters):
    """The run cannot be rolled back now (a later run changed its records, or it is unknown)."""


@dataclass(frozen=True)
class LedgerEntry:
    """One ledger row of the run (``previous`` as stored: JSON)."""

    id: int
    legacy_id: int
    target_id: str | None
    action: str
    previous: Any = None


@dataclass(frozen=True)
class Step:
    """How one record is put back: ``delete`` what the run inserted, or put ``previous`` back
    (``restore`` an updated record, ``reinsert`` a deleted one). ``target_ids``: every target id the
    run's rows name for the record, latest first."""

    legacy_id: int
    undo: Undo
    target_ids: tuple[str, ...]
    previous: Any = None


@dataclass
class RollbackPlan:
    entity: str
    partition_key: str
    run_id: str | None  # None: no run to roll back
    status: str | None = None  # the run's status in migration.runs
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIONS, 0))  # its ledger rows by action
    steps: list[Step] = field(default_factory=list)
    refusal: str | None = None
    blocking_runs: tuple[str, ...] = ()

    @property
    def already_rolled_back(self) -> bool:
        return self.status == ROLLED_BACK

    @property
    def actionable(self) -> bool:
        return self.run_id is not None and self.refusal is None and not self.already_rolled_back

    def summary(self) -> dict[str, Any]:
        """The plan as JSON values: ids and counts only."""
        undo = {kind: sum(1 for s in self.steps if s.undo == kind) for kind in ("delete", "restore", "reinsert")}
        return {
            "entity": self.entity,
            "partition_key": self.partition_key,
            "run_id": self.run_id,
            "run_status": self.status,
            "ledger_rows": dict(self.counts),
            "records": len(self.steps),
            "undo": undo,
            "already_rolled_back": self.already_rolled_back,
            "refusal": self.refusal,
            "blocking_runs": list(self.blocking_runs),
        }


@dataclass
class RollbackResult:
    """What a rollback did (``status``: rolled_back, already_rolled_back or nothing_to_roll_back)."""

    entity: str
    partition_key: str
    run_id: str | None
    status: str
    deleted: int = 0
    restored: int = 0
    reinserted: int = 0
    quarantine_deleted: int = 0
    blobs_restored: int = 0
    blobs_deleted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --- the plan -----------------------------------------------------------------------------------------


def steps_of(entries: Iterable[LedgerEntry]) -> list[Step]:
    """The steps undoing a run's ledger rows: per record, the earliest row says what it was before the
    run; records ordered by their latest row, latest first."""
    by_record: dict[int, list[LedgerEntry]] = {}
    for entry in sorted(entries, key=lambda e: e.id):
        by_record.setdefault(entry.legacy_id, []).append(entry)
    ordered = sorted(by_record.values(), key=lambda rows: rows[-1].id, reverse=True)
    steps = []
    for rows in ordered:
        first = rows[0]
        targets = tuple(dict.fromkeys(r.target_id for r in reversed(rows) if r.target_id is not None))
        undo: Undo = UNDO[first.action]  # type: ignore[assignment]
        steps.append(Step(first.legacy_id, undo, targets, None if undo == "delete" else first.previous))
    return steps


def plan_rollback(state: Engine, entity: str, partition_key: str, run_id: str | None = None) -> RollbackPlan:
    """The plan to undo ``run_id`` (None: the latest real run not rolled back) of ``entity`` in
    ``partition_key``; reads only."""
    with state.connect() as conn:
        return plan_on(conn, entity, partition_key, run_id)


def plan_on(conn: Connection, entity: str, partition_key: str, run_id: str | None) -> RollbackPlan:
    """:func:`plan_rollback` on an open connection (its transaction is left open, nothing written)."""
    if entity not in PARENTS:
        raise InvalidParameters(f"entity must be one of {', '.join(PARENTS)}")
    if not schema.has_table(conn.engine, schema.runs):
        if run_id is None:
            return RollbackPlan(entity, partition_key, None)
        raise RollbackRefused(f"no run {run_id} of {entity}/{partition_key} is recorded")
    r = schema.runs
    mine = and_(r.c.entity == entity, r.c.partition_key == partition_key)
    if run_id is None:
        run = conn.execute(
            select(r.c.run_id, r.c.status, r.c.dry_run, r.c.started_at)
            .where(mine, r.c.dry_run.is_(False), r.c.status != ROLLED_BACK)
            .order_by(r.c.started_at.desc(), r.c.run_id.desc())
            .limit(1)
        ).first()
        if run is None:
            return RollbackPlan(entity, partition_key, None)
    else:
        run = conn.execute(
            select(r.c.run_id, r.c.status, r.c.dry_run, r.c.started_at).where(mine, r.c.run_id == run_id)
        ).first()
        if run is None:
            raise RollbackRefused(f"no run {run_id} of {entity}/{partition_key} is recorded")
    plan = RollbackPlan(entity, partition_key, run.run_id, run.status)
    if run.dry_run:
        plan.refusal = f"run {run.run_id} was a dry run: it wrote nothing to roll back"
        return plan
    if plan.already_rolled_back:
        return plan
    entries = _entries(conn, entity, partition_key, run.run_id)
    for entry in entries:
        plan.counts[entry.action] = plan.counts.get(entry.action, 0) + 1
    plan.steps = steps_of(entries)
    later = _later_runs(conn, entity, partition_key, run.run_id)
    children = _child_runs(conn, entity, partition_key, run.run_id, run.started_at)
    if later or children:
        plan.blocking_runs = tuple(later + [f"{child}:{rid}" for child, rid in children])
        reasons = []
        if later:
            reasons.append(f"later runs of {entity}/{partition_key} changed its records again: {', '.join(later)}")
        if children:
            named = ", ".join(f"{rid} ({child})" for child, rid in children)
            reasons.append(f"runs of child entities in {partition_key} wrote after it: {named}")
        plan.refusal = (
            f"cannot roll back run {run.run_id} of {entity}/{partition_key}: "
            + "; ".join(reasons)
            + " — roll those back first"
        )
    return plan


def _entries(conn: Connection, entity: str, partition_key: str, run_id: str) -> list[LedgerEntry]:
    ledger = schema.ledger
    rows = conn.execute(
        select(ledger.c.id, ledger.c.legacy_id, ledger.c.target_id, ledger.c.action, ledger.c.previous)
        .where(ledger.c.run_id == run_id, ledger.c.entity == entity, ledger.c.partition_key == partition_key)
        .order_by(ledger.c.id)
    ).all()
    return [LedgerEntry(int(r.id), int(r.legacy_id), r.target_id, r.action, r.previous) for r in rows]


def _not_rolled_back(ledger_row: Any) -> Any:
    r = schema.runs
    return ~exists().where(
        r.c.run_id == ledger_row.c.run_id,
        r.c.entity == ledger_row.c.entity,
        r.c.partition_key == ledger_row.c.partition_key,
        r.c.status == ROLLED_BACK,
    )


def _later_runs(conn: Connection, entity: str, partition_key: str, run_id: str) -> list[str]:
    """Runs not rolled back whose ledger rows change a record of ``run_id`` after its last change of it."""
    ledger = schema.ledger
    last = (
        select(ledger.c.legacy_id, func.max(ledger.c.id).label("last_id"))
        .where(ledger.c.run_id == run_id, ledger.c.entity == entity, ledger.c.partition_key == partition_key)
        .group_by(ledger.c.legacy_id)
        .subquery()
    )
    other = ledger.alias("later")
    query = (
        select(other.c.run_id, func.min(other.c.id).label("first"))
        .join(last, and_(other.c.legacy_id == last.c.legacy_id, other.c.id > last.c.last_id))
        .where(
            other.c.entity == entity,
            other.c.partition_key == partition_key,
            other.c.run_id != run_id,
            _not_rolled_back(other),
        )
        .group_by(other.c.run_id)
        .order_by(func.min(other.c.id))
    )
    return [row.run_id for row in conn.execute(query)]


def _child_runs(
    conn: Connection, entity: str, partition_key: str, run_id: str, started_at: datetime | None
) -> list[tuple[str, str]]:
    """(child entity, run id) of the runs not rolled back of ``entity``'s children in the partition
    whose ledger rows are later than the run's start (its first ledger row if it has no start)."""
    children = [child for child, parents in PARENTS.items() if entity in parents]
    if not children:
        return []
    ledger = schema.ledger
    if started_at is None:
        started_at = conn.scalar(select(func.min(ledger.c.at)).where(ledger.c.run_id == run_id))
        if started_at is None:
            return []
    query = (
        select(ledger.c.entity, ledger.c.run_id)
        .where(
            ledger.c.entity.in_(children),
            ledger.c.partition_key == partition_key,
            ledger.c.at > started_at,
            _not_rolled_back(ledger),
        )
        .group_by(ledger.c.entity, ledger.c.run_id)
        .order_by(func.min(ledger.c.id))
    )
    return [(row.entity, row.run_id) for row in conn.execute(query)]


# --- applying -----------------------------------------------------------------------------------------


def finish(state: Connection, plan: RollbackPlan) -> int:
    """The control DB's part, not committed: the run marked rolled back, its quarantine rows of the
    partition deleted, the partition's checkpoint deleted. Returns the quarantine rows deleted."""
    assert plan.run_id is not None
    r, q, c = schema.runs, schema.quarantine, schema.checkpoints
    state.execute(
        update(r)
        .where(r.c.run_id == plan.run_id, r.c.entity == plan.entity, r.c.partition_key == plan.partition_key)
        .values(status=ROLLED_BACK)
    )
    gone = state.execute(
        delete(q).where(q.c.entity == plan.entity, q.c.partition_key == plan.partition_key, q.c.run_id == plan.run_id)
    ).rowcount
    state.execute(delete(c).where(c.c.entity == plan.entity, c.c.partition_key == plan.partition_key))
    return int(gone or 0)


def no_op(plan: RollbackPlan) -> RollbackResult | None:
    """The result when ``plan`` needs nothing written (raises if it is refused); None when it does."""
    if plan.refusal:
        raise RollbackRefused(plan.refusal)
    if plan.run_id is None:
        return RollbackResult(plan.entity, plan.partition_key, None, "nothing_to_roll_back")
    if plan.already_rolled_back:
        return RollbackResult(plan.entity, plan.partition_key, plan.run_id, "already_rolled_back")
    return None


def apply_clinical(
    plan: RollbackPlan, target: Engine, state: Engine | None = None, *, lock_wait_seconds: float = 120.0
) -> RollbackResult:
    """Undo ``plan``'s run on the clinical target (one transaction), then record it in the control DB
    (``state``; None: the target's database). Holds the partition's writer lock throughout and makes
    the plan again under it; a plan refused then raises :class:`RollbackRefused`, nothing written."""
    if plan.entity not in schema.TARGETS:
        raise InvalidParameters(f"entity must be one of {', '.join(schema.TARGETS)}")
    if (early := no_op(plan)) is not None:
        return early
    table = schema.TARGETS[plan.entity]
    same_db = state is None or state is target
    with ExitStack() as stack:
        tconn = stack.enter_context(target.connect())
        sconn = tconn if same_db else stack.enter_context((state or target).connect())
        for conn in dict.fromkeys((sconn, tconn)):
            stack.enter_context(locks.exclusive(conn, plan.entity, plan.partition_key, lock_wait_seconds))
        fresh = plan_on(sconn, plan.entity, plan.partition_key, plan.run_id)
        if not same_db:
            sconn.rollback()
        if (late := no_op(fresh)) is not None:
            return late
        result = RollbackResult(plan.entity, plan.partition_key, fresh.run_id, ROLLED_BACK)
        doomed: list[int] = []
        rows: list[dict[str, Any]] = []
        for step in fresh.steps:
            doomed += [int(t) for t in step.target_ids]
            if step.undo == "delete":
                result.deleted += 1
                continue
            row = store.from_jsonable(table, step.previous)
            doomed.append(int(row["id"]))
            rows.append(row)
            if step.undo == "restore":
                result.restored += 1
            else:
                result.reinserted += 1
        for chunk in _chunks(sorted(set(doomed))):
            tconn.execute(delete(table).where(table.c.id.in_(chunk)))
        for chunk in _chunks(rows):
            tconn.execute(insert(table), list(chunk))
        if not same_db:
            locks.require_held(sconn, plan.entity, plan.partition_key)
            tconn.commit()
        result.quarantine_deleted = finish(sconn, fresh)
        sconn.commit()
    return result


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- the command line (``clinic-migrate rollback``) ---------------------------------------------------


def add_parser(commands: Any) -> None:
    """The ``rollback`` subcommand's arguments (``commands``: the CLI's subparsers)."""
    rollback = commands.add_parser(
        "rollback", help="undo one run of one entity of one sistema (prints the plan only, unless --confirm)"
    )
    rollback.add_argument("--entity", required=True, choices=tuple(schema.TARGETS))
    rollback.add_argument("--sistema", required=True)
    rollback.add_argument("--run-id", help="the run to undo (default: the latest real run not rolled back)")
    rollback.add_argument("--confirm", action="store_true", help="apply it (without: a dry run, nothing written)")
    rollback.add_argument("--lock-wait", type=float, default=120.0, help="seconds to wait for the partition's lock")


def run_cli(args: Any, secrets: Mapping[str, Any], emit: Callable[[dict[str, Any]], None]) -> int:
    """``clinic-migrate rollback``: without ``--confirm`` emit the plan (one JSON object) and write
    nothing; with it, apply and emit the result. A refusal raises :class:`RollbackRefused` (after the
    plan, in a dry run). Secrets: ``target_db_url`` and, if elsewhere, ``state_db_url``."""
    problems = [p for p in (sistema_problem(args.sistema),) if p]
    if args.run_id is not None and not matches(RUN_ID_PATTERN, args.run_id):
        problems.append(f"run_id must match ^{RUN_ID_PATTERN.pattern}$")
    if not args.lock_wait >= 0:
        problems.append("lock_wait must be a number of seconds, 0 or more")
    if not secrets.get("target_db_url"):
        problems.append("stdin JSON lacks target_db_url")
    if problems:
        raise InvalidParameters("; ".join(problems))
    target = schema.make_engine(secrets["target_db_url"])
    state = schema.state_engine(secrets, target)
    plan = plan_rollback(state, args.entity, args.sistema, args.run_id)
    if not args.confirm:
        emit({"dry_run": True, **plan.summary()})
        if plan.refusal:
            raise RollbackRefused(plan.refusal)
        return 0
    result = apply_clinical(plan, target, state, lock_wait_seconds=args.lock_wait)
    emit({"dry_run": False, **result.as_dict()})
    return 0
