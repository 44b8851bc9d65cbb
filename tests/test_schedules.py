"""The schedules (DESIGN §7): the nightly incremental sync asks for one run per valid partition of every
group, with a run config its job accepts; the daily retention clean-up deletes the ledger rows of
finished runs older than RETENTION_DAYS — never of a partition's latest real run — on SQLite (the
demo's control DB) and PostgreSQL, and its job runs with the project's resources."""

import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    DagsterInstance,
    PreviewWarning,
    build_schedule_context,
    validate_run_config,
)
from sqlalchemy import Engine, func, insert, select

from migration_assets.definitions import defs
from migration_assets.operations.retention import clean_up, expired_runs
from migration_assets.operations.schedules import SYNC_USUARIO, retention_job
from migration_assets.partitions import APP_SHARDS, sistemas_partitions
from worker import schema
from worker.rollback import ROLLED_BACK

warnings.filterwarnings("ignore", category=PreviewWarning)
NOW = datetime(2026, 12, 3, 4, 30, tzinfo=UTC)


def sync_requests(instance: DagsterInstance, name: str) -> list[Any]:
    repository = defs.get_repository_def()
    schedule = repository.get_schedule_def(name)
    context = build_schedule_context(instance=instance, scheduled_execution_time=NOW, repository_def=repository)
    result = schedule.evaluate_tick(context)
    return list(result.run_requests or [])


def test_the_nightly_sync_asks_for_an_incremental_run_of_every_valid_partition(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with DagsterInstance.local_temp(str(home)) as instance:
        assert sync_requests(instance, "clinical_nightly_sync") == []  # no sistema yet: a skip
        instance.add_dynamic_partitions(sistemas_partitions.name, ["HSJ", "CLN01", "bad key"])
        clinical = sync_requests(instance, "clinical_nightly_sync")
        app = sync_requests(instance, "app_nightly_sync")
    assert sorted(r.partition_key for r in clinical) == ["CLN01", "HSJ"]  # the invalid key is left out
    assert len(app) == APP_SHARDS
    assert len({r.run_key for r in clinical + app}) == len(clinical) + len(app)
    assert all("2026-12-03" in r.run_key for r in clinical + app)
    for request, job in [(clinical[0], "clinical_migration_job"), (app[0], "app_migration_job")]:
        ops = request.run_config["ops"]
        assert {op["config"]["usuario"] for op in ops.values()} == {SYNC_USUARIO}
        assert {op["config"]["mode"] for op in ops.values()} == {"incremental"}
        assert validate_run_config(defs.resolve_job_def(job), request.run_config)


# --- retention ------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'state.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    engine = schema.make_engine(url)
    schema.create_schemas(engine, schema.state_metadata)
    yield engine
    engine.dispose()


def add_run(
    state: Engine, run_id: str, partition: str, days_ago: float, *, status: str = "succeeded", dry: bool = False
) -> None:
    """A run of patients that finished ``days_ago`` days before NOW, with 3 ledger rows."""
    finished = NOW - timedelta(days=days_ago)
    with state.begin() as conn:
        conn.execute(
            insert(schema.runs).values(
                run_id=run_id, entity="patients", partition_key=partition, usuario="ana", parameters={},
                mode="full", dry_run=dry, status=status, started_at=finished - timedelta(minutes=5),
                finished_at=None if status == "running" else finished,
            )
        )  # fmt: skip
        conn.execute(
            insert(schema.ledger),
            [
                {"entity": "patients", "partition_key": partition, "legacy_id": i, "target_id": str(i),
                 "action": "updated", "content_hash": "h", "previous": {"id": i}, "run_id": run_id, "at": finished}
                for i in range(3)
            ],
        )  # fmt: skip


def ledger_runs(state: Engine) -> dict[str, int]:
    with state.connect() as conn:
        rows = conn.execute(select(schema.ledger.c.run_id, func.count()).group_by(schema.ledger.c.run_id)).all()
    return {run_id: count for run_id, count in rows}


def test_the_clean_up_keeps_each_partitions_latest_run_and_recent_ones(state: Engine) -> None:
    add_run(state, "hsj-1", "HSJ", 90)
    add_run(state, "hsj-2", "HSJ", 60)
    add_run(state, "hsj-3", "HSJ", 40)  # the latest real run of HSJ: kept, however old
    add_run(state, "hsj-dry", "HSJ", 35, dry=True)  # a dry run after it does not make it "not the latest"
    add_run(state, "hsj-undone", "HSJ", 34, status=ROLLED_BACK)  # nor does a rolled-back one
    add_run(state, "cln-1", "CLN01", 45)  # old, but the only run of CLN01
    add_run(state, "bog-1", "BOG", 50)
    add_run(state, "bog-2", "BOG", 10)  # recent: kept; it makes bog-1 expire
    add_run(state, "med-1", "MED", 70)
    add_run(state, "med-2", "MED", 0, status="running")  # still running: med-1 goes, med-2 stays
    assert [run for run, _, _ in expired_runs(state, NOW - timedelta(days=30))] == ["hsj-1", "med-1", "hsj-2", "bog-1"]

    looked = clean_up(state, 30, now=NOW, dry_run=True)
    assert (looked.runs, looked.ledger_rows) == (4, 12)
    assert sum(ledger_runs(state).values()) == 30  # a dry run deletes nothing

    done = clean_up(state, 30, now=NOW)
    assert (done.runs, done.ledger_rows) == (4, 12)
    assert sorted(ledger_runs(state)) == ["bog-2", "cln-1", "hsj-3", "hsj-dry", "hsj-undone", "med-2"]
    again = clean_up(state, 30, now=NOW)
    assert (again.runs, again.ledger_rows) == (4, 0)  # nothing left of them
    with state.connect() as conn:  # the runs themselves stay: the audit trail, §6 settings
        assert conn.scalar(select(func.count()).select_from(schema.runs)) == 10
    with pytest.raises(ValueError, match="at least 1"):
        clean_up(state, 0)


def test_the_retention_job_runs_with_the_projects_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    engine = schema.make_engine(url)
    schema.create_schemas(engine, schema.state_metadata)
    add_run(engine, "old", "HSJ", 400)
    add_run(engine, "new", "HSJ", 1)
    monkeypatch.setenv("STATE_DB_URL", url)
    monkeypatch.setenv("RETENTION_DAYS", "365")
    job = defs.resolve_job_def(retention_job.name)
    result = job.execute_in_process(instance=DagsterInstance.ephemeral())
    assert result.success
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = {k: v.value for k, v in event.step_output_data.metadata.items()}
    assert (metadata["runs"], metadata["ledger_rows"], metadata["dry_run"]) == (1, 3, False)
    assert sorted(ledger_runs(engine)) == ["new"]
    monkeypatch.setenv("RETENTION_DAYS", "0")  # refused: a clear error before anything is deleted
    refused = job.execute_in_process(instance=DagsterInstance.ephemeral(), raise_on_error=False)
    assert not refused.success
