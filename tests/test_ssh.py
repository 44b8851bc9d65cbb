"""The SSH resource against a real sshd: host keys, authentication, quoting, timeouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.sshd import SSHServer
from resources.errors import Category, MigrationError
from resources.ssh import SSHResource
from resources.worker import WorkerResource

pytestmark = pytest.mark.integration


def resource(server: SSHServer, **overrides: object) -> SSHResource:
    return SSHResource(**{**server.resource_kwargs(), **overrides})


def run(ssh: SSHResource, argv: list[str], stdin: bytes = b"", timeout: float = 30) -> tuple[int, list[str]]:
    with ssh.connect() as client:
        process = ssh.start(client, argv, stdin)
        out = [line for stream, line in process.lines(time.monotonic() + timeout) if stream == "stdout"]
        return process.wait(), out


def category_of(call: object) -> Category:
    with pytest.raises(MigrationError) as caught:
        call()  # type: ignore[operator]
    return caught.value.category


def test_runs_a_command_with_stdin(sshd: SSHServer) -> None:
    code, out = run(resource(sshd), [sys.executable, "-c", "import sys; print(sys.stdin.read().upper())"], b"abc")
    assert (code, out) == (0, ["ABC"])


def test_the_connection_sends_small_messages_at_once(sshd: SSHServer) -> None:
    """Nagle's algorithm off from before the handshake: each of paramiko's small writes behind an
    unacknowledged one would wait for the peer's delayed ACK (~40 ms a time on Linux)."""
    import socket

    with resource(sshd).connect() as client:
        transport = client.get_transport()
        assert transport is not None and transport.is_authenticated()
        assert transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_unknown_host_key_is_refused(sshd: SSHServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    ssh = resource(sshd, known_hosts_file=str(empty))
    assert category_of(lambda: ssh.connect().__enter__()) == Category.SSH_HOST_KEY_ERROR


def test_changed_host_key_is_refused(sshd: SSHServer, tmp_path: Path) -> None:
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    kind, key = Path(f"{impostor}.pub").read_text().split()[:2]
    changed = tmp_path / "known_hosts"
    changed.write_text(f"[127.0.0.1]:{sshd.port} {kind} {key}\n")
    ssh = resource(sshd, known_hosts_file=str(changed))
    assert category_of(lambda: ssh.connect().__enter__()) == Category.SSH_HOST_KEY_ERROR


def test_missing_known_hosts_file_is_refused(sshd: SSHServer, tmp_path: Path) -> None:
    ssh = resource(sshd, known_hosts_file=str(tmp_path / "nope"))
    assert category_of(lambda: ssh.connect().__enter__()) == Category.SSH_HOST_KEY_ERROR


def test_wrong_key_is_an_authentication_error(sshd: SSHServer) -> None:
    ssh = resource(sshd, key_file=sshd.other_key_file)
    assert category_of(lambda: ssh.connect().__enter__()) == Category.AUTHENTICATION_ERROR


def test_nothing_listening_is_a_connection_error(sshd: SSHServer) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ssh = resource(sshd, port=port, connect_timeout_seconds=2)
    with pytest.raises(MigrationError) as caught, ssh.connect():
        pass
    assert caught.value.category == Category.CONNECTION_ERROR and caught.value.retryable


def test_missing_worker_is_found_before_running(sshd: SSHServer, tmp_path: Path) -> None:
    """The worker is looked for in the session that runs the command (one login shell, not two): when it is
    missing, nothing of the command runs and the step fails as COMMAND_NOT_FOUND, naming it."""
    marker = tmp_path / "ran"
    missing = f"no-such-worker-{os.getpid()}"
    worker = WorkerResource(transport="ssh", command=missing, ssh=resource(sshd))
    with worker.host() as start:
        process = start(["sh", "-c", f"touch {marker}"], b"")
        lines = list(process.lines(time.monotonic() + 30))
        assert process.wait() == 127 and process.pid is None
    assert not marker.exists()
    assert ("stderr", f"COMMAND_NOT_FOUND: {missing} is not installed") in lines
    with pytest.raises(MigrationError) as caught:
        worker.run_json(["sistemas"], {})
    assert caught.value.category == Category.COMMAND_NOT_FOUND and f"{missing} is not installed" in str(caught.value)
    ssh = resource(sshd)
    with ssh.connect() as client:  # a worker that is there runs
        assert ssh.start(client, ["sh", "-c", f"touch {marker}"], b"", check="sh").wait() == 0
    assert marker.exists()


@pytest.mark.parametrize("hostile", ["; rm -rf /tmp/x", "$(id)", "`id`", "a'b\"c", "x && touch /tmp/pwned", "*"])
def test_hostile_parameters_reach_the_command_as_plain_data(sshd: SSHServer, hostile: str) -> None:
    sentinel = Path("/tmp/x")
    sentinel.mkdir(exist_ok=True)
    echo = "import json, sys; print(json.dumps(sys.argv[1:]))"
    code, out = run(resource(sshd), [sys.executable, "-c", echo, "--usuario", hostile])
    assert code == 0
    assert json.loads(out[0]) == ["--usuario", hostile]
    assert sentinel.exists() and not Path("/tmp/pwned").exists()


def test_hostile_parameter_is_refused_by_the_worker_as_data(sshd: SSHServer) -> None:
    from .conftest import WORKER_COMMAND

    argv = [
        WORKER_COMMAND,
        "migrate",
        "--entity",
        "patients",
        "--sistema",
        "HSJ",
        "--usuario",
        "$(id)",
        "--run-id",
        "r1",
    ]
    with resource(sshd).connect() as client:
        process = resource(sshd).start(client, argv, b"{}")
        lines = [line for _, line in process.lines(time.monotonic() + 60)]
        assert process.wait() == 2
    assert any(line.startswith("VALIDATION_ERROR: usuario must match") for line in lines)
    assert not any("uid=" in line for line in lines)


def test_hung_command_times_out_and_the_remote_process_is_gone(sshd: SSHServer) -> None:
    ssh = resource(sshd, kill_grace_seconds=1.0)
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"
    )
    with ssh.connect() as client:
        process = ssh.start(client, [sys.executable, "-c", stubborn], b"")
        started = time.monotonic()
        with pytest.raises(MigrationError) as caught:
            for _ in process.lines(time.monotonic() + 2):
                pass
        assert caught.value.category == Category.TIMEOUT_ERROR
        assert process.pid is not None
        process.stop(ssh.kill_grace_seconds)  # ignores SIGTERM: needs the SIGKILL after the grace period
        assert time.monotonic() - started < 20
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{process.pid}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{process.pid}").exists(), "the remote process survived its timeout"


@pytest.mark.parametrize("signum", [9, 15])
def test_a_command_killed_by_a_signal_reports_it_through_the_wrapper(sshd: SSHServer, signum: int) -> None:
    """OpenSSH reports a signal as exit-signal, which paramiko drops (-1); the wrapper reports 128+N."""
    import signal as signals

    ssh = resource(sshd)
    sleeper = "import sys, time; sys.stdin.read(); print('up', flush=True); time.sleep(60)"
    with ssh.connect() as client:
        process = ssh.start(client, [sys.executable, "-c", sleeper], b"")
        lines = process.lines(time.monotonic() + 30)
        assert next(lines) == ("stdout", "up") and process.pid is not None
        os.kill(process.pid, signum)
        list(lines)
        code = process.wait()
        assert code == 128 + signum and not process.connection_lost()
    with pytest.raises(MigrationError) as caught:
        from resources.worker import raise_for_exit

        raise_for_exit(code, [], connection_lost=False)
    assert caught.value.category == Category.WORKER_KILLED and not caught.value.retryable
    assert signals.Signals(signum).name in str(caught.value)


def test_the_wrapper_passes_stdin_to_the_command(sshd: SSHServer) -> None:
    echo = "import sys; data = sys.stdin.read(); print(len(data), data[:3])"
    code, out = run(resource(sshd), [sys.executable, "-c", echo], b"xyz" * 100_000)
    assert (code, out) == (0, ["300000 xyz"])
