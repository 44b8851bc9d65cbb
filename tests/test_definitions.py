"""The definitions load and validate; the sensor and the local (demo) transport work on SQLite."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context, materialize

from demo.legacy_data import generate
from migration_assets.clinical.assets import encounters, patients
from migration_assets.clinical.sensors import sistemas_discovery_sensor
from resources.databases import DatabaseResource
from resources.errors import Category, MigrationError
from resources.policy import MigrationPolicy
from resources.worker import WorkerResource
from worker import schema

from .conftest import WORKER_COMMAND

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "WORKER_TRANSPORT": "local",
        "WORKER_COMMAND": WORKER_COMMAND,
        "LEGACY_DB_URL": f"sqlite:///{tmp_path / 'legacy.db'}",
        "CLINICAL_DB_URL": f"sqlite:///{tmp_path / 'clinical.db'}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("STATE_DB_URL", raising=False)
    return env


def test_definitions_hold_the_clinical_assets_job_and_sensor(demo_env: dict[str, str]) -> None:
    from migration_assets import definitions

    defs = importlib.reload(definitions).defs
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"patients", "encounters"} <= keys
    assert defs.resolve_job_def("clinical_migration_job").tags["migration/kind"] == "migration"
    assert defs.resolve_sensor_def("sistemas_discovery_sensor")
    encounters_node = graph.get(encounters.key)
    assert patients.key in encounters_node.parent_keys
    assert encounters_node.partitions_def == patients.partitions_def


@pytest.mark.parametrize(
    "command", [["dg", "check", "defs"], ["dagster", "definitions", "validate", "-m", "migration_assets.definitions"]]
)
def test_command_line_validation_passes(command: list[str], demo_env: dict[str, str], tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    subprocess.run([sys.executable, "-m", "demo.instance", str(home)], cwd=ROOT, check=True)
    binary = str(Path(sys.executable).with_name(command[0]))
    done = subprocess.run(
        [binary, *command[1:]],
        cwd=ROOT,
        env={**os.environ, **demo_env, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_discovery_sensor_adds_active_sistemas_once(demo_env: dict[str, str]) -> None:
    generate(schema.make_engine(demo_env["LEGACY_DB_URL"]), patients_per_sistema=5)
    instance = DagsterInstance.ephemeral()
    resources = {
        "worker": WorkerResource(transport="local", command=WORKER_COMMAND),
        "legacy_db": DatabaseResource(url=demo_env["LEGACY_DB_URL"]),
    }
    with build_sensor_context(instance=instance, resources=resources) as context:
        result = sistemas_discovery_sensor(context)
    assert isinstance(result, SensorResult)
    (request,) = result.dynamic_partitions_requests
    assert sorted(request.partition_keys) == ["CLN01", "HSJ", "SUR_2"]  # not the inactive OLD
    instance.add_dynamic_partitions("sistemas", list(request.partition_keys))
    with build_sensor_context(instance=instance, resources=resources) as context:
        again = sistemas_discovery_sensor(context)
    assert isinstance(again, SkipReason)


def test_local_transport_migrates_like_ssh(demo_env: dict[str, str]) -> None:
    tally = generate(schema.make_engine(demo_env["LEGACY_DB_URL"]), patients_per_sistema=150)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("sistemas", ["SUR_2"])
    result = materialize(
        [patients, encounters],
        partition_key="SUR_2",
        instance=instance,
        resources={
            "worker": WorkerResource(transport="local", command=WORKER_COMMAND),
            "legacy_db": DatabaseResource(url=demo_env["LEGACY_DB_URL"]),
            "clinical_db": DatabaseResource(url=demo_env["CLINICAL_DB_URL"]),
            "state_db": DatabaseResource(url=demo_env["CLINICAL_DB_URL"]),
            "policy": MigrationPolicy(),
        },
        run_config={"ops": {name: {"config": {"usuario": "demo"}} for name in ("patients", "encounters")}},
    )
    assert result.success
    for entity in ("patients", "encounters"):
        (event,) = result.asset_materializations_for_node(entity)
        assert event.metadata["migrated"].value == tally.expected("SUR_2", entity)["migrated"]


def test_local_transport_reports_a_missing_worker() -> None:
    worker = WorkerResource(transport="local", command="/nonexistent/clinic-migrate")
    with pytest.raises(MigrationError) as caught, worker.host() as start:
        start(["/nonexistent/clinic-migrate", "sistemas"], b"{}")
    assert caught.value.category == Category.COMMAND_NOT_FOUND


def test_worker_imports_without_dagster() -> None:
    """The worker runs on the legacy host, where only it and dagster-pipes are installed."""
    probe = "import sys, worker.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'dagster'))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("stdin", "message"), [("{}", "lacks legacy_db_url, target_db_url"), ("not json", "one JSON object")]
)
def test_worker_refuses_missing_secrets_with_exit_2(stdin: str, message: str) -> None:
    argv = [WORKER_COMMAND, "migrate", "--entity", "patients", "--sistema", "HSJ", "--usuario", "a", "--run-id", "r"]
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.integration
def test_production_instance_runs_on_postgres_with_the_run_queue_limits(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_PG_URL", postgres_url.replace("postgresql+psycopg://", "postgresql://"))
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        queue = instance.get_concurrency_config().run_queue_config
        assert queue is not None and queue.max_concurrent_runs == 10
        limits = {limit["key"]: (limit["limit"], limit.get("value")) for limit in queue.tag_concurrency_limits}
        assert limits["migration/kind"] == (2, "migration")
        assert limits["dagster/partition"][0] == 1 and limits["migration/usuario"][0] == 1
