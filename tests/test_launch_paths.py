"""Launch paths of a real deployment (issue 6, items 4–8 and 10): a running ``dagster-webserver`` and
``dagster-daemon`` on the production ``dagster.yaml`` (PostgreSQL instance, ``MigrationRunCoordinator``,
queue limits), reached through GraphQL as the UI sends it and through the ``dagster`` CLI.

The worker is ``tests/fake_workers/worker.sh`` over a real sshd: a marker for every call (proof that a
worker ran, or never did), a short sleep before each migration so that runs overlap, and a behaviour
chosen by the run's ``usuario`` (the real worker, or a silent / plain-text / Pipes-without-report /
killable one). CLI runs that must execute in-process (``dagster asset materialize``) use a second
instance WITHOUT the run queue, since the production instance refuses them (item 6).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    RunsFilter,
    SensorResult,
    build_sensor_context,
)
from sqlalchemy import create_engine, insert, inspect, text

from demo.databases import throwaway_database
from demo.legacy_data import generate
from migration_assets.clinical.sensors import sistemas_discovery_sensor
from resources.databases import DatabaseResource
from resources.ssh import SSHResource
from resources.worker import WorkerResource
from worker import schema

from .conftest import MARIADB_ADMIN, POSTGRES_ADMIN, WORKER_COMMAND, unavailable
from .dagster_services import (  # noqa: F401  (the fixtures)
    WORKER_DELAY_SECONDS,
    DagsterServices,
    dagster_services_fixture,
    show_service_logs_on_failure_fixture,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("show_service_logs_on_failure")]

JOB = "clinical_migration_job"
ASSET_JOB = "__ASSET_JOB"
IN_PROGRESS = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
# Runs of the production instance seen by the tests of this module: item 10 finds them in PostgreSQL.
SEEN_RUNS: dict[str, str] = {}


def asset_config(usuario: str, *assets: str) -> dict[str, Any]:
    return {"ops": {a: {"config": {"usuario": usuario}} for a in assets or ("patients",)}}


def job_config(usuario: str) -> dict[str, Any]:
    return asset_config(usuario, "patients", "encounters")


def materialize_args(partition: str, config: Mapping[str, Any]) -> list[str]:
    return [
        "asset", "materialize", "-m", "migration_assets.definitions", "--select", "patients",
        "--partition", partition, "--config-json", json.dumps(config),
    ]  # fmt: skip


def job_launch_args(partition: str, config: Mapping[str, Any], run_id: str) -> list[str]:
    return [
        "job", "launch", "-w", "workspace.yaml", "-j", JOB, "--run-id", run_id,
        "--tags", json.dumps({"dagster/partition": partition}), "--config-json", json.dumps(config),
    ]  # fmt: skip


def launched(answer: Mapping[str, Any], path: str) -> str:
    assert answer["__typename"] == "LaunchRunSuccess", f"{path}: {answer}"
    run_id = answer["run"]["runId"]
    SEEN_RUNS[run_id] = path
    return run_id


def usuario_of(run: DagsterRun) -> str | None:
    """The usuario a run really runs as: its run config's, whatever its tags say."""
    ops = (run.run_config or {}).get("ops", {})
    usuarios = {(op.get("config") or {}).get("usuario") for op in ops.values()}
    return usuarios.pop() if len(usuarios) == 1 else f"?{sorted(map(str, usuarios))}"


def events(instance: DagsterInstance, run_id: str, kind: DagsterEventType) -> list[Any]:
    return [r for r in instance.all_logs(run_id) if r.dagster_event and r.dagster_event.event_type == kind]


def step_failures(instance: DagsterInstance, run_id: str) -> list[tuple[str, str, str | None]]:
    """(error message, description, error_category) of each STEP_FAILURE of the run."""
    out = []
    for record in events(instance, run_id, DagsterEventType.STEP_FAILURE):
        data = record.dagster_event.step_failure_data
        user = data.user_failure_data
        category = user.metadata.get("error_category") if user else None
        out.append(
            (data.error.message if data.error else "", user.description if user else "", category and category.text)
        )
    return out


def run_failure_message(instance: DagsterInstance, run_id: str) -> str:
    (record,) = events(instance, run_id, DagsterEventType.RUN_FAILURE)
    return record.dagster_event.message or record.user_message


def runs_since(instance: DagsterInstance, since: datetime) -> list[DagsterRun]:
    return list(instance.get_runs(filters=RunsFilter(created_after=since)))


def target_rows(url: str, sql: str, **params: Any) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("patients", schema="clinical"):
                return 0
            return int(conn.execute(text(sql), params).scalar() or 0)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def other_database() -> Iterator[str]:
    """A database a launchpad user would like to redirect the data to."""
    try:
        with throwaway_database(POSTGRES_ADMIN, "elsewhere") as url:
            yield url
    except Exception as problem:
        unavailable(f"PostgreSQL ({type(problem).__name__})")


def tables_in(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(
                conn.scalars(
                    text(
                        "SELECT table_schema || '.' || table_name FROM information_schema.tables "
                        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
                    )
                )
            )
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------------------
# item 4: run config cannot set a resource


def resource_overrides(marker: Path, elsewhere: str) -> dict[str, dict[str, Any]]:
    return {
        "worker.command": {"worker": {"config": {"command": f"sh -c 'touch {marker}'"}}},
        "worker.transport": {"worker": {"config": {"transport": "local"}}},
        "clinical_db.url": {"clinical_db": {"config": {"url": elsewhere}}},
        "legacy_db.url": {"legacy_db": {"config": {"url": elsewhere}}},
        "state_db.url": {"state_db": {"config": {"url": elsewhere}}},
    }


def test_run_config_that_sets_a_resource_is_refused_before_anything_runs(
    dagster_services: DagsterServices, other_database: str, tmp_path: Path
) -> None:
    s = dagster_services
    marker = tmp_path / "injected-command-ran"
    overrides = resource_overrides(marker, other_database)
    runs_before = s.instance.get_runs_count()
    calls_before = s.worker_calls()
    problems: list[str] = []

    # GraphQL, as the launchpad of the asset page and of the job sends it
    for name, override in overrides.items():
        for job, config in ((ASSET_JOB, asset_config("ana")), (JOB, job_config("ana"))):
            answer = s.launch_run(
                job,
                {**config, "resources": override},
                {"dagster/partition": "HSJ"},
                ["patients"] if job == ASSET_JOB else None,
            )
            messages = [e["message"] for e in answer.get("errors", [])]
            if answer["__typename"] != "RunConfigValidationInvalid" or not any(
                "unexpected config entry" in m for m in messages
            ):
                problems.append(f"GraphQL {job} {name}: {json.dumps(answer)[:600]}")

    # the CLI: `dagster asset materialize --config-json` for each, `dagster job launch` with all of them
    everything = {k: v for override in overrides.values() for k, v in override.items()}
    with ThreadPoolExecutor(3) as pool:
        calls = {
            f"asset materialize {name}": pool.submit(
                s.cli, *materialize_args("HSJ", {**asset_config("ana"), "resources": override})
            )
            for name, override in overrides.items()
        }
        calls["job launch (all five)"] = pool.submit(
            s.cli, *job_launch_args("HSJ", {**job_config("ana"), "resources": everything}, str(uuid.uuid4()))
        )
        for what, future in calls.items():
            result = future.result()
            output = result.stdout + result.stderr
            if result.returncode == 0 or "unexpected config entry" not in output:
                problems.append(f"CLI {what}: exit {result.returncode}\n{output[-1500:]}")

    time.sleep(1)  # anything that did start would have left a trace by now
    assert not problems, "\n\n".join(problems)
    assert s.instance.get_runs_count() == runs_before, [
        s.describe(r.run_id) for r in s.instance.get_runs(limit=s.instance.get_runs_count() - runs_before)
    ]
    assert not marker.exists(), "the command set in run config ran"
    assert tables_in(other_database) == [], "a database named in run config was written to"
    assert s.worker_calls() == calls_before, "a worker ran"


# ------------------------------------------------------------------------------------------------
# item 6: the queue's three limits hold for every launch path


class Sampler:
    """The migration runs in progress, sampled while they execute."""

    def __init__(self, instance: DagsterInstance) -> None:
        self.instance = instance
        self.samples: list[list[tuple[str, str | None, str | None]]] = []

    def __call__(self, *_: Any) -> None:
        runs = self.instance.get_runs(filters=RunsFilter(statuses=IN_PROGRESS))
        self.samples.append([(r.run_id, r.tags.get("dagster/partition"), usuario_of(r)) for r in runs])

    def maxima(self) -> dict[str, tuple[int, list[Any]]]:
        """Per limit, the largest count seen and a sample where it was seen."""
        out: dict[str, tuple[int, list[Any]]] = {"runs": (0, []), "per partition": (0, []), "per usuario": (0, [])}
        for sample in self.samples:
            counts = {
                "runs": len(sample),
                "per partition": max(Counter(p for _, p, _ in sample).values(), default=0),
                "per usuario": max(Counter(u for _, _, u in sample).values(), default=0),
            }
            for limit, count in counts.items():
                if count > out[limit][0]:
                    out[limit] = (count, sample)
        return out


def test_queue_limits_hold_for_asset_page_backfill_launchpad_and_job_launch(dagster_services: DagsterServices) -> None:
    """6 migration runs over 3 partitions and 3 usuarios from four launch paths at once, queued in an order
    where a missing limit shows at once: (HSJ, ana) first, then one on its partition, one of its usuario,
    and free ones (a third run at once if the global limit were missing)."""
    s = dagster_services
    since = datetime.now(UTC)
    paths: dict[str, str] = {}
    # a backfill is picked up by the daemon's backfill loop (every 30 s): launch it first
    backfill = s.launch_backfill(["patients"], ["CLN01", "SUR_2"], asset_config("bob"))
    assert backfill["__typename"] == "LaunchBackfillSuccess", backfill
    paths[launched(s.launch_asset_run("patients", "HSJ", "ana"), "asset page")] = "asset page"
    paths[launched(s.launch_asset_run("patients", "HSJ", "bob"), "asset page")] = "asset page"
    paths[launched(s.launch_run(JOB, job_config("ana"), {"dagster/partition": "CLN01"}), "launchpad")] = "launchpad"
    cli_run = str(uuid.uuid4())
    paths[cli_run] = SEEN_RUNS[cli_run] = "dagster job launch"
    with ThreadPoolExecutor(1) as pool:
        cli = pool.submit(s.cli, *job_launch_args("SUR_2", job_config("eva"), cli_run))
        sampler = Sampler(s.instance)
        while not cli.done():
            sampler()
            time.sleep(0.2)
    result = cli.result()
    assert result.returncode == 0, result.stdout + result.stderr

    deadline = time.monotonic() + 420  # a hang guard: each job run also runs its 4 checks (GX loads in each)
    while True:
        sampler()
        backfill_runs = s.instance.get_runs(filters=RunsFilter(tags={"dagster/backfill": backfill["backfillId"]}))
        for run in backfill_runs:
            paths.setdefault(run.run_id, "backfill")
            SEEN_RUNS.setdefault(run.run_id, "backfill")
        runs = [s.run(run_id) for run_id in paths]
        if len(backfill_runs) == 2 and all(
            r.status in {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE} for r in runs
        ):
            break
        assert time.monotonic() < deadline, (
            f"not finished: {[(r.run_id, paths[r.run_id], r.status.value) for r in runs]}"
        )
        time.sleep(0.2)

    failed = [s.describe(r.run_id) for r in runs if r.status != DagsterRunStatus.SUCCESS]
    assert not failed, "\n".join(failed)
    untagged = [
        (paths[r.run_id], r.run_id, dict(r.tags))
        for r in runs
        if r.tags.get("migration/kind") != "migration"
        or r.tags.get("migration/usuario") != usuario_of(r)
        or "dagster/partition" not in r.tags
    ]
    assert not untagged, f"runs without the tags the limits key on: {untagged}"
    others = {r.run_id for r in runs_since(s.instance, since)} - set(paths)
    assert not others, f"unexpected runs: {others}"

    maxima = sampler.maxima()
    label = {run_id: f"{path}:{run_id[:8]}" for run_id, path in paths.items()}
    shown = {k: (n, [(label.get(r, r), p, u) for r, p, u in sample]) for k, (n, sample) in maxima.items()}
    assert maxima["runs"][0] <= 2, f"more than 2 migration runs at once: {shown['runs']}"
    assert maxima["per partition"][0] <= 1, f"2 runs on one partition at once: {shown['per partition']}"
    assert maxima["per usuario"][0] <= 1, f"2 runs of one usuario at once: {shown['per usuario']}"
    assert maxima["runs"][0] == 2, f"runs never overlapped: the test proves nothing ({len(sampler.samples)} samples)"
    # every migration step ran its worker once
    for run in runs:
        calls = [c for c in s.worker_calls() if f"--run-id {run.run_id} " in c]
        assert len(calls) == (2 if run.job_name == JOB else 1), (paths[run.run_id], calls)


def test_cli_materialize_on_the_queued_instance_is_refused_before_any_worker_runs(
    dagster_services: DagsterServices,
) -> None:
    s = dagster_services
    since = datetime.now(UTC)
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(
                lambda args: s.cli(*args),
                [materialize_args("HSJ", asset_config("cli.one")), materialize_args("HSJ", asset_config("cli.two"))],
            )
        )
    for result in results:
        output = result.stdout + result.stderr
        assert result.returncode != 0, output[-3000:]
        assert "did not pass the run queue" in output and "dagster job launch" in output, output[-3000:]
    assert s.calls_by("cli.one") == [] and s.calls_by("cli.two") == [], "a worker ran"
    runs = [r for r in runs_since(s.instance, since) if usuario_of(r) in ("cli.one", "cli.two")]
    assert len(runs) == 2, runs
    for run in runs:
        SEEN_RUNS[run.run_id] = "dagster asset materialize"
        assert run.status == DagsterRunStatus.FAILURE, s.describe(run.run_id)
        failures = step_failures(s.instance, run.run_id)
        assert [category for _, _, category in failures] == ["VALIDATION_ERROR"], s.describe(run.run_id)
        assert all("did not pass the run queue" in description for _, description, _ in failures)
        assert events(s.instance, run.run_id, DagsterEventType.STEP_UP_FOR_RETRY) == []


# ------------------------------------------------------------------------------------------------
# item 5: a worker that exits 0 without its final report fails and records nothing


def add_partition(s: DagsterServices, key: str) -> None:
    answer = s.add_partition(key)
    assert answer["__typename"] in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"), answer
    if not s.plain_instance.has_dynamic_partition("sistemas", key):
        s.plain_instance.add_dynamic_partitions("sistemas", [key])


def test_a_worker_that_exits_0_without_its_report_fails_and_records_no_materialization(
    dagster_services: DagsterServices,
) -> None:
    s = dagster_services
    kinds = ("silent", "plain", "pipes")
    partition = {kind: f"FAKE_{kind.upper()}" for kind in kinds}
    for key in partition.values():
        add_partition(s, key)
    since = datetime.now(UTC)
    ui_runs = {
        kind: launched(s.launch_asset_run("patients", partition[kind], f"{kind}.ui"), f"{kind} worker")
        for kind in kinds
    }
    with ThreadPoolExecutor(3) as pool:
        cli = {
            kind: pool.submit(s.cli, *materialize_args(partition[kind], asset_config(f"{kind}.cli")), env=s.plain_env)
            for kind in kinds
        }
        cli_results = {kind: future.result() for kind, future in cli.items()}
    s.wait_for_runs(list(ui_runs.values()), timeout=90)

    problems = []
    for kind in kinds:
        plain_runs = [r for r in runs_since(s.plain_instance, since) if usuario_of(r) == f"{kind}.cli"]
        assert len(plain_runs) == 1, (kind, plain_runs, cli_results[kind].stderr[-2000:])
        output = cli_results[kind].stdout + cli_results[kind].stderr
        if cli_results[kind].returncode == 0:
            problems.append(f"CLI {kind}: exit 0\n{output[-1500:]}")
        for path, instance, run_id in (
            ("GraphQL/queue", s.instance, ui_runs[kind]),
            ("CLI/no queue", s.plain_instance, plain_runs[0].run_id),
        ):
            run = instance.get_run_by_id(run_id)
            assert run is not None
            where = f"{kind} worker via {path}"
            usuario = f"{kind}.{'ui' if path.startswith('GraphQL') else 'cli'}"
            if len(s.calls_by(usuario)) != 1:
                problems.append(f"{where}: the fake worker ran {len(s.calls_by(usuario))} times")
            if run.status != DagsterRunStatus.FAILURE:
                problems.append(f"{where}: run {run.status.value}\n{s.describe(run_id, instance)}")
            failures = step_failures(instance, run_id)
            if not any("without its final report" in d and c == "SCRIPT_ERROR" for _, d, c in failures):
                problems.append(f"{where}: no clear step failure: {failures}")
            if events(instance, run_id, DagsterEventType.ASSET_MATERIALIZATION):
                problems.append(f"{where}: a materialization was recorded")
            recorded = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey("patients"), asset_partitions=[partition[kind]]), limit=1
            ).records
            if recorded:
                problems.append(f"{where}: partition {partition[kind]} has a materialization")
            if partition[kind] in instance.get_materialized_partitions(AssetKey("patients")):
                problems.append(f"{where}: partition {partition[kind]} is marked materialized")
    assert s.plain_instance.get_latest_materialization_event(AssetKey("patients")) is None
    assert not problems, "\n\n".join(problems)


# ------------------------------------------------------------------------------------------------
# item 7: bad keys fail at once, in one short line, and write nothing


def test_bad_partition_and_usuario_fail_at_once_in_one_line_and_write_nothing(
    dagster_services: DagsterServices,
) -> None:
    s = dagster_services
    bad_key, bad_usuario = "SEC1\n", "sec.u\n"
    # the UI's "add partition" does not refuse it (Dagster does not validate keys; the product cannot hook there)
    added = s.add_partition(bad_key)
    assert added["__typename"] in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"), added
    if not s.plain_instance.has_dynamic_partition("sistemas", bad_key):
        s.plain_instance.add_dynamic_partitions("sistemas", [bad_key])
    since = datetime.now(UTC)
    queued = {
        "asset page, partition SEC1\\n": launched(s.launch_asset_run("patients", bad_key, "ana"), "bad key"),
        "asset page, usuario sec.u\\n": launched(s.launch_asset_run("patients", "HSJ", bad_usuario), "bad key"),
        "launchpad, usuario sec.u\\n": launched(
            s.launch_run(JOB, job_config(bad_usuario), {"dagster/partition": "HSJ"}), "bad key"
        ),
        "launchpad, partition SEC1\\n": launched(
            s.launch_run(JOB, job_config("ana"), {"dagster/partition": bad_key}), "bad key"
        ),
    }
    cli_job = str(uuid.uuid4())
    with ThreadPoolExecutor(3) as pool:
        job_launch = pool.submit(s.cli, *job_launch_args(bad_key, job_config("ana"), cli_job))
        plain = {
            "materialize, partition SEC1\\n": pool.submit(
                s.cli, *materialize_args(bad_key, asset_config("ana")), env=s.plain_env
            ),
            "materialize, usuario sec.u\\n": pool.submit(
                s.cli, *materialize_args("HSJ", asset_config(bad_usuario)), env=s.plain_env
            ),
        }
        assert job_launch.result().returncode == 0, job_launch.result().stderr[-2000:]
        queued["dagster job launch, partition SEC1\\n"] = SEEN_RUNS[cli_job] = cli_job
        plain_results = {what: future.result() for what, future in plain.items()}
    s.wait_for_runs(list(queued.values()), timeout=30)

    problems = []
    shown: dict[str, Any] = {}
    for what, run_id in queued.items():
        run = s.run(run_id)
        if run.status != DagsterRunStatus.FAILURE:
            problems.append(f"{what}: {s.describe(run_id)}")
            continue
        if events(s.instance, run_id, DagsterEventType.RUN_START):
            problems.append(f"{what}: the run started\n{s.describe(run_id)}")
        message = run_failure_message(s.instance, run_id)
        if not message.startswith("VALIDATION_ERROR") or "\n" in message.strip() or len(message) > 200:
            problems.append(f"{what}: failure message is not one short VALIDATION_ERROR line: {message!r}")
        graphql = [e for e in s.run_events(run_id) if e["__typename"] == "RunFailureEvent"]
        shown[what] = graphql
        if len(graphql) != 1 or "\n" in graphql[0]["message"].strip() or (graphql[0].get("error") or {}).get("stack"):
            problems.append(f"{what}: GraphQL shows {graphql}")
    for what, result in plain_results.items():
        output = result.stdout + result.stderr
        runs = [
            r for r in runs_since(s.plain_instance, since)
            if r.tags.get("dagster/partition") == bad_key or usuario_of(r) == bad_usuario
        ]  # fmt: skip
        if result.returncode == 0:
            problems.append(f"CLI {what}: exit 0")
        failures = [f for r in runs for f in step_failures(s.plain_instance, r.run_id)]
        shown[f"CLI {what}"] = failures
        for message, description, category in failures:
            if category != "VALIDATION_ERROR" or "\n" in description.strip() or "\n" in message.strip():
                problems.append(f"CLI {what}: step failure {message!r} / {description!r} / {category}\n{output[-800:]}")
        if not failures:
            problems.append(f"CLI {what}: no step failure recorded\n{output[-1500:]}")
    # nothing reached a worker, nothing was written under those keys
    calls = s.worker_calls()
    reached = [c for c in calls if "SEC1\n" in c or "sec.u\n" in c or any(r in c for r in queued.values())]
    assert not reached, f"a worker ran for a bad key: {reached}"
    written = target_rows(
        s.clinical_url,
        "SELECT (SELECT count(*) FROM clinical.patients WHERE sistema = :k)"
        " + (SELECT count(*) FROM migration.runs WHERE partition_key = :k OR usuario = :u)",
        k=bad_key,
        u=bad_usuario,
    )
    assert written == 0, "rows were written under a bad key"
    assert not problems, "\n\n".join(problems) + f"\n\nwhat GraphQL / the CLI runs show: {json.dumps(shown)[:3000]}"


def test_discovery_sensor_refuses_a_legacy_code_ending_in_a_newline(dagster_services: DagsterServices) -> None:
    s = dagster_services
    with ExitStack() as stack:
        try:
            url = stack.enter_context(throwaway_database(MARIADB_ADMIN, "legacy_codes"))
        except Exception as problem:
            unavailable(f"MariaDB ({type(problem).__name__})")
        engine = schema.make_engine(url)
        generate(engine, patients_per_sistema=1, encounters_per_patient=0, sistemas=("HSJ",))
        with engine.begin() as conn:
            conn.execute(
                insert(schema.sistemas),
                [
                    {"codigo": "SEC1\n", "nombre": "bad", "activo": 1},
                    {"codigo": "NEW_1", "nombre": "good", "activo": 1},
                ],
            )
        engine.dispose()
        worker = WorkerResource(transport="ssh", command=WORKER_COMMAND, ssh=SSHResource(**s.sshd.resource_kwargs()))
        resources = {"worker": worker, "legacy_db": DatabaseResource(url=url)}
        with (
            DagsterInstance.ephemeral() as instance,
            build_sensor_context(instance=instance, resources=resources) as context,
        ):
            result = sistemas_discovery_sensor(context)
        assert isinstance(result, SensorResult), result
        proposed = [key for request in result.dynamic_partitions_requests for key in request.partition_keys]
        assert sorted(proposed) == ["HSJ", "NEW_1"], proposed


# ------------------------------------------------------------------------------------------------
# item 8: a worker killed by a signal is WORKER_KILLED, not retried


def test_a_worker_killed_by_a_signal_is_worker_killed_and_not_retried(dagster_services: DagsterServices) -> None:
    s = dagster_services
    add_partition(s, "FAKE_KILL")
    since = datetime.now(UTC)
    ui_run = launched(s.launch_asset_run("patients", "FAKE_KILL", "victim.ui"), "killed worker")
    cli = s.cli_process(*materialize_args("FAKE_KILL", asset_config("victim.cli")), env=s.plain_env)
    try:
        killed: dict[str, list[int]] = {"victim.ui": [], "victim.cli": []}
        deadline = time.monotonic() + 90
        while not all(killed.values()):
            for usuario, pids in killed.items():
                if not pids and (s.markers / f"ready.{usuario}").exists():
                    pid = int((s.markers / f"pid.{usuario}").read_text())
                    os.kill(pid, signal.SIGKILL)
                    pids.append(pid)
            assert time.monotonic() < deadline, f"the workers never got ready: {killed}\n{s.describe(ui_run)}"
            time.sleep(0.1)

        def kill_retries(*_: Any) -> None:  # a retried step starts the worker again: stop it, and say so
            for usuario, pids in killed.items():
                pid_file = s.markers / f"pid.{usuario}"
                pid = int(pid_file.read_text())
                if pid not in pids:
                    pids.append(pid)
                    os.kill(pid, signal.SIGKILL)

        s.wait_for_runs([ui_run], timeout=60, on_poll=kill_retries)
        cli_output = cli.communicate(timeout=60)[0]
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    (cli_run,) = [r.run_id for r in runs_since(s.plain_instance, since) if usuario_of(r) == "victim.cli"]

    problems = []
    for path, instance, run_id in (("GraphQL/queue", s.instance, ui_run), ("CLI/no queue", s.plain_instance, cli_run)):
        usuario = "victim.ui" if instance is s.instance else "victim.cli"
        run = instance.get_run_by_id(run_id)
        assert run is not None
        if run.status != DagsterRunStatus.FAILURE:
            problems.append(f"{path}: {run.status.value}")
        failures = step_failures(instance, run_id)
        if [c for _, _, c in failures] != ["WORKER_KILLED"] or not all("SIGKILL" in d for _, d, _ in failures):
            problems.append(f"{path}: step failures {failures}\n{s.describe(run_id, instance)}")
        for kind in (DagsterEventType.STEP_UP_FOR_RETRY, DagsterEventType.STEP_RESTARTED):
            if events(instance, run_id, kind):
                problems.append(f"{path}: {kind.value} — the killed worker was retried")
        if len(killed[usuario]) != 1 or len(s.calls_by(usuario)) != 1:
            problems.append(f"{path}: the worker was started {len(s.calls_by(usuario))} times")
    if cli.returncode == 0:
        problems.append(f"CLI exited 0:\n{cli_output[-1500:]}")
    graphql = [e for e in s.run_events(ui_run) if e["__typename"] == "ExecutionStepFailureEvent"]
    entries = {m["label"]: m.get("text") for e in graphql for m in e["failureMetadata"]["metadataEntries"]}
    if entries.get("error_category") != "WORKER_KILLED":
        problems.append(f"GraphQL step failure metadata: {graphql}")
    assert not problems, "\n\n".join(problems)


# ------------------------------------------------------------------------------------------------
# item 10: the runs' events are in the PostgreSQL database of DAGSTER_PG_URL


def test_runs_and_their_events_are_stored_in_the_postgres_of_dagster_pg_url(dagster_services: DagsterServices) -> None:
    s = dagster_services
    assert s.env["DAGSTER_PG_URL"].startswith("postgresql://"), s.env["DAGSTER_PG_URL"]
    if not any(path == "asset page" for path in SEEN_RUNS.values()):  # run alone: make one run
        run_id = launched(s.launch_asset_run("patients", "SUR_2", "solo"), "asset page")
        s.wait_for_runs([run_id])
    assert not list(s.home.rglob("*.db")), "the instance wrote SQLite storage under DAGSTER_HOME"
    engine = create_engine(s.pg_url)
    try:
        with engine.connect() as conn:
            stored = dict(conn.execute(text("SELECT run_id, status FROM runs")).all())
            kinds = conn.execute(
                text("SELECT run_id, dagster_event_type, count(*) FROM event_logs GROUP BY run_id, dagster_event_type")
            ).all()
    finally:
        engine.dispose()
    by_run: dict[str, dict[str, int]] = {}
    for run_id, kind, count in kinds:
        by_run.setdefault(run_id, {})[kind] = count
    missing = {run_id: path for run_id, path in SEEN_RUNS.items() if run_id not in stored}
    assert not missing, f"runs not in PostgreSQL: {missing}"
    for run_id in SEEN_RUNS:
        status = s.run(run_id).status.value
        assert stored[run_id] == status, (run_id, stored[run_id], status)
        final = (DagsterEventType.RUN_SUCCESS if status == "SUCCESS" else DagsterEventType.RUN_FAILURE).value
        assert by_run.get(run_id, {}).get(final) == 1, (SEEN_RUNS[run_id], run_id, by_run.get(run_id))
        if status == "SUCCESS":
            assert by_run[run_id].get(DagsterEventType.ASSET_MATERIALIZATION.value, 0) >= 1, by_run[run_id]
    succeeded = {s.run(r).tags["dagster/partition"] for r in SEEN_RUNS if s.run(r).status == DagsterRunStatus.SUCCESS}
    assert succeeded <= s.instance.get_materialized_partitions(AssetKey("patients"))


# ------------------------------------------------------------------------------------------------
# issue 10 item 5: retries and timeouts, through the queue and the daemon


def retried_with(instance: DagsterInstance, run_id: str) -> list[str]:
    """Each STEP_UP_FOR_RETRY of the run: the messages of its error and the errors behind it (the
    retry policy's request, then the failure that made it)."""
    out = []
    for record in events(instance, run_id, DagsterEventType.STEP_UP_FOR_RETRY):
        data = record.dagster_event.event_specific_data
        error, messages = (data.error if data is not None else None), []
        while error is not None:
            messages.append(error.message.strip())
            error = error.cause or error.context
        out.append(" | ".join(messages))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sshd_stopped_mid_run_and_restarted_the_run_succeeds_on_a_retry(dagster_services: DagsterServices) -> None:
    from demo.sshd import restart, stop

    s = dagster_services
    add_partition(s, "FAKE_FLAKY")  # no legacy rows: the retry's real worker migrates 0 of them
    run_id = launched(s.launch_asset_run("patients", "FAKE_FLAKY", "flaky.sshd"), "sshd restart")
    deadline = time.monotonic() + 90
    while not (s.markers / "ready.flaky.sshd").exists():
        assert time.monotonic() < deadline, f"the worker never got ready\n{s.describe(run_id)}"
        time.sleep(0.1)
    first = int((s.markers / "pid.flaky.sshd").read_text())
    stop(s.sshd)  # the legacy host's sshd goes down mid-run: the session drops
    try:
        time.sleep(1)
    finally:
        restart(s.sshd)
    os.kill(first, signal.SIGKILL)  # the orphaned fake worker (a real one ends at its session's end)
    (run,) = s.wait_for_runs([run_id], timeout=120)
    assert run.status == DagsterRunStatus.SUCCESS, s.describe(run_id)
    retried = retried_with(s.instance, run_id)  # the lost connection, then one retry that succeeded
    assert len(retried) == 1 and "WORKER_KILLED" in retried[0], retried
    assert step_failures(s.instance, run_id) == []
    assert len(s.calls_by("flaky.sshd")) == 2


def test_a_changed_host_key_fails_at_once_without_a_retry(dagster_services: DagsterServices, tmp_path: Path) -> None:
    s = dagster_services
    add_partition(s, "FAKE_HOSTKEY")
    known_hosts = Path(s.sshd.known_hosts)
    original = known_hosts.read_text()
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, key = Path(f"{other}.pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{s.sshd.port} {kind} {key}\n")  # the host now presents another key
    try:
        run_id = launched(s.launch_asset_run("patients", "FAKE_HOSTKEY", "hostkey.check"), "changed host key")
        (run,) = s.wait_for_runs([run_id], timeout=90)
    finally:
        known_hosts.write_text(original)
    assert run.status == DagsterRunStatus.FAILURE
    assert [c for _, _, c in step_failures(s.instance, run_id)] == ["SSH_HOST_KEY_ERROR"]
    assert not events(s.instance, run_id, DagsterEventType.STEP_UP_FOR_RETRY)
    assert s.calls_by("hostkey.check") == []  # nothing ran on the host


def test_a_migrate_past_its_timeout_is_terminated_as_timeout_error_and_leaves_no_process(
    dagster_services: DagsterServices,
) -> None:
    s = dagster_services
    add_partition(s, "FAKE_SLOW")
    answer = s.launch_asset_run("patients", "FAKE_SLOW", "victim.slow", timeout_seconds=WORKER_DELAY_SECONDS + 4)
    run_id = launched(answer, "timeout")
    (run,) = s.wait_for_runs([run_id], timeout=180)
    assert run.status == DagsterRunStatus.FAILURE
    (failure,) = step_failures(s.instance, run_id)  # the last attempt's; the others were retried
    assert failure[2] == "TIMEOUT_ERROR" and "did not finish in time and was stopped" in failure[1], failure
    retried = retried_with(s.instance, run_id)
    assert len(retried) == 2 and all("TIMEOUT_ERROR" in message for message in retried), retried
    pids = [int(line) for line in (s.markers / "pids.victim.slow").read_text().split()]
    assert len(pids) == 3  # three attempts, each a worker started and stopped
    time.sleep(1)
    assert [pid for pid in pids if _alive(pid)] == []  # no worker left on the legacy host
