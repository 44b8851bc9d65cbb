"""The failure and health sensors (DESIGN §7): a failed migration run, a failed ERROR check, a
dependency down or back → one alert.

- ``migration_failure_sensor``: every failed run that is a migration run (the run queue tags each
  one ``migration/kind=migration``, whatever launched it: a job, an asset page, a backfill, a
  schedule). One alert per run: the first failed step's entity, the partition, the error category
  the step failed with (§8), its message (redacted by the alert), a link to the run.
- ``check_failure_sensor``: a cursor over the execution history of every check of every registry
  entity (coverage, integrity, expectations): each new failed evaluation of ERROR severity — blocking
  or not; a non-blocking one never fails its run, so the run failure sensor never sees it — gives
  one alert. Its first tick starts the cursor at the newest executions (failures from before the
  sensor existed are not alerted). Each tick also retries the alerts whose delivery is due.

- ``health_sensor``: every 5 minutes the checks of ``make health`` (migration_assets/operations/health.py);
  one HEALTH_DOWN per outage of a component, one HEALTH_RECOVERED when it is back.

Alerts are deduplicated by key in the outbox (``migration.alerts``), so a sensor restarted after it
sent, before its cursor moved, sends nothing twice.
"""

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dagster import (
    AssetCheckKey,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from migration_assets.launch import KIND_TAG, MIGRATION
from migration_assets.operations.health import (
    ConfigurationError,
    HealthReport,
    check_all,
    remember,
    resources_from_env,
    transitions,
)
from migration_assets.operations.rollback import rollback_job, rollback_request_config
from migration_assets.registry import ENTITIES
from resources.alerts import Alert, AlertResource, AlertType, webserver_url
from resources.policy import MigrationPolicy

PARTITION_TAG = "dagster/partition"
ENTITY_NAMES = frozenset(entity.name for entity in ENTITIES)
CHECKS = ("coverage", "integrity", "expectations")
HISTORY_PAGE = 100  # check executions read per page, newest first
SUMMARY = {  # the metadata counts a failed check's alert names (ids and counts only, never values)
    "coverage": ("missing", "eligible", "migrated", "quarantined", "coverage_pct"),
    "integrity": ("failures", "mismatched", "unexpected", "duplicates"),
    "expectations": ("failed_expectations", "evaluated_expectations"),
}


# --- failed migration runs ------------------------------------------------------------------------


def _failed_by_a_check(event: Any) -> bool:
    """A step that failed because a blocking check of it failed (check_failure_sensor alerts that)."""
    data = event.step_failure_data
    return data is not None and data.error is not None and data.error.cls_name == "DagsterAssetCheckFailedError"


def failure_alert(context: RunFailureSensorContext) -> Alert | None:
    """The alert for a failed migration run; None for another run, or for a run that failed only
    because a blocking check failed (one failure, one alert: the check's)."""
    run = context.dagster_run
    if run.tags.get(KIND_TAG) != MIGRATION:
        return None
    every = context.get_step_failure_events()
    failures = [event for event in every if not _failed_by_a_check(event)]
    if every and not failures:
        return None
    first = failures[0] if failures else None
    category, message = None, context.failure_event.message or "the run failed"
    if first is not None and first.step_failure_data is not None:
        data = first.step_failure_data
        metadata = data.user_failure_data.metadata if data.user_failure_data is not None else {}
        value = metadata.get("error_category")
        category = getattr(value, "value", value)
        message = data.error.message if data.error is not None else message
    steps = [event.step_key for event in failures if event.step_key]
    entities = [step for step in steps if step in ENTITY_NAMES]  # an asset's step is named for its entity
    return Alert(
        type=AlertType.MIGRATION_FAILED,
        run_id=run.run_id,
        job=run.job_name,
        entity=entities[0] if entities else None,
        partition=run.tags.get(PARTITION_TAG),
        category=str(category) if category else None,
        message=message.strip().splitlines()[0] if message.strip() else "the run failed",
        details={"failed_steps": ", ".join(steps) or "none (the run failed outside its steps)"},
    )


def rollback_request(name: str | None, partition: str | None, run_id: str | None) -> RunRequest | None:
    """A confirmed rollback_job run of ``run_id`` (None: the latest) for that entity and partition;
    its run key makes it one per run, entity and partition, whatever asks for it again."""
    if not name or not partition:
        return None
    return RunRequest(
        run_key=f"rollback:{run_id or 'latest'}:{name}:{partition}",
        run_config=rollback_request_config(name, partition, run_id),
        tags={"migration/rollback_of": run_id or "latest"},
    )


@run_failure_sensor(
    name="migration_failure_sensor",
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    request_job=rollback_job,
    description="A failed migration run → one alert (category, redacted error, link to the run) and, with "
    "AUTO_ROLLBACK, a rollback_job run for that entity and partition.",
)
def migration_failure_sensor(
    context: RunFailureSensorContext, alerts: AlertResource, policy: MigrationPolicy
) -> Iterator[RunRequest]:
    alert = failure_alert(context)
    if alert is None:
        return
    if alerts.send(alert):
        context.log.info(f"alerted {alert.key}")
    request = rollback_request(alert.entity, alert.partition, alert.run_id) if policy.auto_rollback else None
    if request is not None:
        yield request


# --- failed ERROR checks --------------------------------------------------------------------------


def check_keys() -> list[AssetCheckKey]:
    return [AssetCheckKey(entity.asset_key, check) for entity in ENTITIES for check in CHECKS]


def check_alert(key: AssetCheckKey, record: Any) -> Alert | None:
    """The alert for one check execution record, or None unless it failed with ERROR severity."""
    evaluation = record.evaluation
    if record.status.value != "FAILED" or evaluation is None or evaluation.severity.value != "ERROR":
        return None
    metadata = {name: getattr(value, "value", value) for name, value in evaluation.metadata.items()}
    counts = {name: metadata[name] for name in SUMMARY.get(key.name, ()) if isinstance(metadata.get(name), int | float)}
    entity, partition = key.asset_key.path[-1], record.partition
    said = ", ".join(f"{name} {value}" for name, value in counts.items())
    return Alert(
        type=AlertType.CHECK_FAILED,
        key=f"{AlertType.CHECK_FAILED}:{record.run_id}:{entity}:{key.name}:{partition or ''}:{record.id}",
        run_id=record.run_id,
        entity=entity,
        partition=partition,
        category="CHECK_FAILED",
        message=f"{key.name} failed on {entity}/{partition or '-'}" + (f": {said}" if said else ""),
        details={"check": key.name, "blocking": bool(evaluation.blocking), **counts},
    )


def new_executions(context: SensorEvaluationContext, key: AssetCheckKey, after: int) -> list[Any]:
    """The executions of ``key`` with an id above ``after``, oldest first."""
    storage = context.instance.event_log_storage
    found: list[Any] = []
    cursor: int | None = None
    while True:
        page = storage.get_asset_check_execution_history(key, limit=HISTORY_PAGE, cursor=cursor)
        newer = [record for record in page if record.id > after]
        found.extend(newer)
        if len(page) < HISTORY_PAGE or len(newer) < len(page):
            return sorted(found, key=lambda record: record.id)
        cursor = page[-1].id


def _latest_ids(context: SensorEvaluationContext, keys: Sequence[AssetCheckKey]) -> dict[str, int]:
    storage = context.instance.event_log_storage
    latest = {}
    for key in keys:
        page = storage.get_asset_check_execution_history(key, limit=1)
        latest[key.to_user_string()] = page[0].id if page else 0
    return latest


def _run_finished(context: SensorEvaluationContext, run_id: str) -> bool:
    run = context.instance.get_run_by_id(run_id)
    return run is None or run.is_finished


def scan_checks(context: SensorEvaluationContext, cursor: Mapping[str, int]) -> Iterator[tuple[str, int, Alert | None]]:
    """(check, newest id seen, its alert or None) for every new execution of every check, oldest first."""
    for key in check_keys():
        for record in new_executions(context, key, cursor.get(key.to_user_string(), 0)):
            if record.status.value == "PLANNED" and not _run_finished(context, record.run_id):
                break  # no evaluation yet: the cursor stays before it (the record keeps its id when it ends)
            yield key.to_user_string(), record.id, check_alert(key, record)


def _migration_run(context: SensorEvaluationContext, run_id: str) -> str | None:
    """``run_id`` if it is a migration run (the check ran in it), else None (it ran alone: the latest)."""
    run = context.instance.get_run_by_id(run_id)
    return run_id if run is not None and run.tags.get(KIND_TAG) == MIGRATION else None


@sensor(
    name="check_failure_sensor",
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    job=rollback_job,
    description="A failed ERROR check (blocking or not) → one alert and, with AUTO_ROLLBACK, a rollback_job "
    "run for that entity and partition; retries alerts not yet delivered.",
)
def check_failure_sensor(
    context: SensorEvaluationContext, alerts: AlertResource, policy: MigrationPolicy
) -> SensorResult:
    if context.cursor is None:  # the first tick: start from the newest executions
        started = json.dumps(_latest_ids(context, check_keys()))
        alerts.deliver_pending()
        return SensorResult(skip_reason=SkipReason("started at the newest check executions"), cursor=started)
    cursor: dict[str, int] = json.loads(context.cursor)
    sent = 0
    requests: dict[str, RunRequest] = {}
    for name, storage_id, alert in scan_checks(context, cursor):
        cursor[name] = storage_id
        if alert is None:
            continue
        if alerts.send(alert):
            sent += 1
            context.log.info(f"alerted {alert.key}")
        if policy.auto_rollback:
            request = rollback_request(alert.entity, alert.partition, _migration_run(context, alert.run_id))
            if request is not None:
                requests[request.run_key or ""] = request
    delivered = alerts.deliver_pending()
    said = f"{sent} new failed ERROR check(s) alerted; {delivered} pending delivery(ies) made"
    if requests:
        return SensorResult(run_requests=list(requests.values()), cursor=json.dumps(cursor))
    return SensorResult(skip_reason=SkipReason(said), cursor=json.dumps(cursor))


# --- health ---------------------------------------------------------------------------------------


def health_page() -> str:
    """Where a person sees the health sensor's ticks (the UI's automation page)."""
    return f"{webserver_url()}/automation"


def health_tick(cursor: str | None, report: HealthReport, alerts: AlertResource) -> SensorResult:
    """One health check's alerts and the next cursor: a HEALTH_DOWN when a component goes down (or is
    down at the first check), a HEALTH_RECOVERED when it comes back — one each per outage. The cursor
    keeps each component's last known state and how many outages it had: an outage's alerts are keyed
    by that number, so a tick repeated after a crash (its cursor not saved) sends nothing twice."""
    state = json.loads(cursor) if cursor else {}
    states: dict[str, bool] = state.get("states") or {}
    outages: dict[str, int] = dict(state.get("outages") or {})
    down, recovered = transitions(states or None, report)
    for component in down:
        outages[component.name] = outages.get(component.name, 0) + 1
    for kind, components in ((AlertType.HEALTH_DOWN, down), (AlertType.HEALTH_RECOVERED, recovered)):
        for component in components:
            said = "is down" if kind == AlertType.HEALTH_DOWN else "is back"
            alerts.send(
                Alert(
                    type=kind,
                    key=f"{kind}:{component.name}:{outages.get(component.name, 0)}",
                    run_id="health",
                    job="health_sensor",
                    entity=component.name,
                    category=component.category if kind == AlertType.HEALTH_DOWN else None,
                    message=f"{component.name} {said}" + (f": {component.message}" if component.message else ""),
                    run_url=health_page(),
                    details={"outage": outages.get(component.name, 0), "latency_ms": component.latency_ms or 0},
                )
            )
    alerts.deliver_pending()
    changes = ", ".join([f"{c.name} down" for c in down] + [f"{c.name} back" for c in recovered])
    said = f"{len(report.down)} component(s) down" + (f"; {changes}" if changes else "")
    cursor_now = json.dumps({"states": remember(states or None, report), "outages": outages}, sort_keys=True)
    return SensorResult(skip_reason=SkipReason(said), cursor=cursor_now)


@sensor(
    name="health_sensor",
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=300,
    description="Every 5 minutes: SSH, the worker, each database, Firestore and the blob store (make health); "
    "one alert per outage and one on recovery.",
)
def health_sensor(context: SensorEvaluationContext, alerts: AlertResource) -> SensorResult:
    try:
        resources = resources_from_env()
    except ConfigurationError as problem:
        alerts.deliver_pending()
        return SensorResult(skip_reason=SkipReason(f"not configured: {problem}"), cursor=context.cursor)
    return health_tick(context.cursor, check_all(**resources), alerts)
