"""Health of everything a migration needs (issue 10): ``make health``, and what a sensor checks every 5 minutes.

``check_all`` checks each component on its own, at once, each within its own time limit, so one that
fails or hangs never stops the others:

- ``ssh``: a connection to the legacy host with the real host-key policy (known_hosts, RejectPolicy, key);
- ``worker``: ``command -v`` of the worker there, then ``clinic-migrate health`` through the same transport
  the ``WorkerResource`` uses (SSH, or a local subprocess when ``WORKER_TRANSPORT=local``): its version, and
  the legacy and clinical databases as seen from the legacy host (``legacy_db``, ``clinical_db``; the control
  plane may not reach the legacy DB at all);
- ``state_db``: ``SELECT 1`` from here and from the legacy host (the worker writes its ledger there too);
- ``django_db``: ``SELECT 1`` from here; ``firestore``: a read of one document that does not exist;
- ``blob_store``: a tiny probe object written, read back and deleted under the store's ``.partial/`` prefix.

A component is up (``ok: true``), down (``ok: false``, with a §8 category and a short redacted message), or
not checked (``ok: null``, ``skipped: true``, with the reason: not configured, or its way in is down).
``transitions`` turns two consecutive checks into what to alert on: an outage once, its recovery once.

``python -m migration_assets.operations.health`` builds the resources from the environment as the
Definitions do and prints the report as JSON; exit code 0 when nothing is down, 1 when something is, 2
when the configuration is incomplete (one short line on stderr).
"""

import argparse
import contextlib
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions

from resources import database_from_env, env, firestore_from_env, worker_from_env
from resources.blobstore import PARTIAL_PREFIX, BlobStore
from resources.databases import DatabaseResource
from resources.errors import Category, MigrationError
from resources.firestore import FirestoreResource
from resources.worker import WorkerResource
from worker.cli import probe_database, worker_version
from worker.redact import redact

COMPONENTS = ("ssh", "worker", "legacy_db", "clinical_db", "state_db", "django_db", "firestore", "blob_store")
DEFAULT_TIMEOUT_SECONDS = 10.0
PROBE_COLLECTION = "migration-health"  # Firestore: a document of it is read, never written
EXIT_OK, EXIT_DOWN, EXIT_CONFIGURATION = 0, 1, 2
_STATE_FROM_WORKER = "state_db (worker host)"  # the worker's view of the state DB, merged into state_db
_LEGACY_HOST = ("ssh", "worker", "legacy_db", "clinical_db", _STATE_FROM_WORKER)


def _elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


@dataclass(frozen=True)
class Component:
    """One component's state: ``ok`` True (up), False (down) or None (not checked: ``skipped``)."""

    name: str
    ok: bool | None
    category: str | None = None
    message: str | None = None
    latency_ms: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        return self.ok is None

    @classmethod
    def up(cls, name: str, started: float, **details: Any) -> "Component":
        return cls(name, True, latency_ms=_elapsed_ms(started), details=details)

    @classmethod
    def down(cls, name: str, category: str, message: str, started: float | None = None, **details: Any) -> "Component":
        """Down, with a §8 category and a short message, redacted here whatever its source."""
        latency = None if started is None else _elapsed_ms(started)
        return cls(name, False, str(category), redact(message)[:300], latency, details)

    @classmethod
    def failed(cls, name: str, problem: BaseException, started: float | None = None, **details: Any) -> "Component":
        """Down because of ``problem``: a ``MigrationError`` keeps its category, anything else is a SCRIPT_ERROR."""
        if isinstance(problem, MigrationError):
            return cls.down(name, problem.category, problem.message, started, **details)
        first = next((line.strip() for line in str(problem).splitlines() if line.strip()), "")
        return cls.down(name, Category.SCRIPT_ERROR, f"{type(problem).__name__}: {first}", started, **details)

    @classmethod
    def skip(cls, name: str, reason: str) -> "Component":
        return cls(name, None, message=reason)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "skipped": self.skipped,
            "category": self.category,
            "message": self.message,
            "latency_ms": self.latency_ms,
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class HealthReport:
    checked_at: datetime
    components: tuple[Component, ...]

    @property
    def ok(self) -> bool:
        """Nothing is down (a component not checked is not down)."""
        return not any(c.ok is False for c in self.components)

    @property
    def down(self) -> list[Component]:
        return [c for c in self.components if c.ok is False]

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def states(self) -> dict[str, bool]:
        """Up (True) or down (False) by name, of the components that were checked."""
        return {c.name: c.ok for c in self.components if c.ok is not None}

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked_at": self.checked_at.isoformat(timespec="seconds"),
            "components": [c.as_dict() for c in self.components],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)


# --------------------------------------------------------------------------- what changed between two checks


def transitions(previous: Mapping[str, bool] | None, current: HealthReport) -> tuple[list[Component], list[Component]]:
    """``(down, recovered)``: the components that are down now and were up or unknown before (no previous
    check, or not checked), and those that are up now and were down. A component not checked now changes
    nothing. ``previous`` is what ``remember`` kept of the checks before; pure, for a sensor's cursor."""
    before = previous or {}
    down = [c for c in current.components if c.ok is False and before.get(c.name) is not False]
    recovered = [c for c in current.components if c.ok is True and before.get(c.name) is False]
    return down, recovered


def remember(previous: Mapping[str, bool] | None, current: HealthReport) -> dict[str, bool]:
    """The last known state of each component after ``current``: a component not checked this time keeps
    its earlier state, so an outage seen, then hidden behind another (its way in down), then seen again, is
    still one outage. What a sensor keeps in its cursor between two checks."""
    return {**(previous or {}), **current.states()}


# --------------------------------------------------------------------------- the checks


def _database_component(name: str, said: Mapping[str, Any], **details: Any) -> Component:
    """A component from one ``probe_database`` answer (``{"ok", "error", "latency_ms"}``)."""
    latency = said.get("latency_ms")
    if said.get("ok"):
        return Component(name, True, latency_ms=latency, details=details)
    category, _, message = str(said.get("error") or "SCRIPT_ERROR: no answer").partition(": ")
    if category not in Category.__members__:
        category, message = Category.SCRIPT_ERROR, str(said.get("error"))
    return Component(name, False, category, redact(message)[:300], latency, details)


# What the SSH connection itself fails with (WorkerResource.host: connect, host key, key): the host's
# fault; anything after it (the worker missing, failing, timing out) is the worker's.
SSH_DOWN = frozenset({Category.CONNECTION_ERROR, Category.SSH_HOST_KEY_ERROR, Category.AUTHENTICATION_ERROR})


def _check_legacy_host(
    worker: WorkerResource, secrets: Mapping[str, str], timeout: float, found: dict[str, Component]
) -> None:
    """``ssh``, then ``worker`` (which reports the databases as the legacy host sees them): one run of
    ``clinic-migrate health`` through the worker's own transport (``WorkerResource.run_json``)."""
    if worker.transport == "ssh" and worker.ssh is None:
        found["ssh"] = Component.down("ssh", Category.VALIDATION_ERROR, "WORKER_TRANSPORT=ssh needs the SSH_* settings")
        return
    started = time.monotonic()
    budget = 2 * timeout  # the worker's start, then its database checks (at once, each within ``timeout``)
    try:
        said = worker.run_json(["health", "--timeout", f"{timeout:g}"], secrets, budget)
        if "worker_version" not in said:
            raise MigrationError(Category.SCRIPT_ERROR, "the worker printed no health report", ours=True)
    except Exception as problem:
        if worker.transport == "ssh" and getattr(problem, "category", None) in SSH_DOWN:
            found["ssh"] = Component.failed("ssh", problem, started)
            return
        found["ssh"] = _host_reached(worker, started)
        found["worker"] = Component.failed("worker", problem, started, transport=worker.transport)
        return
    found["ssh"] = _host_reached(worker, started)
    found["worker"] = Component.up(
        "worker",
        started,
        version=said.get("worker_version"),
        control_plane_version=worker_version(),
        transport=worker.transport,
    )
    for name, key in (("legacy_db", "legacy_db"), ("clinical_db", "target_db"), (_STATE_FROM_WORKER, "state_db")):
        found[name] = _database_component(name, said.get(key) or {}, seen_from="worker host")


def _host_reached(worker: WorkerResource, started: float) -> Component:
    if worker.transport == "local":
        return Component.skip("ssh", "WORKER_TRANSPORT=local: the worker runs on this host, not over SSH")
    assert worker.ssh is not None
    return Component.up("ssh", started, host=worker.ssh.host, port=worker.ssh.port)


def _check_database(name: str, database: DatabaseResource, timeout: float, found: dict[str, Component]) -> None:
    found[name] = _database_component(name, probe_database(database.url, timeout), seen_from="control plane")


def _firestore_category(problem: BaseException) -> Category:
    if isinstance(problem, (api_exceptions.DeadlineExceeded, TimeoutError)):
        return Category.TIMEOUT_ERROR
    if isinstance(problem, (api_exceptions.PermissionDenied, api_exceptions.Unauthenticated)):
        return Category.AUTHENTICATION_ERROR
    if isinstance(problem, auth_exceptions.GoogleAuthError):
        return Category.AUTHENTICATION_ERROR
    return Category.CONNECTION_ERROR


def _check_firestore(firestore: FirestoreResource, timeout: float, found: dict[str, Component]) -> None:
    """Read one document that does not exist: proves the endpoint answers and the credentials may read."""
    started = time.monotonic()
    details = {"emulator": firestore.is_emulator, "project": firestore.project}
    try:
        client = firestore.client()
        try:
            client.collection(PROBE_COLLECTION).document("probe").get(retry=None, timeout=timeout)
        finally:
            client.close()
    except Exception as problem:
        said = getattr(problem, "message", None) or str(problem)
        first = next((line.strip() for line in str(said).splitlines() if line.strip()), "")
        message = f"{type(problem).__name__}: {first}"
        found["firestore"] = Component.down("firestore", _firestore_category(problem), message, started, **details)
        return
    found["firestore"] = Component.up("firestore", started, **details)


def _check_blob_store(store: BlobStore | str, found: dict[str, Component]) -> None:
    """Write a few bytes under the store's ``.partial/`` prefix (where unfinished blobs live), read them
    back and delete them: reachable, writable, and nothing left behind."""
    started = time.monotonic()
    try:
        blobs = BlobStore(store) if isinstance(store, str) else store
        path = f"{blobs.root}/{PARTIAL_PREFIX}/health-{uuid.uuid4().hex}"
        payload = f"health probe {uuid.uuid4().hex}".encode()
        if blobs.local:
            blobs.fs.makedirs(f"{blobs.root}/{PARTIAL_PREFIX}", exist_ok=True)
        try:
            with blobs.fs.open(path, "wb") as writer:
                writer.write(payload)
            with blobs.fs.open(path, "rb") as reader:
                back = reader.read()
        finally:
            with contextlib.suppress(FileNotFoundError):
                blobs.fs.rm_file(path)
        if back != payload:
            raise MigrationError(
                Category.CONNECTION_ERROR, "the blob store returned other bytes than written", ours=True
            )
    except MigrationError as problem:
        found["blob_store"] = Component.failed("blob_store", problem, started)
        return
    except OSError as problem:  # no path and no URL in the message: they may carry credentials
        category = Category.AUTHENTICATION_ERROR if isinstance(problem, PermissionError) else Category.CONNECTION_ERROR
        what = problem.strerror or next(iter(str(problem).splitlines()), "") or "no detail"
        message = f"cannot write to the blob store: {type(problem).__name__}: {what}"
        found["blob_store"] = Component.down("blob_store", category, message, started)
        return
    found["blob_store"] = Component.up("blob_store", started, kind="local" if blobs.local else blobs.fs.protocol)


# --------------------------------------------------------------------------- running them, isolated


@dataclass
class _Group:
    """Components checked by one function in one thread, in order (a later one may need an earlier one)."""

    names: tuple[str, ...]
    check: Callable[[dict[str, Component]], None]
    budget: float
    found: dict[str, Component] = field(default_factory=dict)
    thread: threading.Thread | None = None

    def run(self) -> None:
        try:
            self.check(self.found)
        except Exception as problem:  # a bug or a surprise in one check never stops the others
            name = next((n for n in self.names if n not in self.found), None)
            if name is not None:
                self.found[name] = Component.failed(name, problem)

    def results(self, timed_out: bool) -> list[Component]:
        """Every name's result; after the first one missing (the one that hung) the rest were not checked."""
        found = dict(self.found)  # a thread past its time may still write: take what it had
        results: list[Component] = []
        blocker: Component | None = next((c for c in found.values() if c.ok is False), None)
        for name in self.names:
            if name in found:
                results.append(found[name])
            elif timed_out and blocker is None:
                blocker = Component.down(name, Category.TIMEOUT_ERROR, f"no answer within {self.budget:g} s")
                results.append(blocker)
            else:
                why = f"{blocker.name} is down" if blocker is not None else "nothing checked it"
                results.append(Component.skip(name, f"not checked: {why}"))
        return results


def _run_isolated(groups: Sequence[_Group]) -> dict[str, Component]:
    """Run every group in its own daemon thread at once; wait for each until its budget is spent."""
    started = time.monotonic()
    for group in groups:
        group.thread = threading.Thread(target=group.run, name=f"health-{group.names[0]}", daemon=True)
        group.thread.start()
    results: dict[str, Component] = {}
    for group in groups:
        assert group.thread is not None
        group.thread.join(max(0.0, started + group.budget - time.monotonic()))
        results |= {c.name: c for c in group.results(timed_out=group.thread.is_alive())}
    return results


def _merge_state_db(here: Component, there: Component | None) -> Component:
    """The state DB is up when both the control plane and the worker host (when it was asked) reach it."""
    details = {
        side: None if view is None else {"ok": view.ok, "category": view.category, "latency_ms": view.latency_ms}
        for side, view in (("control_plane", here), ("worker_host", there))
    }
    for side, view in (("control plane", here), ("worker host", there)):
        if view is not None and view.ok is False:
            message = f"from the {side}: {view.message}"
            return Component("state_db", False, view.category, message, here.latency_ms, details)
    if here.ok is None:
        return Component("state_db", None, message=here.message, details=details)
    return Component("state_db", True, latency_ms=here.latency_ms, details=details)


def check_all(
    *,
    worker: WorkerResource,
    legacy_db: DatabaseResource,
    clinical_db: DatabaseResource,
    state_db: DatabaseResource,
    django_db: DatabaseResource,
    firestore: FirestoreResource,
    blob_store: BlobStore | str,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> HealthReport:
    """Check every component (see the module's docstring); never raises. ``blob_store`` may be the store's
    URL: the store is then opened inside its check (opening a local folder creates it, which may fail).
    ``timeout_seconds`` bounds each database connection, the Firestore read and the worker's run (twice:
    its start, then its own database checks); the SSH connection keeps ``SSHResource.connect_timeout_seconds``."""
    timeout = float(timeout_seconds)
    secrets = {"legacy_db_url": legacy_db.url, "target_db_url": clinical_db.url, "state_db_url": state_db.url}
    ssh_budget = worker.ssh.connect_timeout_seconds + timeout if worker.ssh is not None else 0.0
    groups = [
        _Group(
            _LEGACY_HOST,
            lambda found: _check_legacy_host(worker, secrets, timeout, found),
            ssh_budget + 2 * timeout + worker.kill_grace_seconds + 1,
        ),
        _Group(("state_db",), lambda found: _check_database("state_db", state_db, timeout, found), timeout + 2),
        _Group(("django_db",), lambda found: _check_database("django_db", django_db, timeout, found), timeout + 2),
        _Group(("firestore",), lambda found: _check_firestore(firestore, timeout, found), timeout + 2),
        _Group(("blob_store",), lambda found: _check_blob_store(blob_store, found), timeout + 2),
    ]
    checked_at = datetime.now(UTC)
    results = _run_isolated(groups)
    results["state_db"] = _merge_state_db(results["state_db"], results.pop(_STATE_FROM_WORKER, None))
    return HealthReport(checked_at, tuple(results[name] for name in COMPONENTS))


# --------------------------------------------------------------------------- the command line


class ConfigurationError(Exception):
    """A variable is missing or malformed; the message names it (never its value)."""


def resources_from_env() -> dict[str, Any]:
    """``check_all``'s resources from the environment, built as the Definitions build them (the same
    variables, the same constructors); every problem at once as one ``ConfigurationError``."""
    problems: list[str] = []

    def build(factory: Callable[[], Any]) -> Any:
        try:
            return factory()
        except MigrationError as problem:
            problems.append(problem.message)
            return None

    resources = {
        "worker": build(worker_from_env),
        "legacy_db": build(lambda: database_from_env("LEGACY_DB_URL")),
        "clinical_db": build(lambda: database_from_env("CLINICAL_DB_URL")),
        "state_db": build(lambda: database_from_env("STATE_DB_URL", fallback="CLINICAL_DB_URL")),
        "django_db": build(lambda: database_from_env("DJANGO_DB_URL")),
        "firestore": build(firestore_from_env),
        # the URL only: opening the store (a local folder is created) is part of its check
        "blob_store": build(lambda: env("BLOB_STORE_URL", needed_for="the files' contents")),
    }
    if problems:
        raise ConfigurationError("; ".join(dict.fromkeys(problems)))
    return resources


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m migration_assets.operations.health", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="seconds each check may take (default 10)"
    )
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        print("VALIDATION_ERROR: --timeout must be a positive number of seconds", file=sys.stderr)
        return EXIT_CONFIGURATION
    try:
        resources = resources_from_env()
    except ConfigurationError as problem:
        print(f"{Category.VALIDATION_ERROR}: {problem}", file=sys.stderr)
        return EXIT_CONFIGURATION
    report = check_all(**resources, timeout_seconds=args.timeout)
    print(report.to_json(), flush=True)
    return EXIT_OK if report.ok else EXIT_DOWN


if __name__ == "__main__":
    sys.exit(main())
