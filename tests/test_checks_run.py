"""The checks as Dagster runs them: in their asset's run (blocking where they must be), and alone for one
partition from the command line (``python -m checks.run``), with the same result — an app shard in
Google's Firestore emulator, on a Dagster instance shared by the test and the command line."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import AssetCheckEvaluation, DagsterEventType, DagsterInstance, materialize

from migration_assets.operations.assets import coverage_report
from tests.test_app import ENTITIES, Setup
from tests.test_verify_app import chosen_shards
from worker import app_rules

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
MIN_COVERAGE = "0.6"


@pytest.fixture
def app_env(
    postgres_url: str, tmp_path: Path, firestore_emulator: str, firestore_project: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Setup, dict[str, str]]]:
    setup = Setup(postgres_url, tmp_path, firestore_emulator, firestore_project)
    home = tmp_path / "dagster_home"
    home.mkdir()
    storage = {"storage": {"sqlite": {"base_dir": str(home)}}, "telemetry": {"enabled": False}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(storage))
    env = {
        "DAGSTER_HOME": str(home),
        "DJANGO_DB_URL": postgres_url,
        "STATE_DB_URL": postgres_url,
        "FIRESTORE_PROJECT": firestore_project,
        "FIRESTORE_EMULATOR_HOST": firestore_emulator,
        "MEDIA_TRANSPORT": "local",
        "MEDIA_ROOT": str(setup.media_root),
        "BLOB_STORE_URL": str(setup.blob_root),
        "MIN_COVERAGE": MIN_COVERAGE,
        "REPORTS_DIR": str(tmp_path / "reports"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield setup, env
    setup.django.dispose()


def evaluations(instance: DagsterInstance, run_id: str) -> dict[tuple[str, str], AssetCheckEvaluation]:
    found = {}
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = entry.get_dagster_event().asset_check_evaluation_data
        found[(evaluation.asset_key.to_user_string(), evaluation.check_name)] = evaluation
    return found


def values(evaluation: AssetCheckEvaluation) -> dict[str, Any]:
    return {key: value.value for key, value in evaluation.metadata.items()}


def run_alone(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "checks.run", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_checks_run_in_the_assets_run_and_alone_from_the_command_line(app_env: tuple[Setup, dict[str, str]]) -> None:
    from migration_assets.definitions import defs

    setup, env = app_env
    shard = app_rules.shard_key(chosen_shards(setup.tally)[0])
    instance = DagsterInstance.get()
    job = defs.resolve_job_def("app_migration_job")
    config = {"ops": {e: {"config": {"usuario": "ana"}} for e in ENTITIES}}
    result = job.execute_in_process(partition_key=shard, instance=instance, run_config=config)
    assert result.success
    in_run = evaluations(instance, result.run_id)
    assert set(in_run) == {(e, c) for e in ENTITIES for c in ("coverage", "integrity", "expectations")}
    assert all(evaluation.passed for evaluation in in_run.values()), {
        k: values(v) for k, v in in_run.items() if not v.passed
    }
    files_coverage = values(in_run[("files", "coverage")])
    expected = setup.tally.expected("files", app_rules.shard_number(shard))
    assert files_coverage["eligible"] == expected["eligible"] and files_coverage["missing"] == 0
    [materialization] = result.asset_materializations_for_node("files")
    dashboard = {k: v.value for k, v in materialization.metadata.items()}
    assert dashboard["dagster/row_count"] == files_coverage["migrated"] == expected["migrated"]
    assert dashboard["partition_eligible"] == expected["eligible"] and dashboard["partition_missing"] == 0

    # the coverage report, an asset, says what the instance holds
    report = materialize([coverage_report], instance=instance)
    assert report.success
    written = json.loads((Path(env["REPORTS_DIR"]) / "coverage.json").read_text())
    [section] = [s for s in written["entities"] if s["entity"] == "files"]
    [row] = [r for r in section["partitions"] if r["partition"] == shard]
    for name in ("eligible", "migrated", "quarantined", "missing"):
        assert row[name] == files_coverage[name]
    assert row["quarantined_by_reason"] == files_coverage["quarantined_by_reason"]
    assert row["integrity_status"] == "passed" and row["rows_per_s"] == dashboard["rows_per_s"]
    [made] = report.asset_materializations_for_node("coverage_report")
    assert made.metadata["missing"].value == 0

    # alone, for that partition, from the command line: the same result as in the asset's run
    alone = run_alone(env, "--entity", "files", "--partition", shard, "--check", "integrity", "--check", "coverage")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert f"files {shard} integrity: passed" in alone.stdout
    run_id = alone.stdout.split("run ")[-1].split()[0]
    by_itself = evaluations(instance, run_id)
    assert set(by_itself) == {("files", "integrity"), ("files", "coverage")}
    for check in ("integrity", "coverage"):
        assert values(by_itself[("files", check)]) == values(in_run[("files", check)])

    # the group's checks job (the UI's way to run them alone): checks only, for the tagged partition
    checked = defs.resolve_job_def("app_checks_job").execute_in_process(
        instance=instance, tags={"dagster/partition": shard}
    )
    assert checked.success and not checked.get_asset_materialization_events()
    assert {k: v.passed for k, v in evaluations(instance, checked.run_id).items()} == {k: True for k in in_run}


def test_a_tampered_record_fails_integrity_alone_and_blocks_the_next_run_downstream(
    app_env: tuple[Setup, dict[str, str]],
) -> None:
    from migration_assets.definitions import defs

    setup, env = app_env
    shard = app_rules.shard_key(chosen_shards(setup.tally)[0])
    instance = DagsterInstance.get()
    job = defs.resolve_job_def("app_migration_job")
    config = {"ops": {e: {"config": {"usuario": "ana"}} for e in ENTITIES}}
    assert job.execute_in_process(partition_key=shard, instance=instance, run_config=config).success
    legacy_id = min(setup.documents("files", shard))
    setup.client.collection("files").document(str(legacy_id)).update({"file_name": "renamed behind our back"})

    alone = run_alone(env, "--entity", "files", "--partition", shard, "--check", "integrity")
    assert alone.returncode == 1, alone.stdout + alone.stderr
    assert f"files {shard} integrity: FAILED (ERROR)" in alone.stdout and "mismatched=1" in alone.stdout
    assert "renamed" not in alone.stdout + alone.stderr  # ids, never values

    # the stored hash is untouched, so a migration sees nothing to rewrite: its blocking integrity
    # check fails the run, and filters (downstream of files) are not migrated on a broken parent
    again = job.execute_in_process(partition_key=shard, instance=instance, run_config=config, raise_on_error=False)
    assert not again.success
    checks = evaluations(instance, again.run_id)
    assert not checks[("files", "integrity")].passed
    assert values(checks[("files", "integrity")])["mismatched_sample_ids"] == [legacy_id]
    assert again.asset_materializations_for_node("filters") == []


def test_bad_arguments_are_one_short_line(app_env: tuple[Setup, dict[str, str]]) -> None:
    _, env = app_env
    bad = run_alone(env, "--entity", "files", "--partition", "shard-99")
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("VALIDATION_ERROR:") and len(bad.stderr.strip().splitlines()) == 1
    assert json.dumps(bad.stdout) == '""'
