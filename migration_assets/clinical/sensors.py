"""sistemas_discovery_sensor: every active legacy sistema becomes a partition of the clinical assets."""

from dagster import DefaultSensorStatus, SensorEvaluationContext, SensorResult, SkipReason, sensor

from migration_assets.partitions import sistemas_partitions
from resources.databases import DatabaseResource
from resources.errors import MigrationError
from resources.worker import WorkerResource
from worker.params import sistema_problem


def discover_sistemas(worker: WorkerResource, legacy_db: DatabaseResource) -> tuple[list[str], int]:
    """Active sistema codes usable as partition keys, and how many codes were refused."""
    codes = worker.list_sistemas({"legacy_db_url": legacy_db.url})
    usable = sorted(code for code in codes if sistema_problem(code) is None)
    return usable, len(codes) - len(usable)


@sensor(
    minimum_interval_seconds=300,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a partition of the clinical assets for every active legacy sistema not yet known.",
)
def sistemas_discovery_sensor(
    context: SensorEvaluationContext, worker: WorkerResource, legacy_db: DatabaseResource
) -> SensorResult | SkipReason:
    try:
        usable, refused = discover_sistemas(worker, legacy_db)
    except MigrationError as problem:
        return SkipReason(f"cannot list sistemas: {problem}")
    if refused:
        context.log.warning(f"{refused} active sistema code(s) are not valid partition keys and were skipped")
    known = set(context.instance.get_dynamic_partitions(sistemas_partitions.name))
    invalid = sorted(key for key in known if sistema_problem(key) is not None)
    if invalid:
        context.log.warning(
            f"{len(invalid)} existing partition key(s) are not valid sistemas: runs on them are refused"
        )
    new = [code for code in usable if code not in known]
    if not new:
        return SkipReason(f"no new sistema ({len(usable)} known)")
    context.log.info(f"adding sistemas: {', '.join(new)}")
    return SensorResult(dynamic_partitions_requests=[sistemas_partitions.build_add_request(new)])
