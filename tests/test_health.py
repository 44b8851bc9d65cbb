"""Health checks (``make health``): every component up, each one taken down in turn against the real services
(sshd on loopback, MariaDB, PostgreSQL, the Firestore emulator, a local blob store), the command line's exit
codes, the worker's ``clinic-migrate health``, and the outage/recovery transitions as pure logic."""

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from demo.databases import throwaway_database
from demo.sshd import SSHServer, running_sshd
from migration_assets.operations import health
from migration_assets.operations.health import COMPONENTS, Component, HealthReport, check_all, remember, transitions
from resources.databases import DatabaseResource
from resources.firestore import FirestoreResource
from resources.ssh import SSHResource
from resources.worker import WorkerResource
from tests.conftest import MARIADB_ADMIN, POSTGRES_ADMIN, WORKER_COMMAND, unavailable
from tests.ports import free_port

integration = pytest.mark.integration
TIMEOUT = 2.0
PASSWORD = "pw-Secr3t-health"
VERSION = importlib.metadata.version("migration-platform")
CONFIG_VARIABLES = (
    *("WORKER_TRANSPORT", "WORKER_COMMAND", "SSH_HOST", "SSH_PORT", "SSH_USER", "SSH_KEY_FILE", "SSH_KNOWN_HOSTS"),
    *("LEGACY_DB_URL", "CLINICAL_DB_URL", "STATE_DB_URL", "DJANGO_DB_URL"),
    *("FIRESTORE_PROJECT", "FIRESTORE_EMULATOR_HOST", "BLOB_STORE_URL"),
)


@dataclass(frozen=True)
class Services:
    sshd: SSHServer
    legacy_url: str  # MariaDB
    clinical_url: str  # PostgreSQL, also the state DB
    django_url: str  # PostgreSQL
    firestore_host: str
    blob_dir: Path


@pytest.fixture(scope="module")
def services(sshd: SSHServer, firestore_emulator: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    with ExitStack() as stack:
        urls = []
        for admin, prefix in ((MARIADB_ADMIN, "health"), (POSTGRES_ADMIN, "health"), (POSTGRES_ADMIN, "health")):
            try:
                urls.append(stack.enter_context(throwaway_database(admin, prefix)))
            except Exception as problem:
                unavailable(f"{admin.split('+')[0]} ({type(problem).__name__})")
        blobs = tmp_path_factory.mktemp("health-blobs")
        yield Services(sshd, urls[0], urls[1], urls[2], firestore_emulator, blobs)


def ssh_resource(server: SSHServer, **overrides: Any) -> SSHResource:
    return SSHResource(**{**server.resource_kwargs(), "connect_timeout_seconds": TIMEOUT, **overrides})


def resources(s: Services, *, ssh: SSHResource | None = None, **overrides: Any) -> dict[str, Any]:
    worker = WorkerResource(
        transport="ssh", command=WORKER_COMMAND, ssh=ssh or ssh_resource(s.sshd), kill_grace_seconds=1
    )
    return {
        "worker": worker,
        "legacy_db": DatabaseResource(url=s.legacy_url),
        "clinical_db": DatabaseResource(url=s.clinical_url),
        "state_db": DatabaseResource(url=s.clinical_url),
        "django_db": DatabaseResource(url=s.django_url),
        "firestore": FirestoreResource(project="health-probe", emulator_host=s.firestore_host),
        "blob_store": str(s.blob_dir),
        **overrides,
    }


def check(s: Services, **overrides: Any) -> HealthReport:
    return check_all(**resources(s, **overrides), timeout_seconds=TIMEOUT)


def assert_states(report: HealthReport, down: Mapping[str, str], skipped: Collection[str] = ()) -> None:
    """``down``: name → category; ``skipped``: not checked; every other component up."""
    assert [c.name for c in report.components] == list(COMPONENTS)
    for component in report.components:
        if component.name in down:
            assert component.ok is False, component
            assert component.category == down[component.name], component
            assert component.message, component
        elif component.name in skipped:
            assert component.ok is None and component.skipped and component.message, component
        else:
            assert component.ok is True and component.category is None, component
    assert report.ok is (not down)
    assert PASSWORD not in report.to_json()


def url_with(url: str, *, port: int | None = None, database: str | None = None, password: str | None = PASSWORD) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(password=password)
    parsed = parsed.set(port=port) if port is not None else parsed
    parsed = parsed.set(database=database) if database is not None else parsed
    return parsed.render_as_string(hide_password=False)


# --------------------------------------------------------------------------- all up, then each one down


@integration
def test_all_up(services: Services) -> None:
    report = check(services)
    assert_states(report, {})
    worker = report.component("worker")
    assert worker.details["version"] == VERSION and worker.details["control_plane_version"] == VERSION
    assert report.component("state_db").details["worker_host"]["ok"] is True
    assert all(c.latency_ms is not None and c.latency_ms >= 0 for c in report.components)
    shape = json.loads(report.to_json())
    assert set(shape) == {"ok", "checked_at", "components"} and shape["ok"] is True
    assert datetime.fromisoformat(shape["checked_at"]).tzinfo is not None
    assert set(shape["components"][0]) == {"name", "ok", "skipped", "category", "message", "latency_ms", "details"}
    leftovers = [p for p in services.blob_dir.rglob("*") if p.is_file()]
    assert leftovers == []  # the blob store's probe is deleted


@integration
def test_sshd_stopped_is_a_connection_error(services: Services, tmp_path: Path) -> None:
    with running_sshd(tmp_path) as server:
        ssh = ssh_resource(server)
        assert check(services, ssh=ssh).component("ssh").ok is True
    report = check(services, ssh=ssh)
    assert_states(report, {"ssh": "CONNECTION_ERROR"}, skipped={"worker", "legacy_db", "clinical_db"})
    assert report.component("worker").message == "not checked: ssh is down"
    assert report.component("state_db").details["worker_host"]["ok"] is None  # from here only


@integration
def test_changed_host_key_is_refused(services: Services, tmp_path: Path) -> None:
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    kind, key = Path(f"{impostor}.pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{services.sshd.port} {kind} {key}\n")
    report = check(services, ssh=ssh_resource(services.sshd, known_hosts_file=str(known_hosts)))
    assert_states(report, {"ssh": "SSH_HOST_KEY_ERROR"}, skipped={"worker", "legacy_db", "clinical_db"})


@integration
def test_worker_missing_on_the_host(services: Services) -> None:
    missing = WorkerResource(transport="ssh", command=f"no-such-worker-{os.getpid()}", ssh=ssh_resource(services.sshd))
    report = check(services, worker=missing)
    assert_states(report, {"worker": "COMMAND_NOT_FOUND"}, skipped={"legacy_db", "clinical_db"})
    assert "is not installed" in str(report.component("worker").message)


@integration
def test_worker_missing_locally(services: Services, tmp_path: Path) -> None:
    missing = WorkerResource(transport="local", command=str(tmp_path / "clinic-migrate"))
    report = check(services, worker=missing)
    assert_states(report, {"worker": "COMMAND_NOT_FOUND"}, skipped={"ssh", "legacy_db", "clinical_db"})
    assert "WORKER_TRANSPORT=local" in str(report.component("ssh").message)


@integration
def test_local_worker_reports_the_databases(services: Services) -> None:
    report = check(services, worker=WorkerResource(transport="local", command=WORKER_COMMAND))
    assert_states(report, {}, skipped={"ssh"})
    assert report.component("worker").details["version"] == VERSION


@integration
@pytest.mark.parametrize(
    ("name", "how", "category"),
    [
        ("legacy_db", "closed port", "CONNECTION_ERROR"),
        ("legacy_db", "no such database", "CONNECTION_ERROR"),
        ("legacy_db", "wrong password", "AUTHENTICATION_ERROR"),  # MariaDB's root has none here
        ("clinical_db", "closed port", "CONNECTION_ERROR"),
        ("clinical_db", "no such database", "CONNECTION_ERROR"),
        ("state_db", "closed port", "CONNECTION_ERROR"),
        ("django_db", "no such database", "CONNECTION_ERROR"),
    ],
)
def test_database_down(services: Services, name: str, how: str, category: str) -> None:
    url = {"legacy_db": services.legacy_url, "django_db": services.django_url}.get(name, services.clinical_url)
    if how == "closed port":
        bad = url_with(url, port=free_port())
    elif how == "wrong password":
        bad = url_with(url)
    else:  # PostgreSQL here trusts loopback: a password is ignored; MariaDB would refuse it first
        bad = url_with(url, database="health_nowhere", password=PASSWORD if name != "legacy_db" else None)
    report = check(services, **{name: DatabaseResource(url=bad)})
    assert_states(report, {name: category})
    message = str(report.component(name).message)
    assert PASSWORD not in message and "://" not in message
    if name == "state_db":  # both sides see it down; the control plane's view is the message
        assert message.startswith("from the control plane: ")
        assert report.component(name).details["worker_host"]["ok"] is False


@integration
def test_database_that_never_answers_times_out(services: Services) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        report = check(
            services, django_db=DatabaseResource(url=url_with(services.django_url, port=silent.getsockname()[1]))
        )
    assert_states(report, {"django_db": "TIMEOUT_ERROR"})
    assert time.monotonic() - started < 3 * TIMEOUT + 5


@integration
def test_firestore_emulator_closed_port(services: Services) -> None:
    closed = FirestoreResource(project="health-probe", emulator_host=f"127.0.0.1:{free_port()}")
    report = check(services, firestore=closed)
    assert_states(report, {"firestore": "CONNECTION_ERROR"})


@integration
def test_blob_store_at_an_unusable_location(services: Services, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    report = check(services, blob_store=str(a_file / "blobs"))  # unwritable even for root
    assert_states(report, {"blob_store": "CONNECTION_ERROR"})
    assert str(tmp_path) not in str(report.component("blob_store").message)


def test_a_check_that_hangs_or_breaks_never_stops_the_others() -> None:
    def hang(found: dict[str, Component]) -> None:
        time.sleep(5)

    def breaks(found: dict[str, Component]) -> None:
        found["first"] = Component.up("first", time.monotonic())
        raise RuntimeError("surprise")

    groups = [
        health._Group(("slow", "after_slow"), hang, budget=0.3),
        health._Group(("first", "second", "third"), breaks, budget=1),
        health._Group(("fine",), lambda found: found.update(fine=Component.up("fine", time.monotonic())), budget=1),
    ]
    started = time.monotonic()
    results = health._run_isolated(groups)
    assert time.monotonic() - started < 2
    assert (results["slow"].ok, results["slow"].category) == (False, "TIMEOUT_ERROR")
    assert results["after_slow"].skipped and results["after_slow"].message == "not checked: slow is down"
    assert results["first"].ok is True
    assert (results["second"].category, results["second"].message) == ("SCRIPT_ERROR", "RuntimeError: surprise")
    assert results["third"].skipped
    assert results["fine"].ok is True


# --------------------------------------------------------------------------- the worker's own health command


@integration
def test_worker_health_command(services: Services) -> None:
    secrets = {
        "legacy_db_url": services.legacy_url,
        "target_db_url": url_with(services.clinical_url, port=free_port()),
    }
    done = subprocess.run(
        [WORKER_COMMAND, "health", "--timeout", "2"],
        input=json.dumps(secrets),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    said = json.loads(line)
    assert set(said) == {"worker_version", "legacy_db", "target_db", "state_db"}
    assert said["worker_version"] == VERSION
    assert said["legacy_db"]["ok"] is True and said["legacy_db"]["error"] is None
    assert said["target_db"]["ok"] is False and said["target_db"]["error"].startswith("CONNECTION_ERROR: ")
    assert said["state_db"] == {
        "ok": False,
        "error": "VALIDATION_ERROR: stdin JSON lacks state_db_url",
        "latency_ms": None,
    }
    assert PASSWORD not in done.stdout + done.stderr


# --------------------------------------------------------------------------- the command line


def environment(s: Services, **changes: str | None) -> dict[str, str]:
    """The production-shaped environment (the worker over SSH), with ``changes`` (None: unset)."""
    values = {
        "WORKER_TRANSPORT": "ssh",
        "WORKER_COMMAND": WORKER_COMMAND,
        "SSH_HOST": s.sshd.host,
        "SSH_PORT": str(s.sshd.port),
        "SSH_USER": s.sshd.user,
        "SSH_KEY_FILE": s.sshd.key_file,
        "SSH_KNOWN_HOSTS": s.sshd.known_hosts,
        "LEGACY_DB_URL": s.legacy_url,
        "CLINICAL_DB_URL": s.clinical_url,
        "DJANGO_DB_URL": s.django_url,
        "FIRESTORE_PROJECT": "health-probe",
        "FIRESTORE_EMULATOR_HOST": s.firestore_host,
        "BLOB_STORE_URL": str(s.blob_dir),
        **changes,
    }
    return {name: value for name, value in values.items() if value is not None}


def run_cli(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "migration_assets.operations.health", "--timeout", str(TIMEOUT)],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@integration
def test_cli_all_up_exits_0(services: Services) -> None:
    done = run_cli(environment(services))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert [c["name"] for c in report["components"]] == list(COMPONENTS)
    assert all(c["ok"] is True for c in report["components"])
    assert next(c for c in report["components"] if c["name"] == "worker")["details"]["version"] == VERSION


@integration
def test_cli_something_down_exits_1(
    services: Services, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in CONFIG_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    bad_django = url_with(services.django_url, port=free_port())
    env = environment(services, WORKER_TRANSPORT="local", SSH_HOST=None, DJANGO_DB_URL=bad_django)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert health.main(["--timeout", str(TIMEOUT)]) == 1
    out = capsys.readouterr().out
    report = json.loads(out)
    states = {c["name"]: (c["ok"], c["skipped"], c["category"]) for c in report["components"]}
    assert states["django_db"] == (False, False, "CONNECTION_ERROR")
    assert states["ssh"] == (None, True, None)  # not configured: WORKER_TRANSPORT=local
    assert all(ok for name, (ok, skipped, _) in states.items() if name not in ("django_db", "ssh"))
    assert report["ok"] is False and PASSWORD not in out


@integration
def test_cli_missing_variable_exits_2(services: Services) -> None:
    done = run_cli(environment(services, FIRESTORE_PROJECT=None))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["VALIDATION_ERROR: FIRESTORE_PROJECT is not set (the app group's target)"]


def test_cli_missing_ssh_settings_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in CONFIG_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert health.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("VALIDATION_ERROR: SSH_HOST is not set (needed when WORKER_TRANSPORT=ssh); ")
    assert "LEGACY_DB_URL is not set" in captured.err and "BLOB_STORE_URL is not set" in captured.err


# --------------------------------------------------------------------------- transitions (pure)


def report(**states: bool | None) -> HealthReport:
    def component(name: str, ok: bool | None) -> Component:
        if ok is None:
            return Component.skip(name, "not checked: ssh is down")
        return Component(name, True) if ok else Component.down(name, "CONNECTION_ERROR", "refused")

    return HealthReport(datetime.now(UTC), tuple(component(n, ok) for n, ok in states.items()))


def names(components: list[Component]) -> list[str]:
    return [c.name for c in components]


def test_first_check_with_a_component_down_is_one_outage() -> None:
    down, recovered = transitions(None, report(ssh=True, firestore=False, blob_store=True))
    assert (names(down), recovered) == (["firestore"], [])


def test_same_state_again_is_nothing() -> None:
    first = report(ssh=True, firestore=False)
    state = remember(None, first)
    assert transitions(state, report(ssh=True, firestore=False)) == ([], [])


def test_recovery_is_one_recovered() -> None:
    state = remember(None, report(ssh=True, firestore=False))
    down, recovered = transitions(state, report(ssh=True, firestore=True))
    assert (down, names(recovered)) == ([], ["firestore"])
    assert transitions(remember(state, report(ssh=True, firestore=True)), report(ssh=True, firestore=True)) == ([], [])


def test_up_to_down_and_unknown_to_down_are_outages() -> None:
    down, _ = transitions({"ssh": True}, report(ssh=False, worker=False))
    assert names(down) == ["ssh", "worker"]  # worker: unknown before


def test_a_component_not_checked_changes_nothing_and_keeps_its_state() -> None:
    state = remember(None, report(ssh=True, legacy_db=False))
    hidden = report(ssh=False, legacy_db=None)  # legacy_db hidden behind ssh
    down, recovered = transitions(state, hidden)
    assert (names(down), recovered) == (["ssh"], [])
    state = remember(state, hidden)
    assert state == {"ssh": False, "legacy_db": False}
    down, recovered = transitions(state, report(ssh=True, legacy_db=False))  # still the same legacy_db outage
    assert (down, names(recovered)) == ([], ["ssh"])


# --- the health sensor: one alert per outage, one on recovery ---------------------------------------


@integration
def test_the_health_sensor_alerts_each_outage_once_and_each_recovery_once(
    services: Services, tmp_path: Path, httpserver: Any
) -> None:
    from dagster import build_sensor_context

    from migration_assets.operations.sensors import health_sensor, health_tick
    from resources.alerts import AlertResource

    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    alerts = AlertResource(webhook_url=httpserver.url_for("/hook"), state_db_url=f"sqlite:///{tmp_path / 's.db'}")

    def sent() -> list[tuple[str, str]]:
        return [(a["type"], a["entity"]) for a in (json.loads(r.get_data()) for r, _ in httpserver.log)]

    def tick(cursor: str | None, **down: Any) -> str | None:
        return health_tick(cursor, check(services, **down), alerts).cursor

    cursor = tick(None)
    assert sent() == []  # all up: nothing to say
    closed = f"127.0.0.1:{free_port()}"
    takedowns = {  # each dependency taken down in turn
        "clinical_db": {"clinical_db": DatabaseResource(url=url_with(services.clinical_url, port=free_port()))},
        "django_db": {"django_db": DatabaseResource(url=url_with(services.django_url, port=free_port()))},
        "firestore": {"firestore": FirestoreResource(project="health-probe", emulator_host=closed)},
        "blob_store": {"blob_store": str(tmp_path / "a-file" / "blobs")},
        "ssh": {"ssh": ssh_resource(services.sshd, port=free_port())},
    }
    (tmp_path / "a-file").write_text("not a folder")
    expected: list[tuple[str, str]] = []
    for name, down in takedowns.items():
        before = cursor
        cursor = tick(cursor, **down)
        expected.append(("HEALTH_DOWN", name))
        assert sent() == expected, name
        cursor = tick(cursor, **down)  # still down: nothing more
        tick(before, **down)  # the same tick again after a crash (its cursor not saved): nothing more
        assert sent() == expected, name
        cursor = tick(cursor)
        expected.append(("HEALTH_RECOVERED", name))
        assert sent() == expected, name
    # a second outage of the same component is a new alert
    cursor = tick(cursor, **takedowns["firestore"])
    assert sent()[-1] == ("HEALTH_DOWN", "firestore") and len(sent()) == len(expected) + 1

    # the sensor itself, without its settings: a skip that names them, no alert, no exception
    with pytest.MonkeyPatch.context() as patch:
        for name in CONFIG_VARIABLES:
            patch.delenv(name, raising=False)
        result = health_sensor(build_sensor_context(cursor=cursor), alerts=alerts)
    assert result.skip_reason is not None and "not configured" in str(result.skip_reason.skip_message)
    assert result.cursor == cursor
