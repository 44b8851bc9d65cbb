"""Real services for the integration tests: MariaDB, PostgreSQL and an OpenSSH sshd.

The databases are the ones running on every machine of the project (127.0.0.1:3306 and :5432);
each test gets fresh, uniquely named databases, dropped afterwards. sshd is started by the tests
on a free loopback port with generated host and client keys and a known_hosts file. Outside CI
a missing service skips the tests that need it; under CI=true it fails them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

# Loaded as a full run that reads through connectorx loads it, whatever test comes first: the worker's COPYs
# in tests then take the binary form such a run takes (worker/store.py, _copy_into).
import pyarrow  # noqa: F401
import pytest

import checks  # noqa: F401  first: gRPC's fork() handlers off before anything imports gRPC (checks/__init__.py)
from demo import databases
from demo.databases import throwaway_database
from demo.sshd import SSHServer, running_sshd, sshd_available

from .mail import Mailbox, start_mailbox
from .ports import free_port

MARIADB_ADMIN = os.getenv("TEST_MARIADB_URL", databases.MARIADB_ADMIN)
POSTGRES_ADMIN = os.getenv("TEST_POSTGRES_URL", databases.POSTGRES_ADMIN)
WORKER_COMMAND = str(Path(sys.executable).with_name("clinic-migrate"))
IN_CI = os.getenv("CI", "").lower() == "true"


def patients_snapshot(engine: Any) -> str:
    """A digest of every target patient row as it stands (to show a run changed nothing)."""
    digest = "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM clinical.patients t"
    with engine.connect() as conn:
        return str(conn.exec_driver_sql(digest).scalar())


def unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true")
    pytest.skip(f"{what} is not available")


def _fresh_database(admin_url: str, prefix: str) -> Iterator[str]:
    with ExitStack() as stack:
        try:
            url = stack.enter_context(throwaway_database(admin_url, prefix))
        except Exception as problem:
            unavailable(f"{admin_url.split('+')[0]} ({type(problem).__name__})")
        yield url


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A fresh MariaDB database: the legacy clinical source."""
    yield from _fresh_database(MARIADB_ADMIN, "legacy")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database: the clinical target and the control DB."""
    yield from _fresh_database(POSTGRES_ADMIN, "clinical")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """OpenSSH's sshd on a loopback port, key auth only, for the current user."""
    if not sshd_available():
        unavailable("OpenSSH sshd (apt-get install openssh-server)")
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="session")
def firestore_emulator() -> Iterator[str]:
    """Google's Cloud Firestore emulator on a loopback port, for the whole session: its host."""
    from demo.firestore_emulator import emulator_available, running_emulator

    if not emulator_available():
        unavailable("Google's Cloud Firestore emulator (apt-get install google-cloud-cli-firestore-emulator)")
    with running_emulator() as host:
        yield host


@pytest.fixture
def firestore_project(firestore_emulator: str) -> Iterator[str]:
    """A fresh project id on the emulator, so each test sees an empty database; cleared afterwards.

    The emulator host goes to ``FirestoreResource(emulator_host=...)``, never to the process env.
    """
    import uuid

    from demo.firestore_emulator import clear_documents

    project = f"test-{uuid.uuid4().hex[:8]}"
    yield project
    clear_documents(firestore_emulator, project)


@pytest.fixture
def smtp_server() -> Iterator[Mailbox]:
    """A real SMTP server (aiosmtpd) on a free loopback port, requiring a login: where alerts go."""
    mailbox = Mailbox(free_port())
    controller = start_mailbox(mailbox)
    yield mailbox
    controller.stop()
