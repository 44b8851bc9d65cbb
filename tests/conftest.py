"""Real services for the integration tests: MariaDB, PostgreSQL and an OpenSSH sshd.

The databases are the ones running on every machine of the project (127.0.0.1:3306 and :5432);
each test gets fresh, uniquely named databases, dropped afterwards. sshd is started by the tests
on a free loopback port with generated host and client keys and a known_hosts file. Outside CI
a missing service skips the tests that need it; under CI=true it fails them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

MARIADB_ADMIN = os.getenv("TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/mysql")
POSTGRES_ADMIN = os.getenv("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
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


@dataclass(frozen=True)
class SSHServer:
    host: str
    port: int
    user: str
    key_file: str
    known_hosts: str
    other_key_file: str  # a key sshd does not accept
    home: Path
    host_key: str

    def resource_kwargs(self) -> dict[str, object]:
        return {
            "host": self.host,
            "port": self.port,
            "username": self.user,
            "key_file": self.key_file,
            "known_hosts_file": self.known_hosts,
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """OpenSSH's sshd on a loopback port, key auth only, for the current user."""
    if not os.path.exists(SSHD) or not shutil.which("ssh-keygen"):
        unavailable("OpenSSH sshd (apt-get install openssh-server)")
    home = tmp_path_factory.mktemp("sshd")
    host_key, client_key, other_key = home / "host_key", home / "client_key", home / "other_key"
    for key in (host_key, client_key, other_key):
        _keygen(key)
    authorized = home / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    authorized.chmod(0o600)
    port = _free_port()
    config = home / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {home / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                "AllowTcpForwarding no",
                "X11Forwarding no",
                "PrintMotd no",
                "MaxStartups 50",
                "MaxSessions 50",
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    log = home / "sshd.log"
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=log.open("w"))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"sshd exited: {log.read_text()}")
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail("sshd did not start listening")
    public = Path(f"{host_key}.pub").read_text().split()
    known_hosts = home / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {public[0]} {public[1]}\n")
    import getpass

    yield SSHServer(
        host="127.0.0.1",
        port=port,
        user=getpass.getuser(),
        key_file=str(client_key),
        known_hosts=str(known_hosts),
        other_key_file=str(other_key),
        home=home,
        host_key=str(host_key),
    )
    process.terminate()
    process.wait(timeout=10)
