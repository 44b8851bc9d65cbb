"""The daily retention clean-up (DESIGN §7): ledger rows of finished runs older than ``RETENTION_DAYS``.

What goes: the ledger rows (``migration.ledger``, the versions a rollback would restore) of every run
that finished before the cut-off and is not the latest run of its entity and partition. What stays:

- everything of the latest run of each entity and partition, however old — it can always be rolled
  back, and its ledger says what the partition's current rows replaced;
- runs still running (no ``finished_at``) and ``migration.runs`` itself (the audit trail: who ran what,
  when, with which parameters; the integrity check takes its §6 settings from there);
- quarantine rows. ``migration.quarantine`` holds one row per record (unique by entity, partition and
  legacy id), rewritten by every run that decides that record again: a row left by an old run is the
  record's current answer, not history, and deleting it would turn a quarantined record into a
  missing one. So none is deleted here; a run or a rollback replaces them.

Once a run's ledger is gone it can no longer be rolled back (nor can anything before it).
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, and_, delete, exists, func, select

from worker import schema
from worker.rollback import ROLLED_BACK


@dataclass(frozen=True)
class CleanUp:
    """What one clean-up removed (or, ``dry_run``, would remove)."""

    cutoff: datetime
    runs: int  # runs whose ledger rows went
    ledger_rows: int
    dry_run: bool = False


def expired_runs(state: Engine, cutoff: datetime) -> list[tuple[str, str, str]]:
    """(run_id, entity, partition_key) of the runs finished before ``cutoff`` that a later real run of
    the same entity and partition followed (so none is the latest of its partition): a dry run writes
    no ledger, and a rolled-back run leaves the one before it the latest again."""
    if not schema.has_table(state, schema.runs):
        return []
    r, later = schema.runs, schema.runs.alias("later")
    followed = exists().where(
        later.c.entity == r.c.entity,
        later.c.partition_key == r.c.partition_key,
        later.c.started_at > r.c.started_at,
        later.c.dry_run.is_(False),
        later.c.status != ROLLED_BACK,
    )
    query = (
        select(r.c.run_id, r.c.entity, r.c.partition_key)
        .where(r.c.finished_at.is_not(None), r.c.finished_at < cutoff, followed)
        .order_by(r.c.finished_at)
    )
    with state.connect() as conn:
        return [(row.run_id, row.entity, row.partition_key) for row in conn.execute(query)]


def clean_up(state: Engine, older_than_days: int, *, now: datetime | None = None, dry_run: bool = False) -> CleanUp:
    """Delete the ledger rows of the runs :func:`expired_runs` names, one run per transaction."""
    if older_than_days < 1:
        raise ValueError("older_than_days must be at least 1")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=older_than_days)
    runs = expired_runs(state, cutoff)
    ledger = schema.ledger
    removed = 0
    if not runs or not schema.has_table(state, ledger):
        return CleanUp(cutoff, 0, 0, dry_run)
    for run_id, entity, partition_key in runs:
        mine = and_(ledger.c.run_id == run_id, ledger.c.entity == entity, ledger.c.partition_key == partition_key)
        with state.begin() as conn:
            if dry_run:
                removed += int(conn.scalar(select(func.count()).select_from(ledger).where(mine)) or 0)
            else:
                removed += conn.execute(delete(ledger).where(mine)).rowcount or 0
    return CleanUp(cutoff, len(runs), removed, dry_run)
