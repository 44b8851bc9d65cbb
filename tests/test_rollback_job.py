"""Protection end to end (DESIGN §7): a failure → one alert (a real local HTTP server and a real local SMTP
server) and, with AUTO_ROLLBACK, one rollback request → ``rollback_job`` (the project's own definition and
resources, from the environment) → the target as it was before the failed run, field for field.

- clinical (PostgreSQL rows, undone on the "legacy host" by ``clinic-migrate rollback`` through the
  local worker transport): a migration run that dies mid-way;
- app (Firestore documents and blobs): a run whose ``integrity`` check fails (ERROR, blocking).

A manual rollback without ``confirm`` writes nothing. Real services: MariaDB, PostgreSQL (also the
Dagster instance's storage here), the Firestore emulator."""

import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
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
from sqlalchemy import text

from demo.legacy_data import generate
from migration_assets.definitions import defs
from migration_assets.launch import KIND_TAG, MIGRATION
from migration_assets.operations.sensors import check_failure_sensor, migration_failure_sensor
from resources import alerts_from_env, policy_from_env
from resources.errors import Category, MigrationError
from worker import schema
from worker.engine import Migration
from worker.params import RunParameters
from worker.rollback import ROLLED_BACK

from .conftest import WORKER_COMMAND
from .dagster_services import plain_postgres_url
from .mail import Mailbox
from .test_app import Setup, busiest_shard
from .test_rollback import FailingMigration, _blobs, _documents, _rows, _state

pytestmark = pytest.mark.integration
warnings.filterwarnings("ignore", category=PreviewWarning)
SISTEMA = "HSJ"
INTEGRITY: dict[str, Any] = {}


def failing_definitions(name: str, partition: str) -> Definitions:
    """A stand-in for a migration run of ``name`` that fails (its ledger is written by the real worker
    under this run's id) and an integrity check whose result the test sets."""
    partitions = StaticPartitionsDefinition([partition])

    @asset(name=name, partitions_def=partitions)
    def entity(context: AssetExecutionContext) -> MaterializeResult:
        if not INTEGRITY:
            raise MigrationError(Category.SCRIPT_ERROR, "the worker died mid-way (killed)").as_failure()
        return MaterializeResult()

    @multi_asset_check(specs=[AssetCheckSpec("integrity", asset=name, partitions_def=partitions, blocking=True)])
    def integrity(context: AssetCheckExecutionContext) -> Iterator[AssetCheckResult]:
        yield AssetCheckResult(asset_key=entity.key, check_name="integrity", **INTEGRITY)

    job = define_asset_job("clinical_migration_job", selection=AssetSelection.assets(name), tags={KIND_TAG: MIGRATION})
    return Definitions(assets=[entity], asset_checks=[integrity], jobs=[job])


@pytest.fixture
def instance(postgres_url: str, tmp_path: Path) -> Iterator[DagsterInstance]:
    """A Dagster instance on PostgreSQL storage (as dagster.yaml configures production)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    overrides = {"storage": {"postgres": {"postgres_url": plain_postgres_url(postgres_url)}}}
    with DagsterInstance.local_temp(str(home), overrides=overrides) as made:
        yield made


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, httpserver: HTTPServer, smtp_server: Mailbox, tmp_path: Path) -> None:
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    monkeypatch.setenv("ALERT_WEBHOOK_URL", httpserver.url_for("/hook"))
    monkeypatch.setenv("ALERT_SMTP_URL", smtp_server.url)
    monkeypatch.setenv("ALERT_EMAIL_TO", "oncall@example.org")
    monkeypatch.setenv("AUTO_ROLLBACK", "true")
    monkeypatch.setenv("WORKER_TRANSPORT", "local")
    monkeypatch.setenv("WORKER_COMMAND", WORKER_COMMAND)
    # In process, a job's resources are all made at its start (a daemon's run makes each step's own):
    # the other group's resources exist, unused.
    monkeypatch.setenv("BLOB_STORE_URL", str(tmp_path / "unused-blobs"))
    monkeypatch.setenv("FIRESTORE_PROJECT", "unused")


def alerts_posted(httpserver: HTTPServer) -> list[dict[str, Any]]:
    return [json.loads(request.get_data()) for request, _ in httpserver.log]


def rollback(run_config: dict[str, Any], instance: DagsterInstance, **changes: Any) -> Any:
    """``rollback_job`` of the project's definitions, in process, with ``changes`` to its op's config."""
    config = json.loads(json.dumps(run_config))
    config["ops"]["choose_rollback"]["config"].update(changes)
    job = defs.resolve_job_def("rollback_job")
    return job.execute_in_process(run_config=config, instance=instance, raise_on_error=False)


def test_a_clinical_run_that_dies_mid_way_is_alerted_once_and_rolled_back_field_for_field(
    environment: None,
    instance: DagsterInstance,
    mariadb_url: str,
    postgres_url: str,
    httpserver: HTTPServer,
    smtp_server: Mailbox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLINICAL_DB_URL", postgres_url)
    monkeypatch.setenv("STATE_DB_URL", postgres_url)
    legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
    generate(legacy, patients_per_sistema=40, encounters_per_patient=1, sistemas=(SISTEMA,), seed=5)
    params = RunParameters(entity="patients", sistema=SISTEMA, usuario="ana", run_id="run-a", batch_size=5)
    Migration(params, legacy, target).run()
    with legacy.begin() as conn:  # the next run has work to do: 10 records changed at the source
        conn.execute(text("UPDATE pacientes SET nombres = 'Otro', actualizado_en = '2030-01-01' WHERE id <= 10"))
    before = _rows(target, schema.patients)

    # the failed run: a Dagster run whose worker died after some batches were written under its id
    INTEGRITY.clear()
    failed = failing_definitions("patients", SISTEMA).resolve_job_def("clinical_migration_job")
    result = failed.execute_in_process(instance=instance, partition_key=SISTEMA, raise_on_error=False)
    assert not result.success
    with pytest.raises(RuntimeError, match="killed mid-way"):
        FailingMigration(replace(params, run_id=result.run_id, mode="full"), legacy, target).run()
    half_done = _rows(target, schema.patients)
    assert half_done != before

    event = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
    context = build_run_status_sensor_context(
        sensor_name="migration_failure_sensor", dagster_instance=instance, dagster_run=result.dagster_run,
        dagster_event=event,
    ).for_run_failure()  # fmt: skip
    requests = list(migration_failure_sensor(context, alerts=alerts_from_env(), policy=policy_from_env()) or [])
    assert len(requests) == 1 and len(alerts_posted(httpserver)) == 1 and len(smtp_server.messages) == 1
    (alert,) = alerts_posted(httpserver)
    assert (alert["type"], alert["entity"], alert["partition"], alert["category"]) == (
        "MIGRATION_FAILED", "patients", SISTEMA, "SCRIPT_ERROR",
    )  # fmt: skip
    # evaluated again (a restarted daemon): no second alert; the same run key (Dagster launches it once)
    again = list(migration_failure_sensor(context, alerts=alerts_from_env(), policy=policy_from_env()) or [])
    assert len(alerts_posted(httpserver)) == 1 and len(smtp_server.messages) == 1
    assert [r.run_key for r in again] == [requests[0].run_key]

    # launched by hand without confirm: a dry run that writes nothing
    state_before = _state(target)
    dry = rollback(requests[0].run_config, instance, confirm=False)
    assert dry.success
    assert _rows(target, schema.patients) == half_done and _state(target) == state_before
    assert len(alerts_posted(httpserver)) == 1  # a dry run alerts nothing

    done = rollback(requests[0].run_config, instance)
    assert done.success
    assert _rows(target, schema.patients) == before  # field for field: content_hash, run_id, migrated_at too
    with target.connect() as conn:
        status = conn.execute(text("SELECT status FROM migration.runs WHERE run_id = :r"), {"r": result.run_id})
        assert status.scalar() == ROLLED_BACK
    kinds = [a["type"] for a in alerts_posted(httpserver)]
    assert kinds == ["MIGRATION_FAILED", "ROLLBACK_DONE"]
    # twice: nothing changes
    assert rollback(requests[0].run_config, instance).success
    assert _rows(target, schema.patients) == before

    # refused with a clear message: run-a's records were changed again by a later run (re-run, then undo a)
    Migration(replace(params, run_id="run-d"), legacy, target).run()
    refused = rollback(requests[0].run_config, instance, run_id="run-a")
    assert not refused.success
    failure = next(e for e in refused.all_events if e.event_type_value == "STEP_FAILURE")
    assert "run-d" in failure.step_failure_data.error.message
    assert alerts_posted(httpserver)[-1]["type"] == "ROLLBACK_FAILED"


@pytest.fixture
def app(postgres_url: str, tmp_path: Path, firestore_emulator: str, firestore_project: str) -> Iterator[Setup]:
    yield Setup(postgres_url, tmp_path, firestore_emulator, firestore_project)


def test_a_failed_integrity_check_on_files_is_alerted_and_its_run_rolled_back_documents_and_blobs(
    environment: None,
    instance: DagsterInstance,
    app: Setup,
    httpserver: HTTPServer,
    smtp_server: Mailbox,
    monkeypatch: pytest.MonkeyPatch,
    firestore_emulator: str,
    firestore_project: str,
) -> None:
    monkeypatch.setenv("STATE_DB_URL", app.django_url)
    monkeypatch.setenv("CLINICAL_DB_URL", app.django_url)  # made, unused (see the environment fixture)
    monkeypatch.setenv("FIRESTORE_PROJECT", firestore_project)
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator)
    monkeypatch.setenv("BLOB_STORE_URL", str(app.blob_root))
    shard = busiest_shard(app.tally)
    app.run("users", shard, "users-a")
    app.run("files", shard, "files-a")
    changed = min(_documents(app, shard))
    with app.django.begin() as conn:  # a file's bytes change at the source: the next run rewrites its blob
        first = conn.exec_driver_sql(f"SELECT id, file_path FROM list_cutter_savedfile WHERE id = {changed}").one()
        content = b"changed,after\n1,2\n"
        (app.media_root / first.file_path).write_bytes(content)
        conn.exec_driver_sql(
            f"UPDATE list_cutter_savedfile SET sha256 = '{hashlib.sha256(content).hexdigest()}', "
            f"size_bytes = {len(content)} WHERE id = {first.id}"
        )
    documents, blobs = _documents(app, shard), _blobs(app.blob_root)

    sensor_context = build_sensor_context(instance=instance, sensor_name="check_failure_sensor")
    cursor = check_failure_sensor(sensor_context, alerts=alerts_from_env(), policy=policy_from_env()).cursor

    # the run: files migrated under the Dagster run's id, then its integrity check fails
    INTEGRITY.update({"passed": False, "metadata": {"failures": 1, "mismatched": 1}})
    run_job = failing_definitions("files", shard).resolve_job_def("clinical_migration_job")
    result = run_job.execute_in_process(instance=instance, partition_key=shard, raise_on_error=False)
    assert not result.success  # the blocking check failed the run
    app.run("files", shard, result.run_id)
    assert _documents(app, shard) != documents and _blobs(app.blob_root) != blobs

    tick = check_failure_sensor(
        build_sensor_context(instance=instance, cursor=cursor, sensor_name="check_failure_sensor"),
        alerts=alerts_from_env(),
        policy=policy_from_env(),
    )
    (request,) = tick.run_requests or []
    (alert,) = alerts_posted(httpserver)
    assert (alert["type"], alert["entity"], alert["partition"]) == ("CHECK_FAILED", "files", shard)
    assert len(smtp_server.messages) == 1

    after = _documents(app, shard)
    dry = rollback(request.run_config, instance, confirm=False)
    assert dry.success and _documents(app, shard) == after  # without confirm: nothing written
    done = rollback(request.run_config, instance)
    assert done.success
    restored = _documents(app, shard)
    assert restored == documents and _blobs(app.blob_root) == blobs
    assert [a["type"] for a in alerts_posted(httpserver)] == ["CHECK_FAILED", "ROLLBACK_DONE"]


def test_a_run_of_patients_and_encounters_is_undone_encounters_first(
    environment: None, instance: DagsterInstance, mariadb_url: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run wrote both entities (a clinical_migration_job run): rolling back its patients undoes its
    encounters first — by hand as a dry run (nothing written, both listed), then confirmed."""
    monkeypatch.setenv("CLINICAL_DB_URL", postgres_url)
    monkeypatch.setenv("STATE_DB_URL", postgres_url)
    legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
    generate(legacy, patients_per_sistema=30, encounters_per_patient=2, sistemas=(SISTEMA,), seed=7)
    for entity in ("patients", "encounters"):
        Migration(RunParameters(entity=entity, sistema=SISTEMA, usuario="ana", run_id="run-x"), legacy, target).run()
    patients, encounters = _rows(target, schema.patients), _rows(target, schema.encounters)
    assert patients and encounters
    config = {"ops": {"choose_rollback": {"config": {"entity": "patients", "partition": SISTEMA}}}}

    dry = rollback(config, instance)
    assert dry.success
    (output,) = [e for e in dry.all_events if e.event_type_value == "STEP_OUTPUT" and e.step_key == "rollback_clinical"]
    said = {k: v.value for k, v in output.step_output_data.metadata.items()}
    assert said["dry_run"] is True and said["encounters"]["run_id"] == said["patients"]["run_id"] == "run-x"
    assert said["patients"]["after"] == ["encounters"]
    assert _rows(target, schema.patients) == patients and _rows(target, schema.encounters) == encounters

    done = rollback(config, instance, confirm=True)
    assert done.success
    assert _rows(target, schema.patients) == [] and _rows(target, schema.encounters) == []
