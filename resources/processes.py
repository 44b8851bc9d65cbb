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
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

from resources.errors import Category, MigrationError

if TYPE_CHECKING:
    import paramiko

Stream = Literal["stdout", "stderr"]
PID_MARKER = "@@worker-pid "


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


class SSHProcess:
    """A command on an SSH channel, wrapped so that it reports its PID before it starts."""

    def __init__(self, client: paramiko.SSHClient, command: str, stdin: bytes) -> None:
        self.client = client
        self.channel = client.get_transport().open_session()  # type: ignore[union-attr]
        self.channel.exec_command(command)
        try:
            self.channel.sendall(stdin)
            self.channel.shutdown_write()
        except OSError:
            pass  # it exited before reading its input: its output and exit status say why
        self.pid: int | None = None

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
