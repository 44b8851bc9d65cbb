"""A resident worker on the legacy host (opt-in): the worker's start-up paid between runs, not in them.

Every ``clinic-migrate`` command starts a Python process that imports SQLAlchemy, polars, pyarrow and the
drivers before it does anything: 0.3-0.4 s of every run (bench/clinical.py), a quarter of an incremental
run's. With ``CLINIC_MIGRATE_RESIDENT_SECONDS=N`` (N > 0) in its environment, ``clinic-migrate`` hands
its command to a *spare*: a process that has already imported all that, which a small server of this
user keeps ready on a unix socket only this user can reach, and stays a thin client meanwhile.

- The spare takes the command's own stdin, stdout and stderr (the descriptors themselves, passed over the
  socket, so the secrets on stdin never pass through the server or the client), its arguments,
  environment and working directory, runs it as ``clinic-migrate`` would, and sends back its exit
  status, which the client exits with.
- A spare runs one command and exits: no two commands ever share a process, a connection or memory.
  The server keeps ``SPARES`` spares (two): a command that follows another at once (a job's encounters
  after its patients, a check after its run) finds one that has done its imports. It starts the next
  spare when one is taken, and that spare imports once no command has run for ``QUIET_SECONDS`` (its
  imports would take a short command's CPU), once a command has run for ``LONG_COMMAND_SECONDS``, or at
  once for a client that finds no spare warm or warming (one spare for it, not every cold one). The server
  itself imports nothing heavy, so it forks no threads' state.
- The client forwards SIGTERM, SIGINT and SIGHUP to the spare running its command. Should the client
  die (a SIGKILL), the spare finds the socket closed and ends its command as a SIGTERM would, then kills
  itself after ``KILL_GRACE_SECONDS``.
- The server exits after N seconds without a command, and whenever the worker's installation changes
  (its socket's name is a fingerprint of the interpreter and the worker's files).
- Until a spare has said it took the command, nothing of the command has run: any failure up to then
  (no server, a stale socket, no safe folder for it) runs the command in the client's own process, as
  without a resident worker.

**The channel.** Over SSH, a command still pays the user's login shell (sshd runs every command through
it, ``.bashrc`` included: 0.12 s of ``pyenv init`` on this project's machines) and the thin client's
start-up (0.04 s). The server also listens on a loopback TCP port, which the Dagster side reaches through
an SSH ``direct-tcpip`` channel on the connection it already has, with no shell and no client process:

- A command run with ``CLINIC_MIGRATE_RESIDENT_CHANNEL=1`` in its environment is told the port and the
  server's token (random, 32 bytes, in the server's memory only): a line ``@@resident-channel PORT TOKEN``
  on its stderr, which the Dagster side takes out of the output (resources/processes.py) and keeps.
- On the channel both sides prove they hold the token before anything else (HMAC-SHA256 over a nonce of
  each), so a port taken over by another user's process is never sent a command's secrets, and a peer
  without the token is never run a command. The request then carries the command's arguments, the
  variables its invocation sets and its stdin; the spare runs it on pipes and sends its stdout and stderr
  back in frames, then its exit status, as the unix socket's client would exit with.
- A spare refuses a channel's command when the worker's installation changed since its server started
  (the offer is then dropped and the command runs through the shell, which starts a new server).

The socket lives in ``CLINIC_MIGRATE_RESIDENT_DIR``, else ``$XDG_RUNTIME_DIR/clinic-migrate``, else
``~/.cache/clinic-migrate``: a folder of this user's with mode 0700 (made so, or refused). A spare also
refuses a peer of another user (``SO_PEERCRED``). This module imports only the standard library's light
modules: the client runs it before anything else.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import json
import os
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from worker.launch import RESIDENT_ENV

DIR_ENV = "CLINIC_MIGRATE_RESIDENT_DIR"
START_WAIT_SECONDS = 2.0  # how long a client waits for the server it started to listen
KILL_GRACE_SECONDS = 5.0  # a spare whose client is gone: SIGTERM, then SIGKILL after this long
SPARES = 2  # spares kept ready
QUIET_SECONDS = 1.0  # a spare imports once no command has run for this long (or a client waits for it)
# ... or once a command has run this long: a long one (a full run) loses little to a spare's imports (~0.35 s
# of a core), and the command after it (a job's next entity, a re-run) finds a spare ready. Back to back,
# a third command waited for a cold spare's imports: 0.4 s of an unchanged re-run of 480k patients (3.5 s).
LONG_COMMAND_SECONDS = 2.0
MAX_REQUEST_BYTES = 1 << 20
MAX_CHANNEL_REQUEST_BYTES = 16 << 20  # a channel's request carries its stdin too (base64); a larger one: the shell
_HEADER = struct.Struct("!I")
PID = struct.Struct("!q")
STATUS = struct.Struct("!i")
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
CHANNEL_ENV = "CLINIC_MIGRATE_RESIDENT_CHANNEL"  # "1": the command is told how to reach the channel
CHANNEL_MARKER = "@@resident-channel "  # on its stderr: the port and the token, hex
CHANNEL_HELLO = b"clinic-migrate resident channel 1\n"  # the client's first bytes, then its nonce
HANDSHAKE_SECONDS = 5.0  # a channel's peer that has not said its part by then is dropped
NONCE_BYTES = 32
FRAME = struct.Struct("!cI")  # a channel's frames from the spare: kind, length, then the bytes
STDOUT_FRAME, STDERR_FRAME, STATUS_FRAME = b"o", b"e", b"s"


# --- where ---------------------------------------------------------------------------------------


def resident_seconds(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """Seconds a resident worker waits for its next command; 0 (off) when unset or not a positive integer."""
    try:
        return max(0, int(environ.get(RESIDENT_ENV, "0")))
    except ValueError:
        return 0


def private_folder(path: Path) -> Path | None:
    """``path`` made if missing (mode 0700); None unless it is a folder of this user's that no one else
    can enter."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = path.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o077:
        return None
    return path


def socket_folder(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path | None:
    if given := environ.get(DIR_ENV):
        return private_folder(Path(given))
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and private_folder(Path(runtime)) is not None:
        return private_folder(Path(runtime) / "clinic-migrate")
    return private_folder(Path.home() / ".cache" / "clinic-migrate")


WORKER_FILES = Path(__file__).resolve().parent


def fingerprint(files: Path = WORKER_FILES) -> str:
    """The interpreter, the folders it imports from (a package installed, upgraded or removed changes its
    folder's entries, so its modification time) and the worker's files (name, size, modification time):
    a spare of an older installation is never handed a command (a new one gets a socket of its own)."""
    digest = hashlib.sha256(f"{os.path.realpath(sys.executable)}\0{sys.version}".encode())
    for folder in filter(os.path.isabs, sys.path):  # not the working folder ('' or relative): the client's own
        with contextlib.suppress(OSError):
            digest.update(f"\0{folder}\0{os.stat(folder).st_mtime_ns}".encode())
    for entry in sorted(os.scandir(files), key=lambda e: e.name):
        if entry.name.endswith(".py"):
            status = entry.stat()
            digest.update(f"\0{entry.name}\0{status.st_size}\0{status.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def socket_path(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path | None:
    folder = socket_folder(environ)
    return None if folder is None else folder / f"{fingerprint()}.sock"


# --- the client -------------------------------------------------------------------------------------


def _connect(path: Path) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        client.connect(str(path))
    except OSError:
        client.close()
        return None
    return client


def _start_server(path: Path, seconds: int) -> None:
    """The server, detached from this command (its own session, no descriptor of ours)."""
    import subprocess

    subprocess.Popen(
        [sys.executable, "-m", "worker.resident", "serve", str(path), str(seconds)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        cwd="/",
    )


def _reach(path: Path, seconds: int) -> socket.socket | None:
    """A connection to the server, started first if none listens (None: none came up in time)."""
    if (client := _connect(path)) is not None:
        return client
    _start_server(path, seconds)
    deadline = time.monotonic() + START_WAIT_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.005)
        if (client := _connect(path)) is not None:
            return client
    return None


def read_exactly(conn: Any, size: int) -> bytes | None:
    """``size`` bytes of ``conn`` (a socket, or anything with its ``recv``: an SSH channel), or None at the end
    of the stream (a reset, a timeout) before them."""
    data = b""
    while len(data) < size:  # a signal handled meanwhile (the client forwards some) does not end a recv: PEP 475
        try:
            chunk = conn.recv(size - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def handed_over(argv: Sequence[str]) -> int | None:
    """Run the command ``argv`` in a spare and return its exit status; None when no spare took it (then
    nothing of it ran: the caller runs it itself)."""
    seconds = resident_seconds()
    path = socket_path() if seconds else None
    if path is None:
        return None
    conn = _reach(path, seconds)
    if conn is None:
        return None
    with conn:
        request = json.dumps({"argv": list(argv), "env": dict(os.environ), "cwd": os.getcwd()}).encode()
        message = _HEADER.pack(len(request)) + request
        try:
            sent = socket.send_fds(conn, [message], [0, 1, 2])  # the descriptors go with the first bytes
            conn.sendall(message[sent:])
        except OSError:
            return None
        said = read_exactly(conn, PID.size)  # the spare took the command: from here on it is the spare's
        if said is None:
            return None
        (pid,) = PID.unpack(said)
        for number in _FORWARDED:
            signal.signal(number, lambda received, _frame: _forward(pid, received))
        status = read_exactly(conn, STATUS.size)
    if status is None:  # the spare ended without a status: killed
        sys.stderr.write("clinic-migrate: the resident worker's process ended without an exit status\n")
        return 128 + signal.SIGKILL
    return int(STATUS.unpack(status)[0])


def _forward(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, number)


# --- the spare -----------------------------------------------------------------------------------


def warm_up(waiting: Callable[[], bool] = lambda: False) -> None:
    """Everything a command imports, imported ahead (as ``clinic-migrate`` would, memory caps first): what
    every command needs, then what some need, unless ``waiting`` says a client waits meanwhile (the
    command then imports what it needs itself, as in a process of its own)."""
    from worker.launch import prepare_process

    prepare_process()
    import worker.cli  # noqa: F401  SQLAlchemy, polars, dagster-pipes and the worker itself

    for name in ("pymysql", "psycopg", "sqlalchemy.dialects.mysql.pymysql", "sqlalchemy.dialects.postgresql.psycopg"):
        _import(name)
    for step in (  # a full run's readers and binary COPYs (taken whenever pyarrow is loaded), a verification's
        lambda: _import("connectorx"),
        lambda: _import("pyarrow.compute"),  # polars' from_arrow imports it (a first cast is not made ahead)
        lambda: _import("pgpq"),
        lambda: _import("worker.verify_clinical"),
    ):
        if waiting():
            return
        step()


def _import(name: str) -> None:
    with contextlib.suppress(ImportError):
        __import__(name)


def _take(conn: socket.socket) -> tuple[list[str], dict[str, str], str, list[int]] | None:
    """The command a client sent (argv, environment, working directory, its stdin/stdout/stderr), or
    None: a peer of another user, or not a whole request."""
    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    if uid != os.getuid():
        return None
    data, fds, _flags, _address = socket.recv_fds(conn, MAX_REQUEST_BYTES, 3)
    rest = None
    if len(fds) == 3 and len(data) >= _HEADER.size:  # the rest of a request longer than the first read
        (size,) = _HEADER.unpack(data[: _HEADER.size])
        rest = read_exactly(conn, max(0, size - len(data) + _HEADER.size))
    if rest is None:
        for fd in fds:
            os.close(fd)
        return None
    request = json.loads(data[_HEADER.size :] + rest)
    return list(request["argv"]), dict(request["env"]), str(request["cwd"]), fds


def _become(env: dict[str, str], cwd: str, fds: Sequence[int]) -> None:
    """This process as the client's: its stdin, stdout and stderr, environment and folder."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    if hasattr(time, "tzset"):
        time.tzset()
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")


def _watch(conn: socket.socket, ended: threading.Event) -> None:
    """The client gone before the command ended (killed): end the command as a SIGTERM does; kill it if
    it has not ended ``KILL_GRACE_SECONDS`` later."""

    def watch() -> None:
        with contextlib.suppress(OSError):  # a reset is the client gone too
            while conn.recv(1):
                pass
        if ended.is_set():
            return
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(KILL_GRACE_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="resident-client", daemon=True).start()


class Offer(NamedTuple):
    """How to reach a server's channel: its loopback port, and the token a channel's peer must prove it holds."""

    port: int
    token: bytes

    def said(self) -> str:
        """The offer as text: the port and the token, hex (what :meth:`parse` reads)."""
        return f"{self.port} {self.token.hex()}"

    def line(self) -> bytes:
        """The line on a command's stderr that tells its caller (``CHANNEL_ENV``)."""
        return f"{CHANNEL_MARKER}{self.said()}\n".encode()

    @classmethod
    def parse(cls, said: str) -> Offer | None:
        """An offer's text (what follows ``CHANNEL_MARKER`` on such a line); None for anything else."""
        try:
            port, token = said.split()
            offer = cls(int(port), bytes.fromhex(token))
        except ValueError:
            return None
        return offer if 0 < offer.port < 65536 and len(offer.token) >= 16 else None


class Doors(NamedTuple):
    """How commands reach a server's spares: its unix socket, its channel (and the offer of it), and the
    installation's fingerprint when the server started."""

    socket: socket.socket
    channel: socket.socket
    offer: Offer
    installation: str

    @property
    def listeners(self) -> list[socket.socket]:
        return [self.socket, self.channel]


def spare(doors: Doors, taken: int, go: int) -> NoReturn:
    """A spare's life, in a process the server forked: wait until the server says to warm up (``go``: no
    command has run for a while, or a client waits that no other spare serves), warm up, take one
    command, run it, and leave (as ``clinic-migrate`` does) once its exit status is sent."""
    if os.read(go, 1) == b"":  # the server is gone before it said so: nothing to do
        os._exit(0)
    os.close(go)
    warm_up(lambda: bool(select.select(doors.listeners, [], [], 0)[0]))
    from worker.launch import leave, run_command

    while True:  # a channel's peer that cannot prove it holds the token leaves this spare waiting
        accepted = _accept(doors.listeners)
        if accepted is None:  # the server shut its doors: no command for this spare
            leave(0)
        conn, through_channel = accepted
        streamed = _take_streamed(conn, doors) if through_channel else None
        if streamed is not None or not through_channel:
            break
        conn.close()
    for listener in doors.listeners:
        listener.close()
    os.write(taken, PID.pack(os.getpid()))  # the server starts the next spare now
    os.close(taken)
    if streamed is not None:
        argv, env, stdin = streamed
        pump = _become_streamed(conn, env, stdin)
        finish: Callable[[int], None] = lambda code: _finish_streamed(conn, pump, code)  # noqa: E731
    else:
        command = _take(conn)
        if command is None:
            conn.close()
            leave(0)
        argv, env, cwd, fds = command
        _become(env, cwd, fds)
        if env.get(CHANNEL_ENV) == "1":
            os.write(2, doors.offer.line())
        finish = lambda code: _say_status(conn, code)  # noqa: E731
    conn.sendall(PID.pack(os.getpid()))
    ended = threading.Event()
    _watch(conn, ended)
    code = _status(run_command, argv)
    ended.set()
    leave(code, last=lambda: finish(code))


def _accept(listeners: Sequence[socket.socket]) -> tuple[socket.socket, bool] | None:
    """The next connection to either door (the listeners are non-blocking: every spare waits on both, and
    the one that accepts first takes it) and whether it came through the channel; None once shut."""
    while True:
        try:
            readable, _, _ = select.select(listeners, [], [])
        except OSError:
            return None
        for listener in readable:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:  # another spare took it
                continue
            except OSError:  # shut down by the server
                return None
            conn.setblocking(True)
            return conn, listener.family != socket.AF_UNIX


def proof(token: bytes, side: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What one side of a channel (``side``: b"server" or b"client") sends to show it holds the token."""
    return hmac.new(token, side + b"\0" + client_nonce + server_nonce, hashlib.sha256).digest()


def channel_request(argv: Sequence[str], env: dict[str, str], stdin: bytes) -> bytes:
    """A channel's command, once both sides have proved themselves: its arguments (after ``clinic-migrate``),
    the variables its invocation sets and its whole stdin."""
    body = json.dumps({"argv": list(argv), "env": env, "stdin": base64.b64encode(stdin).decode()}).encode()
    return _HEADER.pack(len(body)) + body


def _take_streamed(conn: socket.socket, doors: Doors) -> tuple[list[str], dict[str, str], bytes] | None:
    """A channel's command (its arguments, variables, stdin) once its peer proved it holds the token; None
    for a peer that does not, one too slow to say its part, or an installation changed since the server
    started (its caller then runs the command through the shell: a new server)."""
    conn.settimeout(HANDSHAKE_SECONDS)
    hello = read_exactly(conn, len(CHANNEL_HELLO) + NONCE_BYTES)
    if hello is None or not hello.startswith(CHANNEL_HELLO):
        return None
    client_nonce, server_nonce = hello[len(CHANNEL_HELLO) :], os.urandom(NONCE_BYTES)
    try:
        conn.sendall(server_nonce + proof(doors.offer.token, b"server", client_nonce, server_nonce))
    except OSError:
        return None
    said = read_exactly(conn, hashlib.sha256().digest_size + _HEADER.size)
    expected = proof(doors.offer.token, b"client", client_nonce, server_nonce)
    if said is None or not hmac.compare_digest(said[: len(expected)], expected):
        return None
    (size,) = _HEADER.unpack(said[len(expected) :])
    body = read_exactly(conn, size) if size <= MAX_CHANNEL_REQUEST_BYTES else None
    if body is None or fingerprint() != doors.installation:
        return None
    conn.settimeout(None)
    request = json.loads(body)
    env = {str(name): str(value) for name, value in request["env"].items()}
    return [str(arg) for arg in request["argv"]], env, base64.b64decode(request["stdin"])


def _become_streamed(conn: socket.socket, env: dict[str, str], stdin: bytes) -> threading.Thread:
    """This process as a channel's command's (:func:`_become`): its stdin the request's (a memory file), its
    stdout and stderr pipes that a thread sends on in frames, the server's environment with the invocation's
    variables, and the user's home folder (where sshd starts a command)."""
    given = os.memfd_create("stdin", os.MFD_CLOEXEC)
    rest = memoryview(stdin)
    while rest:
        rest = rest[os.write(given, rest) :]
    os.lseek(given, 0, os.SEEK_SET)
    out_read, out_write = os.pipe2(os.O_CLOEXEC)
    err_read, err_write = os.pipe2(os.O_CLOEXEC)
    # CHANNEL_ENV is the server's, from the command that started it: this command asked for nothing
    inherited = {name: value for name, value in os.environ.items() if name != CHANNEL_ENV}
    _become(inherited | env, os.environ.get("HOME") or "/", (given, out_write, err_write))
    pump = threading.Thread(
        target=_pump, args=(conn, {out_read: STDOUT_FRAME, err_read: STDERR_FRAME}), name="resident-output", daemon=True
    )
    pump.start()
    return pump


_SENDING = threading.Lock()  # a channel's frames go whole: the output's, then the exit status


def _pump(conn: socket.socket, sources: dict[int, bytes]) -> None:
    """The command's output, in frames, as it comes (a slow peer slows the command: the pipes fill)."""
    with contextlib.suppress(OSError):  # the peer gone: _watch ends the command
        while sources:
            readable, _, _ = select.select(list(sources), [], [])
            for fd in readable:
                data = os.read(fd, 65536)
                if data:
                    with _SENDING:
                        conn.sendall(FRAME.pack(sources[fd], len(data)) + data)
                else:
                    os.close(fd)
                    del sources[fd]


def _finish_streamed(conn: socket.socket, pump: threading.Thread, code: int) -> None:
    """The output's last frames, then the exit status: stdout and stderr closed (flushed already), so the
    pump reads them to their end."""
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.close(fd)
    pump.join(KILL_GRACE_SECONDS)  # a descriptor of them left to a process of the command's: not waited for
    with _SENDING, contextlib.suppress(OSError):
        conn.sendall(FRAME.pack(STATUS_FRAME, STATUS.size) + STATUS.pack(code))


def _status(run: Callable[[list[str]], int], argv: list[str]) -> int:
    """The exit status the command would give its own process: its return value, or what an exception
    leaving it would make of it (argparse's refusal is a ``SystemExit(2)``; anything else, a traceback
    on stderr and 1)."""
    try:
        return run(argv)
    except SystemExit as leaving:
        if leaving.code is None or isinstance(leaving.code, int):
            return leaving.code or 0
        sys.stderr.write(f"{leaving.code}\n")
        return 1
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1


def _say_status(conn: socket.socket, code: int) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(STATUS.pack(code))


# --- the server ------------------------------------------------------------------------------------


def _listen(path: Path) -> tuple[socket.socket, int] | None:
    """The socket at ``path``, bound by this server alone (a lock beside it); None when another server
    holds it."""
    import fcntl

    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a server that died left it; no live server can (it holds the lock)
    _forget_stale(path.parent, fcntl)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    previous = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(previous)
    listener.listen(16)
    return listener, lock


def _forget_stale(folder: Path, fcntl: Any) -> None:
    """The sockets of other installations' servers that are gone (their lock is free), with their locks."""
    for lock_path in folder.glob("*.sock.lock"):
        try:
            held = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(held)
            continue
        for gone in (lock_path.with_suffix(""), lock_path):
            with contextlib.suppress(OSError):
                os.unlink(gone)
        os.close(held)


def _fork_spare(doors: Doors, taken: int, servers: Sequence[int]) -> tuple[int, int]:
    """A new spare, and the descriptor that tells it to warm up. ``servers``: the server's own descriptors,
    closed in the spare (its lock above all: a command running long must not keep the next server from
    starting; the other spares' go descriptors: each spare finds the server gone when its own closes)."""
    go_read, go_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the spare: leaves with its command's status, never returns here
        try:
            signal.set_wakeup_fd(-1)  # the server's, not the spare's
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (*servers, go_write):
                os.close(fd)
            spare(doors, taken, go_read)
        finally:
            os._exit(70)  # EX_SOFTWARE: the spare failed before its command
    os.close(go_read)
    return pid, go_write


def _tell(go: int) -> None:
    with contextlib.suppress(OSError):
        os.write(go, b"g")
    os.close(go)


def serve(path: Path, seconds: int) -> int:
    """Keep ``SPARES`` spares ready at ``path`` until ``seconds`` pass without a command (or the socket is
    no longer ours); 0, or 1 when a spare died before taking a command (a broken installation: no new
    spare is started, clients run commands themselves)."""
    bound = _listen(path)
    if bound is None:
        return 0
    listener, lock = bound
    identity = os.stat(path).st_ino
    channel = socket.create_server(("127.0.0.1", 0))  # reached through SSH's direct-tcpip, token first
    doors = Doors(listener, channel, Offer(channel.getsockname()[1], os.urandom(32)), fingerprint())
    for door in doors.listeners:
        door.setblocking(False)  # every spare waits on both: the one that accepts first takes a connection
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    wake_read, wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.signal(signal.SIGCHLD, lambda _number, _frame: None)  # a spare ended: wakes the select below
    signal.set_wakeup_fd(wake_write)
    mine = (read_end, lock, wake_read, wake_write)
    busy: dict[int, float] = {}  # spares running a command: when each took it
    waiting: dict[int, int | None] = {}  # spares without a command: the descriptor that tells each to warm up

    def fork_spare() -> None:
        others = [go for go in waiting.values() if go is not None]
        pid, go = _fork_spare(doors, write_end, (*mine, *others))
        waiting[pid] = go

    def warm_at() -> float:
        """When cold spares import: a while after the last command ended, or once every command running has
        run long (a short one that began meanwhile is not made to share its CPU with them)."""
        return max(busy.values()) + LONG_COMMAND_SECONDS if busy else quiet_since + QUIET_SECONDS

    def tell(pid: int) -> None:
        go = waiting[pid]
        if go is not None:
            _tell(go)
            waiting[pid] = None

    for _ in range(SPARES):
        fork_spare()
    quiet_since = time.monotonic() - QUIET_SECONDS  # no command has run yet: the first spares warm up now
    deadline = time.monotonic() + seconds
    broken = False
    try:
        while (now := time.monotonic()) < deadline:
            cold = [pid for pid, go in waiting.items() if go is not None]
            timeout = min(1.0, max(0.0, deadline - now), max(0.0, warm_at() - now) if cold else 1.0)
            # Clients are watched for while every spare waiting is cold: one of them warms up for a client.
            clients = doors.listeners if cold and len(cold) == len(waiting) else []
            # A spare's SIGCHLD does not end the wait (PEP 475): its handler writes to ``wake_read``.
            readable, _, _ = select.select([read_end, wake_read, *clients], [], [], timeout)
            if wake_read in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_read, 512)
            if busy and not (busy := {pid: took for pid, took in busy.items() if not _reaped(pid)}):
                quiet_since = time.monotonic()
            if read_end in readable:  # a spare took a command: another is forked, to warm up later
                (pid,) = PID.unpack(os.read(read_end, PID.size))
                waiting.pop(pid, None)
                busy[pid] = time.monotonic()
                fork_spare()
                deadline = time.monotonic() + seconds
                continue
            if time.monotonic() >= warm_at():
                for pid in cold:
                    tell(pid)
            elif any(door in readable for door in doors.listeners):
                tell(cold[0])
            if any(_reaped(pid) for pid in waiting) and not select.select([read_end], [], [], 0)[0]:
                broken = True  # a spare died without a command
                break
            if not _still_ours(path, identity):
                break
    finally:
        if _still_ours(path, identity):
            os.unlink(path)
        # The ready spares' accept fails and they leave; one that took a command just now keeps it.
        for door in doors.listeners:
            with contextlib.suppress(OSError):
                door.shutdown(socket.SHUT_RDWR)
            door.close()
        for go in waiting.values():  # a spare not warmed up yet leaves at once
            if go is not None:
                os.close(go)
        with contextlib.suppress(OSError):
            os.unlink(f"{path}.lock")
        os.close(lock)
    return 1 if broken else 0


def _still_ours(path: Path, identity: int) -> bool:
    try:
        return os.stat(path).st_ino == identity
    except FileNotFoundError:
        return False


def _reaped(pid: int, wait: bool = False) -> bool:
    try:
        done, _ = os.waitpid(pid, 0 if wait else os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def main(argv: Sequence[str]) -> int:
    if len(argv) != 3 or argv[0] != "serve":
        sys.stderr.write("usage: python -m worker.resident serve SOCKET SECONDS\n")
        return 2
    try:
        return serve(Path(argv[1]), int(argv[2]))
    except OSError as problem:
        if problem.errno in (errno.EADDRINUSE, errno.EACCES, errno.ENOENT):
            return 0
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
