"""A real Dagster deployment for the launch-path tests: ``dagster-webserver`` + ``dagster-daemon``.

Both run as subprocesses (each in its own process group, stopped as a group), from the project's
directory, on an instance made from a COPY of the project's production ``dagster.yaml`` (PostgreSQL
storage through ``DAGSTER_PG_URL`` in its plain documented form, the ``MigrationRunCoordinator``, the
queue limits), with the clinical group's resources in the environment only: the worker over a real
sshd, a generated legacy MariaDB, a PostgreSQL target.

``WORKER_COMMAND`` is ``tests/fake_workers/worker.sh``: it leaves a marker for every worker call,
sleeps a little before each migration (so runs overlap long enough to watch the queue), and behaves
by the run's ``usuario`` (real worker, silent, plain text, Pipes without a report, killable); see it.

Logs of both processes are written to files; :meth:`DagsterServices.log_tails` shows them, and the
test module prints them whenever a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus
from sqlalchemy import make_url

from demo.databases import throwaway_database
from demo.legacy_data import Tally, generate
from demo.sshd import SSHServer
from worker import schema

from .conftest import MARIADB_ADMIN, POSTGRES_ADMIN, WORKER_COMMAND, unavailable
from .ports import free_port

PROJECT = Path(__file__).resolve().parent.parent
FAKE_WORKERS = Path(__file__).resolve().parent / "fake_workers"
BIN = Path(sys.executable).parent
SISTEMAS = ("HSJ", "CLN01", "SUR_2")
WORKER_DELAY_SECONDS = 3
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def plain_postgres_url(url: str) -> str:
    """``postgresql://user@host:port/db``: the form of DAGSTER_PG_URL the README documents."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class GraphQLError(AssertionError):
    pass


# ------------------------------------------------------------------------------------------------
# GraphQL, as the UI sends it

LAUNCH_RUN = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status tags { key value } } }
    ... on PipelineConfigValidationInvalid { errors { __typename message reason path } }
    ... on Error { message }
    ... on PythonError { stack }
  }
}
"""

LAUNCH_BACKFILL = """
mutation LaunchBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId launchedRunIds }
    ... on PipelineConfigValidationInvalid { errors { __typename message reason path } }
    ... on Error { message }
    ... on PythonError { stack }
  }
}
"""

ADD_PARTITION = """
mutation AddPartition($repositorySelector: RepositorySelector!, $partitionsDefName: String!, $partitionKey: String!) {
  addDynamicPartition(
    repositorySelector: $repositorySelector, partitionsDefName: $partitionsDefName, partitionKey: $partitionKey
  ) {
    __typename
    ... on AddDynamicPartitionSuccess { partitionsDefName partitionKey }
    ... on Error { message }
  }
}
"""

REPOSITORIES = """
query Repositories {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection { nodes { name location { name } pipelines { name } } }
    ... on PythonError { message stack }
  }
}
"""

DAEMON_HEALTH = """
query DaemonHealth {
  instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } }
}
"""

RUN = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status tags { key value } }
    ... on Error { message }
  }
}
"""

RUN_EVENTS = """
query RunEvents($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message level eventType }
        ... on StepEvent { stepKey }
        ... on ErrorEvent { error { message stack className } }
        ... on ExecutionStepFailureEvent {
          failureMetadata { metadataEntries { label ... on TextMetadataEntry { text } } }
        }
      }
    }
    ... on Error { message }
  }
}
"""


@dataclass
class GraphQL:
    url: str

    def __call__(self, query: str, variables: Mapping[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as problem:
            raise GraphQLError(f"HTTP {problem.code}: {problem.read()[:2000]!r}") from None
        if answer.get("errors"):
            raise GraphQLError(json.dumps(answer["errors"], indent=1)[:4000])
        return answer["data"]


# ------------------------------------------------------------------------------------------------
# the deployment


@dataclass
class DagsterServices:
    """A running webserver + daemon on a production-configured instance, and what it works on."""

    home: Path
    env: dict[str, str]
    port: int
    logs: Path
    markers: Path
    legacy_url: str
    clinical_url: str
    pg_url: str
    sshd: SSHServer
    tally: Tally
    plain_home: Path
    location: str = ""
    repository: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _instance: DagsterInstance | None = None
    _plain_instance: DagsterInstance | None = None

    # --- GraphQL -------------------------------------------------------------------------------
    @property
    def graphql(self) -> GraphQL:
        return GraphQL(f"http://127.0.0.1:{self.port}/graphql")

    @property
    def repository_selector(self) -> dict[str, str]:
        return {"repositoryLocationName": self.location, "repositoryName": self.repository}

    def launch_run(
        self,
        job: str,
        run_config: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        assets: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """``launchPipelineExecution`` as the UI sends it: from an asset page (``job="__ASSET_JOB"``,
        ``assets``, only the partition tag) or from a job's launchpad."""
        selector: dict[str, Any] = {**self.repository_selector, "pipelineName": job}
        if assets is not None:
            selector["assetSelection"] = [{"path": [a]} for a in assets]
            selector["assetCheckSelection"] = []
        params = {
            "selector": selector,
            "mode": "default",
            "runConfigData": dict(run_config),
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
        }
        return self.graphql(LAUNCH_RUN, {"executionParams": params})["launchPipelineExecution"]

    def launch_asset_run(self, asset: str, partition: str, usuario: str, **config: Any) -> dict[str, Any]:
        return self.launch_run(
            "__ASSET_JOB",
            {"ops": {asset: {"config": {"usuario": usuario, **config}}}},
            {"dagster/partition": partition},
            [asset],
        )

    def launch_backfill(self, assets: Sequence[str], partitions: Sequence[str], run_config: Mapping[str, Any]):
        params = {
            "assetSelection": [{"path": [a]} for a in assets],
            "partitionNames": list(partitions),
            "runConfigData": dict(run_config),
            "tags": [],
        }
        return self.graphql(LAUNCH_BACKFILL, {"backfillParams": params})["launchPartitionBackfill"]

    def add_partition(self, key: str) -> dict[str, Any]:
        variables = {
            "repositorySelector": self.repository_selector,
            "partitionsDefName": "sistemas",
            "partitionKey": key,
        }
        return self.graphql(ADD_PARTITION, variables)["addDynamicPartition"]

    def run_events(self, run_id: str) -> list[dict[str, Any]]:
        answer = self.graphql(RUN_EVENTS, {"runId": run_id})["logsForRun"]
        assert answer["__typename"] == "EventConnection", answer
        return answer["events"]

    # --- the instance, from the test process ---------------------------------------------------
    @property
    def instance(self) -> DagsterInstance:
        if self._instance is None:
            with patched_environ({"DAGSTER_HOME": str(self.home), "DAGSTER_PG_URL": self.pg_url}):
                self._instance = DagsterInstance.from_config(str(self.home))
        return self._instance

    @property
    def plain_instance(self) -> DagsterInstance:
        """An instance WITHOUT the run queue (default run coordinator, SQLite under ``plain_home``): the
        only kind on which an in-process ``dagster asset materialize`` may run a migration at all."""
        if self._plain_instance is None:
            self._plain_instance = DagsterInstance.from_config(str(self.plain_home))
        return self._plain_instance

    @property
    def plain_env(self) -> dict[str, str]:
        env = {**self.env, "DAGSTER_HOME": str(self.plain_home)}
        env.pop("DAGSTER_PG_URL")
        return env

    def run(self, run_id: str) -> DagsterRun:
        run = self.instance.get_run_by_id(run_id)
        assert run is not None, f"no run {run_id}"
        return run

    def wait_for_runs(
        self, run_ids: Sequence[str], timeout: float = 120, every: float = 0.2, on_poll: Any = None
    ) -> list[DagsterRun]:
        """Poll until every run is finished; ``on_poll(runs)`` sees each sample."""
        deadline = time.monotonic() + timeout
        while True:
            runs = [self.run(run_id) for run_id in run_ids]
            if on_poll is not None:
                on_poll(runs)
            if all(run.status in FINISHED for run in runs):
                return runs
            if time.monotonic() > deadline:
                states = {run.run_id: run.status.value for run in runs}
                raise AssertionError(f"runs not finished after {timeout:.0f}s: {states}\n{self.log_tails()}")
            time.sleep(every)

    def describe(self, run_id: str, instance: DagsterInstance | None = None) -> str:
        """The run's status and its events, one line each, for assertion messages."""
        instance = instance or self.instance
        run = instance.get_run_by_id(run_id)
        assert run is not None, f"no run {run_id}"
        lines = [f"run {run_id} {run.job_name} {run.status.value} tags={dict(run.tags)}"]
        for record in instance.all_logs(run_id):
            event = record.dagster_event
            kind = event.event_type_value if event else "LOG"
            lines.append(f"  {kind}: {(record.user_message or '')[:600]!r}")
        return "\n".join(lines)

    # --- the CLI -------------------------------------------------------------------------------
    def cli(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """``dagster <args>`` from the project directory with the deployment's environment."""
        return subprocess.run(
            [str(BIN / "dagster"), *args],
            cwd=PROJECT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli_process(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        """``dagster <args>`` started in the background (stdout and stderr together)."""
        return subprocess.Popen(
            [str(BIN / "dagster"), *args],
            cwd=PROJECT,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    # --- markers the fake worker leaves --------------------------------------------------------
    def worker_calls(self, subcommand: str = "migrate") -> list[str]:
        """The argument lines of every worker call so far."""
        return [p.read_text().strip() for p in sorted(self.markers.glob(f"{subcommand}.*"))]

    def calls_by(self, usuario: str) -> list[str]:
        return [line for line in self.worker_calls() if f"--usuario {usuario} " in f"{line} "]

    # --- logs ----------------------------------------------------------------------------------
    def log_tails(self, lines: int = 60) -> str:
        out = []
        for name in ("webserver", "daemon"):
            path = self.logs / f"{name}.log"
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            out.append(f"----- {path} (last {lines} lines) -----\n" + "\n".join(text[-lines:]))
        return "\n".join(out)


@contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start(name: str, argv: Sequence[str], env: Mapping[str, str], logs: Path) -> subprocess.Popen[bytes]:
    with (logs / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            list(argv), cwd=PROJECT, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_group(process: subprocess.Popen[bytes], grace: float = 10) -> None:
    """SIGTERM the process's whole group, SIGKILL it after ``grace`` seconds."""
    if process.poll() is None or _group_alive(process.pid):
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(process.pid):
            process.poll()
            time.sleep(0.1)
        if _group_alive(process.pid):
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_until_ready(services: DagsterServices, timeout: float = 120) -> None:
    """The webserver answers with the code location loaded, and the daemons report healthy."""
    deadline = time.monotonic() + timeout
    problem: object = None
    needed = {"QUEUED_RUN_COORDINATOR", "BACKFILL", "SENSOR"}
    while time.monotonic() < deadline:
        for name, process in services.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}\n{services.log_tails()}")
        try:
            if not services.location:
                repos = services.graphql(REPOSITORIES, timeout=10)["repositoriesOrError"]
                if repos["__typename"] != "RepositoryConnection":
                    raise RuntimeError(f"the code location did not load: {repos}")
                (node,) = repos["nodes"]
                services.location, services.repository = node["location"]["name"], node["name"]
            statuses = services.graphql(DAEMON_HEALTH, timeout=10)["instance"]["daemonHealth"]["allDaemonStatuses"]
            healthy = {s["daemonType"] for s in statuses if s["healthy"]}
            if needed <= healthy:
                return
            problem = f"daemons not healthy yet: {statuses}"
        except (OSError, GraphQLError) as error:
            problem = error
        time.sleep(0.5)
    raise RuntimeError(f"webserver/daemon not ready after {timeout:.0f}s: {problem}\n{services.log_tails()}")


@contextmanager
def running_services(sshd: SSHServer, base: Path) -> Iterator[DagsterServices]:
    """Databases, an instance home, a webserver and a daemon; everything stopped and dropped after."""
    with ExitStack() as stack:
        try:
            pg_url = stack.enter_context(throwaway_database(POSTGRES_ADMIN, "dagster"))
            clinical_url = stack.enter_context(throwaway_database(POSTGRES_ADMIN, "clinical"))
            legacy_url = stack.enter_context(throwaway_database(MARIADB_ADMIN, "legacy"))
        except Exception as problem:
            unavailable(f"MariaDB/PostgreSQL ({type(problem).__name__}: {problem})")
        tally = generate(schema.make_engine(legacy_url), patients_per_sistema=50, sistemas=SISTEMAS, seed=5)

        home, logs, markers = base / "dagster_home", base / "logs", base / "markers"
        plain_home = base / "plain_home"
        for folder in (home, logs, markers, plain_home):
            folder.mkdir()
        shutil.copyfile(PROJECT / "dagster.yaml", home / "dagster.yaml")  # the production file, unchanged
        (plain_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        script = FAKE_WORKERS / "worker.sh"
        script.chmod(0o755)
        pg_plain = plain_postgres_url(pg_url)
        assert pg_plain.startswith("postgresql://postgres@127.0.0.1:5432/"), pg_plain
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "PYTEST_"))},
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_URL": pg_plain,
            "WORKER_TRANSPORT": "ssh",
            "SSH_HOST": sshd.host,
            "SSH_PORT": str(sshd.port),
            "SSH_USER": sshd.user,
            "SSH_KEY_FILE": sshd.key_file,
            "SSH_KNOWN_HOSTS": sshd.known_hosts,
            "WORKER_COMMAND": f"{script} {markers} {WORKER_DELAY_SECONDS} {WORKER_COMMAND}",
            "LEGACY_DB_URL": legacy_url,
            "CLINICAL_DB_URL": clinical_url,
        }
        for name in ("STATE_DB_URL", "MAX_DELETE_SHARE", "MIN_COVERAGE"):
            env.pop(name, None)
        port = free_port()
        services = DagsterServices(
            home=home,
            env=env,
            port=port,
            logs=logs,
            markers=markers,
            legacy_url=legacy_url,
            clinical_url=clinical_url,
            pg_url=pg_plain,
            sshd=sshd,
            tally=tally,
            plain_home=plain_home,
        )
        # the partitions the discovery sensor would add (it is RUNNING by default and also adds them)
        services.instance.add_dynamic_partitions("sistemas", list(SISTEMAS))
        services.plain_instance.add_dynamic_partitions("sistemas", list(SISTEMAS))
        stack.callback(lambda: services.instance.dispose())
        stack.callback(lambda: services.plain_instance.dispose())
        workspace = str(PROJECT / "workspace.yaml")
        webserver = [str(BIN / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1", "-p", str(port)]
        daemon = [str(BIN / "dagster-daemon"), "run", "-w", workspace]
        for name, argv in (("webserver", webserver), ("daemon", daemon)):
            process = _start(name, argv, env, logs)
            services.processes[name] = process
            stack.callback(stop_group, process)
        _wait_until_ready(services)
        yield services


@pytest.fixture(scope="module", name="dagster_services")
def dagster_services_fixture(sshd: SSHServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterServices]:
    """One webserver + daemon for the whole module (startup takes a while on two cores)."""
    with running_services(sshd, tmp_path_factory.mktemp("dagster_services")) as services:
        yield services


@pytest.fixture(name="show_service_logs_on_failure")
def show_service_logs_on_failure_fixture(
    request: pytest.FixtureRequest, dagster_services: DagsterServices
) -> Iterator[None]:
    """Print the webserver's and the daemon's log tails when the test fails (shown by pytest)."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        print(dagster_services.log_tails(120))
