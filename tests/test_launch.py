"""Launch rules (pure logic): queue tags from a run, refusals, exit codes as categories, whole-string
keys; and what a worker that exits 0 without reporting gives (a real subprocess, no mocks)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRun, materialize

from migration_assets.clinical.assets import patients
from migration_assets.launch import LaunchRefused, migration_tags
from resources.databases import DatabaseResource
from resources.errors import Category, MigrationError
from resources.policy import MigrationPolicy
from resources.worker import WorkerResource, raise_for_exit
from worker.params import RunParameters, sistema_problem, usuario_problem, validate


def run(job: str = "__ASSET_JOB", assets: tuple[str, ...] = ("patients",), **kwargs: Any) -> DagsterRun:
    config = kwargs.pop("config", {"ops": {a: {"config": {"usuario": "ana"}} for a in assets}})
    tags = {"dagster/partition": "HSJ", **kwargs.pop("tags", {})}
    return DagsterRun(
        job_name=job,
        run_id="r1",
        run_config=config,
        tags=tags,
        asset_selection=frozenset(AssetKey(a) for a in assets) if job == "__ASSET_JOB" else None,
    )


def test_an_asset_page_run_gets_the_tags_the_queue_limits_it_by() -> None:
    assert migration_tags(run()) == {"migration/kind": "migration", "migration/usuario": "ana"}


def test_a_job_run_gets_its_usuario_tag_from_its_config() -> None:
    job_run = run("clinical_migration_job", ("patients", "encounters"), tags={"migration/kind": "migration"})
    assert migration_tags(job_run) == {"migration/kind": "migration", "migration/usuario": "ana"}


def test_other_runs_are_left_alone() -> None:
    assert migration_tags(run(assets=("coverage_report",), config={})) == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tags": {"dagster/partition": "SEC1\n"}}, "partition key"),
        ({"tags": {"dagster/partition": "hsj"}}, "partition key"),
        ({"config": {"ops": {"patients": {"config": {"usuario": "sec.u\n"}}}}}, "usuario must match"),
        ({"config": {"ops": {"patients": {"config": {}}}}}, "needs a usuario"),
        ({"tags": {"migration/usuario": "eve"}}, "differ"),
        ({"tags": {"dagster/asset_partition_range_start": "A", "dagster/asset_partition_range_end": "B"}}, "one run"),
    ],
)
def test_runs_that_cannot_carry_the_limits_are_refused_in_one_line(change: dict[str, Any], message: str) -> None:
    with pytest.raises(LaunchRefused, match=message) as refused:
        migration_tags(run(**change))
    assert str(refused.value).startswith("VALIDATION_ERROR: ") and "\n" not in str(refused.value)


def test_two_usuarios_in_one_run_are_refused() -> None:
    config = {"ops": {"patients": {"config": {"usuario": "ana"}}, "encounters": {"config": {"usuario": "eve"}}}}
    with pytest.raises(LaunchRefused, match="same usuario"):
        migration_tags(run(assets=("patients", "encounters"), config=config))


def test_a_run_without_a_partition_is_refused() -> None:
    bare = DagsterRun(job_name="__ASSET_JOB", run_id="r", run_config=run().run_config, tags={})
    with pytest.raises(LaunchRefused, match="needs a partition"):
        migration_tags(bare)


@pytest.mark.parametrize("value", ["SEC1\n", "SEC1\r\n", "\nSEC1", "SE C1", "ＨＳＪ", "HSJ\x00"])
def test_keys_are_validated_whole(value: str) -> None:
    assert sistema_problem(value) is not None
    assert usuario_problem(value.lower()) is not None
    with pytest.raises(ValueError, match="sistema must match"):
        validate(RunParameters(entity="patients", sistema=value, usuario="ana", run_id="r"))


@pytest.mark.parametrize(
    ("code", "connection_lost", "category", "retryable"),
    [
        (-9, False, Category.WORKER_KILLED, False),  # local subprocess killed by SIGKILL
        (137, False, Category.WORKER_KILLED, False),  # the SSH wrapper's 128+9
        (143, False, Category.WORKER_KILLED, False),  # SIGTERM
        (137, True, Category.WORKER_KILLED, True),  # killed because the connection was lost
        (-1, True, Category.WORKER_KILLED, True),  # paramiko: no exit status, the transport is gone
        (2, False, Category.VALIDATION_ERROR, False),
        (3, False, Category.CONNECTION_ERROR, True),
        (127, False, Category.COMMAND_NOT_FOUND, False),
        (1, False, Category.SCRIPT_ERROR, False),
    ],
)
def test_exit_codes_map_to_categories(code: int, connection_lost: bool, category: Category, retryable: bool) -> None:
    with pytest.raises(MigrationError) as caught:
        raise_for_exit(code, ["some output"], connection_lost=connection_lost)
    assert caught.value.category == category and caught.value.retryable == retryable
    if category == Category.WORKER_KILLED and code != -1:
        assert "SIGKILL" in str(caught.value) or "SIGTERM" in str(caught.value)


def test_the_workers_own_category_line_wins_over_its_exit_code() -> None:
    with pytest.raises(MigrationError) as caught:
        raise_for_exit(1, ["VALIDATION_ERROR: a full run would delete 9 patients", "trailing noise"])
    assert caught.value.category == Category.VALIDATION_ERROR
    assert str(caught.value) == "VALIDATION_ERROR: a full run would delete 9 patients"


SILENT_WORKERS = {
    "silent": "import sys; sys.stdin.read()",
    "plain text": "import sys; sys.stdin.read(); print('done, 12 rows'); print('all good', file=sys.stderr)",
    "pipes without a report": (
        "import json, sys\n"
        "from dagster_pipes import PipesMappingParamsLoader, open_dagster_pipes\n"
        "payload = json.loads(sys.stdin.read())\n"
        "with open_dagster_pipes(params_loader=PipesMappingParamsLoader(payload['pipes'])) as pipes:\n"
        "    pipes.log.info('working')\n"
    ),
}


@pytest.mark.parametrize("kind", list(SILENT_WORKERS))
def test_a_worker_that_exits_0_without_its_report_fails_and_records_nothing(kind: str, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(SILENT_WORKERS[kind])
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("sistemas", ["HSJ"])
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    result = materialize(
        [patients],
        partition_key="HSJ",
        instance=instance,
        resources={
            "worker": WorkerResource(transport="local", command=f"{sys.executable} {script}"),
            "legacy_db": DatabaseResource(url=url),
            "clinical_db": DatabaseResource(url=url),
            "state_db": DatabaseResource(url=url),
            "policy": MigrationPolicy(),
        },
        run_config={"ops": {"patients": {"config": {"usuario": "ana"}}}},
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "without its final report" in failure.step_failure_data.error.message
    assert result.asset_materializations_for_node("patients") == []
    assert instance.get_latest_materialization_event(AssetKey("patients")) is None
    assert instance.get_materialized_partitions(AssetKey("patients")) == set()


@pytest.mark.parametrize("key", ["shard-16", "shard-3", "shard-03\n", "HSJ", ""])
def test_an_app_run_on_a_key_that_is_not_a_shard_is_refused(key: str) -> None:
    with pytest.raises(LaunchRefused, match="shard-00"):
        migration_tags(run(assets=("users",), tags={"dagster/partition": key}))


def test_an_app_run_on_a_shard_is_tagged_and_one_mixing_both_groups_is_refused() -> None:
    app_run = run(assets=("users", "files"), tags={"dagster/partition": "shard-07"})
    assert migration_tags(app_run) == {"migration/kind": "migration", "migration/usuario": "ana"}
    with pytest.raises(LaunchRefused, match="different partitions"):
        migration_tags(run(assets=("users", "patients"), tags={"dagster/partition": "HSJ"}))
