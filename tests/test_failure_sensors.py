"""The failure sensors (DESIGN §7) on real Dagster instances — SQLite and PostgreSQL storage — with the
alerts going to a real local HTTP server and a real local SMTP server: a failed migration run gives
exactly one alert with its category, partition, entity and run link (no secret in it), also when the
sensor runs again after a restart; a failed ERROR check gives one alert whether it is blocking or not;
a WARN failure or a pass gives none."""

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSelection,
    DagsterInstance,
    Definitions,
    MaterializeResult,
    PreviewWarning,
    StaticPartitionsDefinition,
    asset,
    build_run_status_sensor_context,
    build_sensor_context,
    define_asset_job,
    multi_asset_check,
)
from pytest_httpserver import HTTPServer

from migration_assets.launch import KIND_TAG, MIGRATION
from migration_assets.operations.sensors import check_failure_sensor, migration_failure_sensor
from resources.alerts import AlertResource
from resources.errors import Category, MigrationError
from resources.policy import MigrationPolicy
from tests.mail import Mailbox

from .dagster_services import plain_postgres_url

warnings.filterwarnings("ignore", category=PreviewWarning)
PARTITIONS = StaticPartitionsDefinition(["HSJ", "CLN01"])
SECRET = "s3cr3t-pw"
OUTCOMES: dict[str, dict[str, Any]] = {}  # check name → what the check returns in the next run


@asset(name="patients", partitions_def=PARTITIONS)
def patients(context: AssetExecutionContext) -> MaterializeResult:
    if context.partition_key == "CLN01":
        raise MigrationError(
            Category.CONNECTION_ERROR, f"could not connect to postgresql://app:{SECRET}@db.internal/clinical"
        ).as_failure()
    return MaterializeResult(metadata={"rows_read": 3})


@multi_asset_check(
    specs=[
        AssetCheckSpec("integrity", asset="patients", partitions_def=PARTITIONS, blocking=True),
        AssetCheckSpec("coverage", asset="patients", partitions_def=PARTITIONS),
    ],
    can_subset=True,
)
def verification(context: AssetCheckExecutionContext) -> Iterator[AssetCheckResult]:
    for key in context.selected_asset_check_keys:
        yield AssetCheckResult(asset_key=key.asset_key, check_name=key.name, **OUTCOMES[key.name])


migration_job = define_asset_job(
    "clinical_migration_job", selection=AssetSelection.assets("patients"), tags={KIND_TAG: MIGRATION}
)
other_job = define_asset_job("not_a_migration", selection=AssetSelection.assets("patients").without_checks())
DEFS = Definitions(assets=[patients], asset_checks=[verification], jobs=[migration_job, other_job])


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def instance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DagsterInstance]:
    """A real Dagster instance: the default SQLite storage, or PostgreSQL (as dagster.yaml configures)."""
    OUTCOMES.clear()
    overrides = None
    if request.param == "postgresql":
        url = plain_postgres_url(request.getfixturevalue("postgres_url"))
        overrides = {"storage": {"postgres": {"postgres_url": url}}}
    home = tmp_path / "home"
    home.mkdir()
    with DagsterInstance.local_temp(str(home), overrides=overrides) as made:
        yield made


@pytest.fixture
def alerts(tmp_path: Path, httpserver: HTTPServer, smtp_server: Mailbox) -> tuple[AlertResource, Mailbox]:
    mailbox = smtp_server
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    resource = AlertResource(
        webhook_url=httpserver.url_for("/hook"),
        smtp_url=mailbox.url,
        email_to="oncall@example.org",
        state_db_url=f"sqlite:///{tmp_path / 'state.db'}",
    )
    return resource, mailbox


def posted(httpserver: HTTPServer) -> list[dict[str, Any]]:
    return [json.loads(request.get_data()) for request, _ in httpserver.log]


def run(instance: DagsterInstance, job: str, partition: str) -> Any:
    definition = DEFS.resolve_job_def(job)
    return definition.execute_in_process(instance=instance, partition_key=partition, raise_on_error=False)


def on_failure(context: Any, resource: AlertResource) -> list[Any]:
    """One evaluation of migration_failure_sensor (AUTO_ROLLBACK off): the run requests it made."""
    return list(migration_failure_sensor(context, alerts=resource, policy=MigrationPolicy()) or [])


def failure_context(instance: DagsterInstance, result: Any) -> Any:
    event = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
    return build_run_status_sensor_context(
        sensor_name="migration_failure_sensor",
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        dagster_event=event,
    ).for_run_failure()


def test_a_failed_migration_run_gives_one_alert_with_its_category_and_link(
    instance: DagsterInstance, alerts: tuple[AlertResource, Mailbox], httpserver: HTTPServer
) -> None:
    resource, mailbox = alerts
    OUTCOMES.update({"integrity": {"passed": True}, "coverage": {"passed": True}})
    result = run(instance, "clinical_migration_job", "CLN01")
    assert not result.success
    context = failure_context(instance, result)
    assert on_failure(context, resource) == []  # AUTO_ROLLBACK off: an alert, no rollback
    (alert,) = posted(httpserver)
    assert alert["type"] == "MIGRATION_FAILED"
    assert (alert["run_id"], alert["job"]) == (result.run_id, "clinical_migration_job")
    assert (alert["entity"], alert["partition"], alert["category"]) == ("patients", "CLN01", "CONNECTION_ERROR")
    assert alert["run_url"].endswith(f"/runs/{result.run_id}")
    assert "could not connect" in alert["message"] and alert["text"]
    (message,) = mailbox.messages
    assert "[MIGRATION_FAILED] patients/CLN01: CONNECTION_ERROR" in message["Subject"]
    for sent in (json.dumps(alert), message.as_string()):
        assert SECRET not in sent

    # the sensor evaluated again (e.g. restarted before its cursor moved), by a new process: nothing more
    again = AlertResource(
        webhook_url=resource.webhook_url,
        smtp_url=resource.smtp_url,
        email_to=resource.email_to,
        state_db_url=resource.state_db_url,
    )
    on_failure(failure_context(instance, result), again)
    assert len(posted(httpserver)) == 1 and len(mailbox.messages) == 1


def test_a_failed_run_that_is_not_a_migration_gives_no_alert(
    instance: DagsterInstance, alerts: tuple[AlertResource, Mailbox], httpserver: HTTPServer
) -> None:
    resource, mailbox = alerts
    result = run(instance, "not_a_migration", "CLN01")
    assert not result.success
    on_failure(failure_context(instance, result), resource)
    assert posted(httpserver) == [] and mailbox.messages == []


def tick(instance: DagsterInstance, resource: AlertResource, cursor: str | None) -> str | None:
    context = build_sensor_context(instance=instance, cursor=cursor, sensor_name="check_failure_sensor")
    return check_failure_sensor(context, alerts=resource, policy=MigrationPolicy()).cursor


def test_failed_error_checks_give_one_alert_each_blocking_or_not(
    instance: DagsterInstance, alerts: tuple[AlertResource, Mailbox], httpserver: HTTPServer
) -> None:
    resource, mailbox = alerts
    # a failure from before the sensor's first tick is not alerted: the cursor starts after it
    OUTCOMES.update({"integrity": {"passed": False, "metadata": {"failures": 9}}, "coverage": {"passed": True}})
    assert not run(instance, "clinical_migration_job", "HSJ").success  # blocking ERROR: the run fails
    cursor = first = tick(instance, resource, None)
    assert cursor is not None and posted(httpserver) == []

    # blocking integrity fails (the run fails too) and non-blocking coverage fails with ERROR (it does not)
    OUTCOMES.update(
        {
            "integrity": {"passed": False, "metadata": {"failures": 3, "mismatched": 3, "mismatched_sample_ids": [7]}},
            "coverage": {"passed": False, "metadata": {"missing": 2, "eligible": 10, "migrated": 8}},
        }
    )
    result = run(instance, "clinical_migration_job", "HSJ")
    assert not result.success
    on_failure(failure_context(instance, result), resource)  # failed by its blocking check: that check alerts
    assert posted(httpserver) == []
    cursor = tick(instance, resource, cursor)
    alerts_sent = sorted(posted(httpserver), key=lambda a: a["details"]["check"])
    assert [(a["type"], a["details"]["check"], a["details"]["blocking"]) for a in alerts_sent] == [
        ("CHECK_FAILED", "coverage", False),
        ("CHECK_FAILED", "integrity", True),
    ]
    coverage, integrity = alerts_sent
    assert (integrity["entity"], integrity["partition"], integrity["run_id"]) == ("patients", "HSJ", result.run_id)
    assert integrity["details"]["failures"] == 3 and "failures 3" in integrity["message"]
    assert coverage["details"]["missing"] == 2
    assert len(mailbox.messages) == 2

    # the same executions again (a tick from an older cursor, as after a crash): no second alert
    tick(instance, resource, first)
    assert len(posted(httpserver)) == 2

    # a WARN failure and passes: nothing
    OUTCOMES.update({"integrity": {"passed": True}, "coverage": {"passed": False, "severity": AssetCheckSeverity.WARN}})
    assert run(instance, "clinical_migration_job", "HSJ").success
    tick(instance, resource, cursor)
    assert len(posted(httpserver)) == 2


def test_an_undelivered_alert_is_retried_by_the_next_tick(
    instance: DagsterInstance, tmp_path: Path, httpserver: HTTPServer
) -> None:
    httpserver.expect_oneshot_request("/hook", method="POST").respond_with_data("busy", status=503)
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    resource = AlertResource(
        webhook_url=httpserver.url_for("/hook"), state_db_url=f"sqlite:///{tmp_path / 's.db'}", base_delay_seconds=0
    )
    OUTCOMES.update({"integrity": {"passed": True}, "coverage": {"passed": True}})
    result = run(instance, "clinical_migration_job", "CLN01")
    on_failure(failure_context(instance, result), resource)  # 503: kept in the outbox
    assert len(httpserver.log) == 1
    tick(instance, resource, None)  # any tick of the check sensor delivers what is due
    assert len(httpserver.log) == 2 and httpserver.log[-1][1].status_code == 200
    tick(instance, resource, None)
    assert len(httpserver.log) == 2
