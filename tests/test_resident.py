"""worker/resident.py: a command handed to a resident worker's spare runs as in its own process — the same
output and exit status, the client's own descriptors and folder — and ends with its client; the server
leaves when idle; a folder others could enter is never used."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.launch import RESIDENT_ENV
from worker.resident import (
    DIR_ENV,
    LONG_COMMAND_SECONDS,
    QUIET_SECONDS,
    SPARES,
    WORKER_FILES,
    fingerprint,
    socket_path,
)

from .conftest import WORKER_COMMAND


@pytest.fixture
def resident(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment that asks for a resident worker whose socket is in a folder of the test's; its server
    is told to leave afterwards (its socket removed: it checks every second)."""
    folder = tmp_path / "resident"
    env = {**os.environ, RESIDENT_ENV: "30", DIR_ENV: str(folder)}
    yield env
    for leftover in folder.glob("*.sock"):
        leftover.unlink()


def sockets(env: dict[str, str]) -> list[Path]:
    """The resident servers' sockets in the folder ``env`` names (their names are the clients' fingerprint)."""
    return sorted(path for path in Path(env[DIR_ENV]).glob("*.sock") if path.is_socket())


def run(command: list[str], stdin: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    done = subprocess.run(
        [WORKER_COMMAND, *command], input=stdin, env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stdout, done.stderr


def start(env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """``clinic-migrate sistemas`` waiting for its secrets on stdin (as a run does before it starts)."""
    return subprocess.Popen(
        [WORKER_COMMAND, "sistemas"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, cwd=cwd, text=True,
    )  # fmt: skip


def holders_of(target: str, but: int) -> list[int]:
    """The processes (other than ``but``) with a descriptor open on ``target`` (a ``pipe:[inode]`` link)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == but:
            continue
        try:
            if any(os.readlink(fd) == target for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition: object, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def spare_of(client: subprocess.Popen[str]) -> int:
    """The process running ``client``'s command: the one other than the client that holds its stdin."""
    stdin = os.readlink(f"/proc/{client.pid}/fd/0")
    assert wait_until(lambda: holders_of(stdin, client.pid)), "no spare took the command"
    (spare,) = holders_of(stdin, client.pid)
    return spare


@pytest.mark.integration
def test_commands_in_a_spare_say_and_end_exactly_as_in_their_own_process(
    resident: dict[str, str], tmp_path: Path
) -> None:
    """A command that succeeds, one refused by the worker (stdin lacks its URLs) and one refused by argparse:
    the same stdout, stderr and exit status, the first time (which starts the server and waits for its
    spare) and from a warm spare."""
    commands = [(["health"], "{}"), (["sistemas"], "{}"), (["no-such-command"], "")]
    alone = {**resident, RESIDENT_ENV: "0"}
    own = {tuple(command): run(command, stdin, alone, tmp_path) for command, stdin in commands}
    assert own[("sistemas",)][0] == 2 and own[("no-such-command",)][0] == 2 and own[("health",)][0] == 0
    for _ in range(2):
        for command, stdin in commands:
            assert run(command, stdin, resident, tmp_path) == own[tuple(command)]
    assert sockets(resident), "no server is up: the commands were not handed over"


@pytest.mark.integration
def test_the_spare_runs_on_the_clients_own_descriptors_and_folder_while_the_client_stays_light(
    resident: dict[str, str], tmp_path: Path
) -> None:
    """The client imports nothing heavy; its command runs in another process that holds the client's own
    stdin (the secrets never pass through the server) and works in the client's folder."""
    run(["health"], "{}", resident, tmp_path)  # the server up, a spare warm
    client = start(resident, tmp_path)
    try:
        spare = spare_of(client)
        assert os.readlink(f"/proc/{spare}/cwd") == str(tmp_path)
        assert "polars" in Path(f"/proc/{spare}/maps").read_text()
        assert "polars" not in Path(f"/proc/{client.pid}/maps").read_text()
        out, err = client.communicate("{}", timeout=30)
    finally:
        client.kill()
    assert (client.returncode, out) == (2, "")
    assert "VALIDATION_ERROR: stdin JSON lacks legacy_db_url" in err
    assert wait_until(lambda: not alive(spare)), "a spare runs one command and leaves"


@pytest.mark.integration
def test_a_request_larger_than_the_sockets_buffer_arrives_whole(resident: dict[str, str], tmp_path: Path) -> None:
    """The command's environment travels with it; one of 600 KB (more than a unix socket holds at once) is
    read to its end before the command starts."""
    run(["health"], "{}", resident, tmp_path)
    large = {**resident, **{f"LARGE_{n}": "x" * 100_000 for n in range(6)}}  # one may hold 128 KB
    client = start(large, tmp_path)
    try:
        stdin = os.readlink(f"/proc/{client.pid}/fd/0")
        assert wait_until(lambda: holders_of(stdin, client.pid)), "the spare did not take the command"
        time.sleep(0.5)
        assert holders_of(stdin, client.pid), "the spare let the command go (the client runs it itself)"
        out, err = client.communicate("{}", timeout=30)
    finally:
        client.kill()
    assert (client.returncode, out) == (2, "") and "stdin JSON lacks legacy_db_url" in err


@pytest.mark.integration
def test_commands_at_once_each_get_a_spare_of_their_own(resident: dict[str, str], tmp_path: Path) -> None:
    """A second command while the first runs is not queued behind it: a spare warms up for it at once."""
    run(["health"], "{}", resident, tmp_path)
    clients = [start(resident, tmp_path) for _ in range(3)]
    try:
        assert len({spare_of(client) for client in clients}) == 3
        said = [client.communicate("{}", timeout=30) for client in clients]
    finally:
        for client in clients:
            client.kill()
    assert [client.returncode for client in clients] == [2, 2, 2]
    assert all("stdin JSON lacks legacy_db_url" in err for _, err in said)


def children_of_server(path: Path) -> list[int]:
    """The processes the resident server of socket ``path`` forked (its spares, and those running commands)."""
    procs = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path) in (entry / "cmdline").read_text():
                procs[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    servers = [pid for pid, parent in procs.items() if parent not in procs]
    return sorted(pid for pid, parent in procs.items() if parent in servers and alive(pid))


def imported(pid: int) -> bool:
    try:
        return "polars" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def warm_server(env: dict[str, str], cwd: Path) -> Path:
    """A command run to start the server; its socket, once both its spares have imported."""
    run(["health"], "{}", env, cwd)
    (path,) = sockets(env)
    assert wait_until(lambda: len(children_of_server(path)) == SPARES and all(map(imported, children_of_server(path))))
    return path


@pytest.mark.integration
def test_a_command_that_follows_another_finds_a_spare_ready_and_no_spare_imports_meanwhile(
    resident: dict[str, str], tmp_path: Path
) -> None:
    """Two spares are kept ready: while a command runs, another has done its imports for the next one, and
    the spare forked in place of the one taken imports only once no command has run for QUIET_SECONDS."""
    path = warm_server(resident, tmp_path)
    client = start(resident, tmp_path)
    try:
        taken = spare_of(client)
        others = lambda: [pid for pid in children_of_server(path) if pid != taken]  # noqa: E731
        assert wait_until(lambda: len(others()) == SPARES), "no spare forked in place of the one taken"
        time.sleep(QUIET_SECONDS + 0.5)  # the command still runs: waiting for its secrets (not long yet)
        assert sorted(map(imported, others())) == [False, True]  # one ready; the new one has not imported
        out, err = client.communicate("{}", timeout=30)
        ended = time.monotonic()
    finally:
        client.kill()
    assert (client.returncode, out) == (2, "") and "stdin JSON lacks legacy_db_url" in err
    time.sleep(QUIET_SECONDS / 2)  # a command that follows at once must not meet a spare importing
    meanwhile = sorted(map(imported, others()))
    assert time.monotonic() - ended >= QUIET_SECONDS or meanwhile == [False, True], "imported before it was quiet"
    assert wait_until(lambda: len(others()) == SPARES and all(map(imported, others()))), "not imported once quiet"


@pytest.mark.integration
def test_a_long_command_has_the_spare_forked_in_its_place_import_while_it_runs(
    resident: dict[str, str], tmp_path: Path
) -> None:
    """A command that has run for LONG_COMMAND_SECONDS (a full run) loses little to a spare's imports: the
    spare forked in its place imports then, so the command after it (here while it still runs) finds two
    spares ready. Before that, none imports (the test above holds its command for less); nor does one while
    a command that began since runs, short as it may be."""
    assert LONG_COMMAND_SECONDS > QUIET_SECONDS + 0.5
    path = warm_server(resident, tmp_path)
    clients = [start(resident, tmp_path)]
    try:
        taken = {spare_of(clients[0])}
        took = time.monotonic()
        others = lambda: [pid for pid in children_of_server(path) if pid not in taken]  # noqa: E731
        assert wait_until(lambda: len(others()) == SPARES), "no spare forked in place of the one taken"
        ready = wait_until(lambda: all(map(imported, others())), LONG_COMMAND_SECONDS + 10)
        assert ready and clients[0].poll() is None, "the spare in the long command's place did not import meanwhile"
        assert time.monotonic() - took >= LONG_COMMAND_SECONDS - 0.1, "imported before the command ran long"
        clients.append(start(resident, tmp_path))  # a second command, while the long one still runs
        taken.add(spare_of(clients[1]))
        assert wait_until(lambda: len(others()) == SPARES), "no spare forked in place of the second one taken"
        time.sleep(LONG_COMMAND_SECONDS / 2)
        assert sorted(map(imported, others())) == [False, True], "a spare imported beside a command just begun"
        said = [client.communicate("{}", timeout=30) for client in clients]
    finally:
        for client in clients:
            client.kill()
    assert [client.returncode for client in clients] == [2, 2]
    assert all(out == "" and "stdin JSON lacks legacy_db_url" in err for out, err in said)


@pytest.mark.integration
def test_a_client_that_finds_no_spare_warm_gets_one_spare_warming_not_every_cold_one(
    resident: dict[str, str], tmp_path: Path
) -> None:
    """Two commands take the two warm spares; a third, while they run, finds both of their replacements cold:
    one of them imports and takes it, the other stays cold (it would take the commands' CPU)."""
    path = warm_server(resident, tmp_path)
    clients = [start(resident, tmp_path) for _ in range(SPARES + 1)]
    try:
        taken = {spare_of(client) for client in clients}
        others = lambda: [pid for pid in children_of_server(path) if pid not in taken]  # noqa: E731
        assert wait_until(lambda: len(others()) == SPARES), "no spares forked in place of those taken"
        time.sleep(1.0)  # the commands still run: waiting for their secrets
        assert not any(map(imported, others())), "a spare imported while commands ran and no client waited"
        said = [client.communicate("{}", timeout=30) for client in clients]
    finally:
        for client in clients:
            client.kill()
    assert [client.returncode for client in clients] == [2] * (SPARES + 1)
    assert all("stdin JSON lacks legacy_db_url" in err for _, err in said)


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_command_ends_with_its_client(resident: dict[str, str], tmp_path: Path, signum: int) -> None:
    """SIGTERM to the client reaches the command (which ends as a SIGTERM ends it: 143, through the client);
    a client killed outright leaves its command to find the socket closed and end the same way."""
    run(["health"], "{}", resident, tmp_path)
    client = start(resident, tmp_path)
    try:
        spare = spare_of(client)  # waiting for its secrets, as a run does before it starts
        client.send_signal(signum)
        client.wait(timeout=30)
        assert wait_until(lambda: not alive(spare)), "the command outlived its client"
    finally:
        client.kill()
        assert client.stdin is not None
        client.stdin.close()
    assert client.returncode == (128 + signal.SIGTERM if signum == signal.SIGTERM else -signal.SIGKILL)


@pytest.mark.integration
def test_the_server_leaves_when_idle_and_takes_its_socket(resident: dict[str, str], tmp_path: Path) -> None:
    env = {**resident, RESIDENT_ENV: "2"}
    assert run(["health"], "{}", env, tmp_path)[0] == 0
    (path,) = sockets(env)
    assert wait_until(lambda: not path.exists(), seconds=10)
    assert not list(Path(env[DIR_ENV]).iterdir())  # its lock too
    assert run(["health"], "{}", env, tmp_path)[0] == 0  # and starts again for the next command
    assert sockets(env) == [path]


@pytest.mark.integration
def test_a_folder_others_can_enter_is_never_used(resident: dict[str, str], tmp_path: Path) -> None:
    folder = Path(resident[DIR_ENV])
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    assert socket_path(resident) is None
    assert run(["health"], "{}", resident, tmp_path)[0] == 0  # in its own process
    assert list(folder.iterdir()) == []


def test_a_changed_installation_has_a_socket_of_its_own(tmp_path: Path) -> None:
    """A server of the worker's older files is never handed a command: the socket's name changes with them."""
    copy = tmp_path / "worker"
    shutil.copytree(WORKER_FILES, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = fingerprint(copy)
    assert fingerprint(copy) == before
    (copy / "rules.py").write_text((copy / "rules.py").read_text() + "\n")
    assert fingerprint(copy) != before
    changed = fingerprint(copy)
    packages = tmp_path / "site-packages"
    packages.mkdir()
    sys.path.append(str(packages))
    try:
        assert fingerprint(copy) != changed  # another folder to import from
        changed = fingerprint(copy)
        time.sleep(0.01)
        (packages / "upgraded-1.0.dist-info").mkdir()  # a package installed there
        assert fingerprint(copy) != changed
    finally:
        sys.path.remove(str(packages))
