"""A remote or local process seen the same way: lines out, a deadline, terminate then kill.

The worker protocol (argv, JSON on stdin, Pipes messages on stdout) does not depend on how the
process was started; :class:`SSHProcess` and :class:`LocalProcess` implement :class:`Process`.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

from resources.errors import Category, MigrationError
from worker.resident import CHANNEL_MARKER, FRAME, STATUS, STATUS_FRAME, STDERR_FRAME, STDOUT_FRAME

if TYPE_CHECKING:
    import paramiko

Stream = Literal["stdout", "stderr"]
PID_MARKER = "@@worker-pid "
NO_EXIT_STATUS = -1  # paramiko: the channel closed without an exit status


class Process(Protocol):
    pid: int | None

    def lines(self, deadline: float) -> Iterator[tuple[Stream, str]]:
        """Output lines as they come; raises TIMEOUT_ERROR at ``deadline`` (monotonic seconds)."""
        ...

    def wait(self) -> int: ...

    def stop(self, grace_seconds: float) -> None:
        """SIGTERM, then SIGKILL if still alive after ``grace_seconds``."""
        ...

    def connection_lost(self) -> bool:
        """Whether the way to the process broke (an SSH connection that died)."""
        ...


class _LineSplitter:
    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[str]:
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\n")
        return [line.decode("utf-8", "replace").rstrip("\r") for line in complete]

    def rest(self) -> list[str]:
        rest, self.buffer = self.buffer, b""
        return [rest.decode("utf-8", "replace")] if rest else []


def _timed_out() -> MigrationError:
    return MigrationError(Category.TIMEOUT_ERROR, "the worker did not finish in time and was stopped")


class _OverSSH:
    """A process on the host behind an SSH channel: stopped with ``kill`` over the same connection."""

    def __init__(self, client: paramiko.SSHClient, channel: paramiko.Channel, pid: int | None) -> None:
        self.client = client
        self.channel = channel
        self.pid = pid

    def connection_lost(self) -> bool:
        transport = self.client.get_transport()
        return transport is None or not transport.is_active()

    def _remote(self, command: str) -> int:
        _, stdout, _ = self.client.exec_command(command, timeout=10)
        return stdout.channel.recv_exit_status()

    def stop(self, grace_seconds: float) -> None:
        if self.pid is None:
            self.channel.close()
            return
        self._remote(f"kill -TERM {self.pid} 2>/dev/null")
        end = time.monotonic() + grace_seconds
        while time.monotonic() < end:
            if self._remote(f"kill -0 {self.pid} 2>/dev/null") != 0:
                break
            time.sleep(0.2)
        else:
            self._remote(f"kill -KILL {self.pid} 2>/dev/null")
        self.channel.close()


class SSHProcess(_OverSSH):
    """A command on an SSH channel, wrapped so that it reports its PID before it starts. ``on_offer``: told
    the resident worker's channel (worker/resident.py) when the command's stderr says it; that line is not
    part of the output."""

    def __init__(
        self,
        client: paramiko.SSHClient,
        command: str,
        stdin: bytes,
        on_offer: Callable[[str], None] = lambda _line: None,
    ) -> None:
        super().__init__(client, client.get_transport().open_session(), None)  # type: ignore[union-attr]
        self.on_offer = on_offer
        self.channel.exec_command(command)
        try:
            self.channel.sendall(stdin)
            self.channel.shutdown_write()
        except OSError:
            pass  # it exited before reading its input: its output and exit status say why

    def lines(self, deadline: float) -> Iterator[tuple[Stream, str]]:
        out, err = _LineSplitter(), _LineSplitter()
        chan = self.channel
        while True:
            progressed = False
            while chan.recv_ready():
                progressed = True
                for line in out.feed(chan.recv(65536)):
                    if self.pid is None and line.startswith(PID_MARKER):
                        self.pid = int(line[len(PID_MARKER) :])
                    else:
                        yield "stdout", line
            while chan.recv_stderr_ready():
                progressed = True
                for line in err.feed(chan.recv_stderr(65536)):
                    if line.startswith(CHANNEL_MARKER):
                        self.on_offer(line[len(CHANNEL_MARKER) :])
                    else:
                        yield "stderr", line
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            if time.monotonic() > deadline:
                raise _timed_out()
            if not progressed:
                time.sleep(0.02)
        for line in out.rest():
            yield "stdout", line
        for line in err.rest():
            yield "stderr", line

    def wait(self) -> int:
        return self.channel.recv_exit_status()


class ChannelProcess(_OverSSH):
    """A command a resident worker's spare runs for a channel (worker/resident.py): its output and exit
    status come in frames. It ended without a status: killed (the spare's client would say SIGKILL), or the
    connection was lost (then no status, as over a session)."""

    def __init__(self, client: paramiko.SSHClient, channel: paramiko.Channel, pid: int) -> None:
        super().__init__(client, channel, pid)
        self.buffer = b""
        self.status: int | None = None
        self.ended = False

    def _read(self, size: int, deadline: float) -> bytes | None:
        while len(self.buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timed_out()
            self.channel.settimeout(min(remaining, 1.0))
            try:
                chunk = self.channel.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                return None
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def lines(self, deadline: float) -> Iterator[tuple[Stream, str]]:
        splitters: dict[bytes, tuple[Stream, _LineSplitter]] = {
            STDOUT_FRAME: ("stdout", _LineSplitter()),
            STDERR_FRAME: ("stderr", _LineSplitter()),
        }
        while not self.ended:
            header = self._read(FRAME.size, deadline)
            kind, size = FRAME.unpack(header) if header is not None else (b"", 0)
            data = self._read(size, deadline) if header is not None else None
            if data is None or kind == STATUS_FRAME:
                self.ended = True
                self.status = STATUS.unpack(data)[0] if data is not None and len(data) == STATUS.size else None
            elif kind in splitters:
                stream, splitter = splitters[kind]
                for line in splitter.feed(data):
                    yield stream, line
        for stream, splitter in splitters.values():
            for line in splitter.rest():
                yield stream, line

    def wait(self) -> int:
        for _ in self.lines(float("inf")):
            pass
        self.channel.close()
        if self.status is not None:
            return self.status
        return NO_EXIT_STATUS if self.connection_lost() else 128 + signal.SIGKILL


class LocalProcess:
    """The same protocol as a subprocess (WORKER_TRANSPORT=local, the demo)."""

    def __init__(self, argv: Sequence[str], stdin: bytes) -> None:
        try:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError as missing:
            raise MigrationError(Category.COMMAND_NOT_FOUND, f"worker command not found: {missing.filename}") from None
        self.pid: int | None = self.popen.pid
        self.queue: queue.Queue[tuple[Stream, str] | None] = queue.Queue()
        self.readers = [
            threading.Thread(target=self._pump, args=("stdout", self.popen.stdout), daemon=True),
            threading.Thread(target=self._pump, args=("stderr", self.popen.stderr), daemon=True),
        ]
        for reader in self.readers:
            reader.start()
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(stdin)
            self.popen.stdin.close()
        except BrokenPipeError:
            pass  # it exited before reading its input: its output and exit status say why

    def _pump(self, stream: Stream, pipe: object) -> None:
        for raw in iter(pipe.readline, b""):  # type: ignore[attr-defined]
            self.queue.put((stream, raw.decode("utf-8", "replace").rstrip("\r\n")))
        self.queue.put(None)

    def lines(self, deadline: float) -> Iterator[tuple[Stream, str]]:
        open_streams = 2
        while open_streams:
            try:
                item = self.queue.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise _timed_out() from None
                continue
            if item is None:
                open_streams -= 1
            else:
                yield item

    def wait(self) -> int:
        return self.popen.wait()

    def connection_lost(self) -> bool:
        return False  # a local subprocess has no connection to lose

    def stop(self, grace_seconds: float) -> None:
        if self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
