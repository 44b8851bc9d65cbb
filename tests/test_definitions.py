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


def test_the_whole_graph_is_pinned_and_each_domain_owns_its_part() -> None:
    """The full set of assets, checks, jobs, sensors and schedules (a change to it is a change to this
    test); each domain's own Definitions hold its part, and definitions.py only merges them."""
    from migration_assets.app import definitions as app
    from migration_assets.clinical import definitions as clinical
    from migration_assets.definitions import defs
    from migration_assets.operations import definitions as operations
    from migration_assets.registry import names

    repository = defs.get_repository_def()
    graph = repository.asset_graph
    clinical_tables, app_tables = (
        ("atenciones", "pacientes"),
        ("auth_user", "list_cutter_savedfile", "list_cutter_savedfilter"),
    )
    legacy = [f"legacy/clinical_mariadb/{t}" for t in clinical_tables] + [
        f"legacy/listcutter_postgres/{t}" for t in app_tables
    ]
    assert sorted(k.to_user_string() for k in graph.get_all_asset_keys()) == sorted(
        ["coverage_report", *names(), *legacy]
    )
    assert sorted(k.to_user_string() for k in graph.asset_check_keys) == sorted(
        f"{entity}:{check}" for entity in names() for check in ("coverage", "integrity", "expectations")
    )
    assert sorted(j.name for j in repository.get_all_jobs() if j.name != "__ASSET_JOB") == [
        "app_checks_job", "app_migration_job", "clinical_checks_job", "clinical_migration_job", "retention_job",
        "rollback_job",
    ]  # fmt: skip
    assert sorted(s.name for s in repository.sensor_defs) == [
        "check_failure_sensor", "health_sensor", "migration_failure_sensor", "sistemas_discovery_sensor",
    ]  # fmt: skip
    assert sorted(s.name for s in repository.schedule_defs) == [
        "app_nightly_sync", "clinical_nightly_sync", "retention_daily",
    ]  # fmt: skip

    owned = {
        "clinical": ({"patients", "encounters"}, {"sistemas_discovery_sensor"}, {"clinical_nightly_sync"}),
        "app": ({"users", "files", "filters"}, set(), {"app_nightly_sync"}),
        "operations": (
            {"coverage_report"},
            {"migration_failure_sensor", "check_failure_sensor", "health_sensor"},
            {"retention_daily"},
        ),
    }
    for module, name in ((clinical, "clinical"), (app, "app"), (operations, "operations")):
        part = module.defs
        assets = {k.to_user_string() for a in part.assets or [] for k in getattr(a, "keys", ())}
        assert owned[name][0] <= assets, name
        assert {s.name for s in part.sensors or []} == owned[name][1], name
        assert {s.name for s in part.schedules or []} == owned[name][2], name
    source = Path("migration_assets/definitions.py").read_text()
    assert "Definitions.merge(clinical.defs, app.defs, operations.defs)" in source
    assert "@asset" not in source and "@sensor" not in source and "@job" not in source
