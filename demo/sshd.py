"""A throw-away OpenSSH sshd on a loopback port: generated host and client keys, key auth only.

Used by the integration tests and the benchmarks to exercise the real SSH path on one machine.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass(frozen=True)
class SSHServer:
    host: str
    port: int
    user: str
    key_file: str
    known_hosts: str
    other_key_file: str  # a key sshd does not accept
    home: Path

    def resource_kwargs(self) -> dict[str, object]:
        return {
            "host": self.host,
            "port": self.port,
            "username": self.user,
            "key_file": self.key_file,
            "known_hosts_file": self.known_hosts,
        }


def sshd_available() -> bool:
    return Path(SSHD).exists() and shutil.which("ssh-keygen") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@contextmanager
def running_sshd(home: Path, channels: bool = True) -> Iterator[SSHServer]:
    """Start sshd for the current user in ``home``; stop it on exit. ``channels``: channels to loopback ports
    of the host are allowed (a resident worker's, worker/resident.py), and no other forwarding is."""
    host_key, client_key, other_key = home / "host_key", home / "client_key", home / "other_key"
    for key in (host_key, client_key, other_key):
        _keygen(key)
    authorized = home / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    authorized.chmod(0o600)
    port = _free_port()
    config = home / "sshd_config"
    settings = {
        "Port": port,
        "ListenAddress": "127.0.0.1",
        "HostKey": host_key,
        "PidFile": home / "sshd.pid",
        "AuthorizedKeysFile": authorized,
        "PubkeyAuthentication": "yes",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "PermitRootLogin": "prohibit-password",
        "StrictModes": "no",
        "UsePAM": "no",
        "AllowTcpForwarding": "local" if channels else "no",
        "PermitOpen": "127.0.0.1:*" if channels else "none",
        "X11Forwarding": "no",
        "PrintMotd": "no",
        "MaxStartups": 50,
        "MaxSessions": 50,
        "Subsystem": "sftp internal-sftp",  # the media host's files are read over SFTP (MEDIA_TRANSPORT=sftp)
    }
    config.write_text("".join(f"{key} {value}\n" for key, value in settings.items()))
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    process = _start(home, port)
    try:
        kind, key = Path(f"{host_key}.pub").read_text().split()[:2]
        known_hosts = home / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {kind} {key}\n")
        yield SSHServer("127.0.0.1", port, getpass.getuser(), str(client_key), str(known_hosts), str(other_key), home)
    finally:
        process.terminate()
        process.wait(timeout=10)
        _stop_restarted(home, process.pid)


def _start(home: Path, port: int) -> subprocess.Popen[bytes]:
    """sshd on ``home``'s config, once it accepts connections on ``port``."""
    log = home / "sshd.log"
    with log.open("a") as log_file:
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(home / "sshd_config")], stderr=log_file)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"sshd did not start: {log.read_text()}") from None
            time.sleep(0.1)


def stop(server: SSHServer) -> None:
    """Stop ``server`` as a host going down does: its listener and every session it serves (their
    connections drop; the commands they started are left to notice)."""
    import psutil  # the tests' dependency; the demo never stops its sshd

    master = psutil.Process(int((server.home / "sshd.pid").read_text()))
    sessions = [child for child in master.children(recursive=True) if child.name().startswith("sshd")]
    for process in (master, *sessions):
        process.kill()
    psutil.wait_procs([master, *sessions], timeout=10)


def restart(server: SSHServer) -> None:
    """Start ``server`` again after :func:`stop`: the same port, host key and users."""
    _start(server.home, server.port)


def _stop_restarted(home: Path, first: int) -> None:
    """An sshd :func:`restart` started (its pid is in the pid file) goes when the server's context ends."""
    with suppress(OSError, ValueError):
        pid = int((home / "sshd.pid").read_text())
        if pid != first:
            os.kill(pid, signal.SIGTERM)
