"""A resident worker's channel (worker/resident.py, resources/resident.py) against a real sshd: a command that
reaches a spare through an SSH channel, with no login shell, says and ends exactly as through the shell; the
channel is used only once a command through the shell offered it, only with a peer that proves it holds the
server's token, and never when the host forbids it or the worker's installation changed; a command ends
with its channel."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.sshd import SSHServer, running_sshd
from resources.errors import Category, MigrationError
from resources.processes import ChannelProcess, Process
from resources.resident import OFFERS, Offers, offer_key, resident_invocation
from resources.ssh import SSHResource
from resources.worker import raise_for_exit
from worker.launch import RESIDENT_ENV
from worker.resident import (
    CHANNEL_HELLO,
    NONCE_BYTES,
    WORKER_FILES,
    Doors,
    Offer,
    _take_streamed,
    channel_request,
    fingerprint,
    proof,
    resident_seconds,
)
from worker.resident import DIR_ENV as RESIDENT_DIR_ENV

from .conftest import WORKER_COMMAND
from .test_resident import alive, wait_until

Lines = list[tuple[str, str]]


@pytest.fixture
def invocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A worker invocation that asks for a resident worker of the test's own (its socket in a folder of the
    test's); the offers kept go to a cache folder of the test's too. Its server is told to leave afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "resident"
    yield ["env", f"{RESIDENT_ENV}=30", f"{RESIDENT_DIR_ENV}={folder}", WORKER_COMMAND]
    for leftover in folder.glob("*.sock"):
        leftover.unlink()


def started(ssh: SSHResource, argv: list[str], stdin: bytes) -> tuple[str, int, Lines]:
    """How the command ran (the process's kind), its exit status and its output lines."""
    with ssh.connect() as client:
        process = ssh.start(client, argv, stdin)
        lines = list(process.lines(time.monotonic() + 60))
        return type(process).__name__, process.wait(), lines


def key_of(ssh: SSHResource, argv: list[str]) -> str:
    found = resident_invocation(argv)
    assert found is not None
    return offer_key(ssh.host, ssh.port, ssh.username, found.command)


def warm(ssh: SSHResource, invocation: list[str]) -> None:
    """A first command through the shell (which starts the server and is told the channel), then a pause in
    which its spares import."""
    kind, code, _ = started(ssh, [*invocation, "health"], b"{}")
    assert (kind, code) == ("SSHProcess", 0)
    time.sleep(2.5)


COMMANDS = [(["health"], b"{}"), (["sistemas"], b"{}"), (["no-such-command"], b"")]


@pytest.mark.integration
def test_a_command_through_the_channel_says_and_ends_exactly_as_through_the_shell(
    sshd: SSHServer, invocation: list[str], tmp_path: Path
) -> None:
    """A command that succeeds, one the worker refuses (stdin lacks its URLs) and one argparse refuses: the
    same stdout, stderr and exit status through the shell and, once offered, through the channel. The offer
    is kept in a file only this user can read, and never shows in the output."""
    ssh = SSHResource(**sshd.resource_kwargs())
    through_shell = {}
    for command, stdin in COMMANDS:
        with ssh.connect() as client:  # the shell's way, without asking for an offer
            process = ssh._through_shell(client, [*invocation, *command], stdin, None)
            through_shell[command[0]] = (process.wait(), list(process.lines(time.monotonic() + 60)))
    assert [code for code, _ in through_shell.values()] == [0, 2, 2]
    warm(ssh, invocation)
    (kept,) = (tmp_path / "cache" / "clinic-migrate").iterdir()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    assert OFFERS.recall(key_of(ssh, invocation)) is not None
    for command, stdin in COMMANDS * 2:
        kind, code, lines = started(ssh, [*invocation, *command], stdin)
        assert kind == "ChannelProcess"
        assert (code, lines) == through_shell[command[0]]
        assert not any("@@resident" in line for _, line in lines)


@pytest.mark.integration
def test_a_stdin_larger_than_a_pipe_arrives_whole(sshd: SSHServer, invocation: list[str]) -> None:
    """The command reads all of a 1 MB stdin (its JSON parses), not a pipe's first 64 KB."""
    ssh = SSHResource(**sshd.resource_kwargs())
    warm(ssh, invocation)
    stdin = json.dumps({"padding": "x" * 900_000}).encode()
    kind, code, lines = started(ssh, [*invocation, "sistemas"], stdin)
    assert (kind, code) == ("ChannelProcess", 2)
    assert ("stderr", "VALIDATION_ERROR: stdin JSON lacks legacy_db_url") in lines


@pytest.mark.integration
def test_a_peer_without_the_token_is_never_sent_a_command(sshd: SSHServer, invocation: list[str]) -> None:
    """An offer whose port another process took over (here a listener that records what it is sent): it is
    sent a greeting and a nonce, never the command or its stdin; the offer is dropped and the command runs
    through the shell, which offers the server's channel again."""
    ssh = SSHResource(**sshd.resource_kwargs())
    warm(ssh, invocation)
    impostor = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def listen() -> None:
        conn, _ = impostor.accept()
        with conn:
            conn.sendall(os.urandom(NONCE_BYTES + 32))  # a nonce and a made-up proof
            conn.settimeout(5)
            while chunk := conn.recv(65536):
                received.append(chunk)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    key, taken_over = key_of(ssh, invocation), impostor.getsockname()[1]
    OFFERS.remember(key, Offer(taken_over, os.urandom(32)))
    kind, _, _ = started(ssh, [*invocation, "sistemas"], b'{"legacy_db_url": "secret"}')
    thread.join(10)
    impostor.close()
    assert kind == "SSHProcess"
    sent = b"".join(received)
    assert sent.startswith(CHANNEL_HELLO) and len(sent) == len(CHANNEL_HELLO) + NONCE_BYTES
    assert b"secret" not in sent and base64.b64encode(b'{"legacy_db_url": "secret"}') not in sent
    again = OFFERS.recall(key)
    assert again is not None and again.port != taken_over


def residents(folder: str) -> set[int]:
    """The resident server of ``folder`` and its spares (forked from it: the same command line)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and folder in (entry / "cmdline").read_text() and alive(int(entry.name)):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.integration
def test_peers_without_the_token_use_up_no_spare(sshd: SSHServer, invocation: list[str]) -> None:
    """Anyone on the host can connect to the channel's port: a connection that says nothing, garbage or a
    wrong proof is dropped by the spare that took it, which goes on waiting (no spare is started in its place,
    none imports again), and the next command finds a spare ready."""
    ssh = SSHResource(**sshd.resource_kwargs())
    warm(ssh, invocation)
    folder = invocation[2].split("=", 1)[1]
    before = residents(folder)
    assert len(before) == 3  # the server and its two spares
    offer = OFFERS.recall(key_of(ssh, invocation))
    assert offer is not None
    for attempt in range(6):
        with socket.create_connection(("127.0.0.1", offer.port)) as peer:
            if attempt % 3 == 1:
                peer.sendall(b"GET / HTTP/1.0\r\n\r\n" * 8)
            elif attempt % 3 == 2:
                peer.sendall(CHANNEL_HELLO + os.urandom(NONCE_BYTES))
                peer.recv(NONCE_BYTES + 32, socket.MSG_WAITALL)
                peer.sendall(os.urandom(32) + b"\0\0\0\2{}")
            peer.settimeout(10)
            try:
                said = peer.recv(1)
            except ConnectionResetError:  # closed with what the peer sent unread
                said = b""
            assert said == b"", "the spare answered a peer without the token"
    assert residents(folder) == before
    kind, code, _ = started(ssh, [*invocation, "sistemas"], b"{}")
    assert (kind, code) == ("ChannelProcess", 2)


@pytest.mark.integration
def test_a_host_that_forbids_channels_runs_every_command_through_the_shell(
    tmp_path: Path, invocation: list[str]
) -> None:
    home = tmp_path / "sshd"
    home.mkdir()
    with running_sshd(home, channels=False) as server:
        ssh = SSHResource(**server.resource_kwargs())
        warm(ssh, invocation)
        for command, stdin in COMMANDS:
            kind, code, _ = started(ssh, [*invocation, *command], stdin)
            assert kind == "SSHProcess" and code == (0 if command == ["health"] else 2)


@pytest.mark.integration
def test_a_changed_installation_is_not_run_by_the_older_server(sshd: SSHServer, invocation: list[str]) -> None:
    """Once the worker's files change, the older server's spare refuses the channel's command: it runs
    through the shell (a server of the new installation), which offers that server's channel."""
    ssh = SSHResource(**sshd.resource_kwargs())
    warm(ssh, invocation)
    key = key_of(ssh, invocation)
    before = OFFERS.recall(key)
    rules = WORKER_FILES / "rules.py"
    status = rules.stat()
    try:
        os.utime(rules, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
        kind, code, _ = started(ssh, [*invocation, "sistemas"], b"{}")
        assert (kind, code) == ("SSHProcess", 2)
        after = OFFERS.recall(key)
        assert before is not None and after is not None and after != before
    finally:
        os.utime(rules, ns=(status.st_atime_ns, status.st_mtime_ns))


def blackhole() -> socket.socket:
    """A listener that accepts and never answers: a database the command waits on."""
    return socket.create_server(("127.0.0.1", 0))


def waiting_command(invocation: list[str], hole: socket.socket) -> tuple[list[str], bytes]:
    url = f"mysql+pymysql://root@127.0.0.1:{hole.getsockname()[1]}/legacy?connect_timeout=60"
    return [*invocation, "sistemas"], json.dumps({"legacy_db_url": url}).encode()


@pytest.mark.integration
@pytest.mark.parametrize("how", ["stop", "channel closed", "killed"])
def test_a_command_ends_with_its_channel(sshd: SSHServer, invocation: list[str], how: str) -> None:
    """A command that waits (on a database that never answers) is stopped as over the shell (SIGTERM by its
    PID), ends when its channel closes (the Dagster process gone), and a spare killed outright is reported
    killed."""
    ssh = SSHResource(**sshd.resource_kwargs())
    warm(ssh, invocation)
    hole = blackhole()
    argv, stdin = waiting_command(invocation, hole)
    with ssh.connect() as client:
        process: Process = ssh.start(client, argv, stdin)
        assert isinstance(process, ChannelProcess) and alive(process.pid)
        time.sleep(0.5)
        if how == "stop":
            process.stop(5.0)
        elif how == "channel closed":
            process.channel.close()
        else:
            os.kill(process.pid, signal.SIGKILL)
            code = process.wait()
            assert code == 128 + signal.SIGKILL
            with pytest.raises(MigrationError) as caught:
                raise_for_exit(code, [], connection_lost=process.connection_lost())
            assert caught.value.category == Category.WORKER_KILLED
        assert wait_until(lambda: not alive(process.pid), seconds=15), "the command outlived its channel"
    hole.close()


def test_the_handshake_runs_only_a_peer_that_holds_the_token() -> None:
    """A spare's side of the channel (over a socket pair): the right proof gets the request; a wrong one, a
    wrong greeting, or an installation changed since the server started gets nothing."""
    token = os.urandom(32)

    def take(proof_token: bytes, hello: bytes = CHANNEL_HELLO, installation: str | None = None) -> object:
        ours, theirs = socket.socketpair()
        doors = Doors(ours, ours, Offer(1, token), installation or fingerprint())
        taken: list[object] = []
        spare = threading.Thread(target=lambda: taken.append(_take_streamed(ours, doors)))
        spare.start()
        client_nonce = os.urandom(NONCE_BYTES)
        theirs.sendall(hello + client_nonce)
        said = theirs.recv(NONCE_BYTES + 32, socket.MSG_WAITALL) if hello == CHANNEL_HELLO else b""
        server_nonce = said[:NONCE_BYTES]
        if said:
            assert said[NONCE_BYTES:] == proof(token, b"server", client_nonce, server_nonce)
            request = channel_request(["health"], {"A": "1"}, b"{}")
            theirs.sendall(proof(proof_token, b"client", client_nonce, server_nonce) + request)
        spare.join(10)
        ours.close()
        theirs.close()
        return taken[0]

    assert take(token) == (["health"], {"A": "1"}, b"{}")
    assert take(os.urandom(32)) is None
    assert take(token, hello=b"something else entirely \n") is None
    assert take(token, installation="an older installation") is None


def test_only_an_invocation_that_asks_for_a_resident_worker_is_one() -> None:
    assert resident_invocation(["env", f"{RESIDENT_ENV}=5", "env", "B=2", "w", "health"]) == (
        {RESIDENT_ENV: "5", "B": "2"},
        ["env", f"{RESIDENT_ENV}=5", "env", "B=2", "w"],
        ["health"],
    )
    for argv in (
        ["w", "health"],
        ["env", f"{RESIDENT_ENV}=0", "w"],
        ["env", f"{RESIDENT_ENV}=x", "w"],
        ["env", "-i", f"{RESIDENT_ENV}=5", "w"],
        ["env", f"{RESIDENT_ENV}=5"],
    ):
        assert resident_invocation(argv) is None
    for value in ("5", "+5", " 5", "05", "0", "-5", "5s", ""):  # the worker's own reading of the variable decides
        asks = resident_invocation(["env", f"{RESIDENT_ENV}={value}", "w", "health"]) is not None
        assert asks == (resident_seconds({RESIDENT_ENV: value}) > 0), value
    assert Offer.parse("123 " + "ab" * 32) == Offer(123, bytes.fromhex("ab" * 32))
    for said in ("", "123", "0 " + "ab" * 32, "123 zz", "123 abcd", "1 2 3"):
        assert Offer.parse(said) is None


def test_an_offer_kept_in_its_file_is_found_by_another_process_and_nothing_else_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dagster runs each step in a process of its own: an offer is kept in a file (0600, in a 0700 folder),
    which another ``Offers`` reads as the same offer; a file that holds anything else is no offer."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    offer = Offer(4321, os.urandom(32))
    Offers().remember("k", offer)
    kept = tmp_path / "clinic-migrate" / "channel-k"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    assert Offers().recall("k") == offer
    for content in ("", "4321", '{"port": 4321}', "4321 zz", "\x00\xff"):
        kept.write_text(content)
        assert Offers().recall("k") is None
    Offers().forget("k")
    assert not kept.exists()
