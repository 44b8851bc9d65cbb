"""Real services for the integration tests: MariaDB, PostgreSQL and an OpenSSH sshd.

The databases are the ones running on every machine of the project (127.0.0.1:3306 and :5432);
each test gets fresh, uniquely named databases, dropped afterwards. sshd is started by the tests
on a free loopback port with generated host and client keys and a known_hosts file. Outside CI
a missing service skips the tests that need it; under CI=true it fails them.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from demo.sshd import SSHServer, running_sshd, sshd_available

MARIADB_ADMIN = os.getenv("TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/mysql")
POSTGRES_ADMIN = os.getenv("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
WORKER_COMMAND = str(Path(sys.executable).with_name("clinic-migrate"))
IN_CI = os.getenv("CI", "").lower() == "true"


def unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true")
    pytest.skip(f"{what} is not available")


def _fresh_database(admin_url: str, prefix: str) -> Iterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except Exception as problem:
        unavailable(f"{admin_url.split('+')[0]} ({type(problem).__name__})")
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        if admin.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
    admin.dispose()


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
