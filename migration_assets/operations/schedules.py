"""Schedules (DESIGN §7): the nightly incremental sync of every partition of every entity, and the
daily retention clean-up.

The sync is one schedule per group (clinical: every known sistema; app: every shard), made from the
registry: each tick asks for one incremental run per partition of the group's job, all entities of
the group in it, as the ``nightly-sync`` usuario. The runs go through the run queue like any other
(the coordinator tags them), so its limits hold: at most 2 migration runs at once, 1 per partition
— and, one usuario, 1 at a time: the night's partitions run one after the other. A partition key that
is not valid (§8) is left out, not launched to be refused.
"""

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from dagster import (
    Config,
    DefaultScheduleStatus,
    OpExecutionContext,
    Output,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    job,
    op,
    schedule,
)
from pydantic import Field

from migration_assets.operations.retention import clean_up
from migration_assets.registry import of_group
from resources.databases import DatabaseResource
from resources.policy import MigrationPolicy

SYNC_USUARIO = "nightly-sync"  # who the nightly runs are recorded as (migration.runs.usuario)
SYNC_CRON = {"clinical": "0 2 * * *", "app": "30 2 * * *"}  # UTC
RETENTION_CRON = "30 4 * * *"  # UTC, after the night's syncs were queued


def sync_run_config(group: str) -> dict:
    """An incremental run of every entity of ``group`` as the nightly usuario."""
    config = {"usuario": SYNC_USUARIO, "mode": "incremental"}
    return {"ops": {entity.name: {"config": dict(config)} for entity in of_group(group)}}


def sync_requests(group: str, keys: list[str], day: str) -> Iterator[RunRequest]:
    """One run request per valid partition key; the run key names the night, so a tick evaluated twice
    launches nothing twice."""
    first = of_group(group)[0]  # the group's entities share their partitions
    for key in keys:
        if first.partition_problem(key) is None:
            yield RunRequest(run_key=f"{group}-sync-{day}-{key}", partition_key=key, run_config=sync_run_config(group))


def nightly_sync(group: str, target: Any) -> ScheduleDefinition:
    """The nightly incremental sync of every partition of ``group`` through ``target`` (its asset job)."""
    partitions_def = of_group(group)[0].partitions_def
    assert partitions_def is not None, f"the {group} entities are partitioned"

    @schedule(
        name=f"{group}_nightly_sync",
        job=target,
        cron_schedule=SYNC_CRON[group],
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING,
        description=f"Every night: an incremental run of every {group} partition, through the run queue.",
    )
    def _sync(context: ScheduleEvaluationContext) -> Iterator[RunRequest] | SkipReason:
        keys = list(partitions_def.get_partition_keys(dynamic_partitions_store=context.instance))
        if not keys:
            return SkipReason(f"no {group} partition yet")
        day = (context.scheduled_execution_time or datetime.now(UTC)).strftime("%Y-%m-%d")
        return sync_requests(group, keys, day)

    return _sync


class RetentionConfig(Config):
    dry_run: bool = Field(default=False, description="count what would go, delete nothing")


RETENTION_TEXT = "the ledger rows of finished runs older than RETENTION_DAYS (never of a partition's latest run)"


@op(description=f"Deletes {RETENTION_TEXT}.")
def retention_cleanup(
    context: OpExecutionContext, config: RetentionConfig, state_db: DatabaseResource, policy: MigrationPolicy
) -> Output[None]:
    done = clean_up(state_db.engine(), policy.retention_days, dry_run=config.dry_run)
    verb = "would delete" if done.dry_run else "deleted"
    before = f"{done.cutoff:%Y-%m-%d %H:%M} UTC"
    context.log.info(f"{verb} {done.ledger_rows} ledger row(s) of {done.runs} run(s) finished before {before}")
    metadata = {"runs": done.runs, "ledger_rows": done.ledger_rows, "cutoff": done.cutoff.isoformat()}
    return Output(None, metadata={**metadata, "dry_run": done.dry_run})


@job(description="The retention clean-up of the control DB (migration.ledger); see RETENTION_DAYS.")
def retention_job() -> None:
    retention_cleanup()


retention_schedule = ScheduleDefinition(
    name="retention_daily",
    job=retention_job,
    cron_schedule=RETENTION_CRON,
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description=f"Every day: deletes {RETENTION_TEXT}.",
)
