"""The migration worker as a Dagster Pipes process, over SSH (production) or a subprocess (demo).

Secrets and the Pipes bootstrap go to the worker as one JSON object on stdin. Pipes messages come
back on its stdout and are handed to the Pipes session as they arrive; every other line becomes
a Dagster log line, redacted and batched (≤50 lines or 1 s per event).
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    ConfigurableResource,
    MaterializeResult,
    OpExecutionContext,
    PipesClient,
    PipesEnvContextInjector,
    PipesExecutionResult,
    PipesMessageHandler,
    PipesMessageReader,
    open_pipes_session,
)
from dagster_pipes import PIPES_PROTOCOL_VERSION_FIELD, PipesExtras, PipesParams
from pydantic import Field

from resources.errors import Category, MigrationError
from resources.processes import NO_EXIT_STATUS, LocalProcess, Process, Stream
from resources.ssh import SSHResource
from worker.launch import RESIDENT_ENV
from worker.redact import redact

Starter = Callable[[Sequence[str], bytes], Process]
RunContext = AssetExecutionContext | OpExecutionContext | AssetCheckExecutionContext
EXIT_CATEGORIES = {
    2: Category.VALIDATION_ERROR,
    3: Category.CONNECTION_ERROR,
    126: Category.COMMAND_NOT_FOUND,
    127: Category.COMMAND_NOT_FOUND,
}
CATEGORY_LINE = re.compile(rf"({'|'.join(c.value for c in Category)}): ")


def raise_for_exit(code: int, stderr: Sequence[str], *, connection_lost: bool = False) -> None:
    """A non-zero exit as its §8 category, with the worker's own words (its last line that names a
    category, else its last line; redacted). A worker killed by a signal — a negative code locally,
    128+N through the SSH wrapper — is WORKER_KILLED, retried only when the connection was lost too."""
    if code == 0:
        return
    if code == NO_EXIT_STATUS or code < 0 or 128 < code < 160:
        if code == NO_EXIT_STATUS:
            what = "the worker ended without an exit status"
        else:
            number = -code if code < 0 else code - 128
            what = f"the worker was killed by {_signal_name(number)}"
        if connection_lost:
            what += ": the SSH connection to the worker host was lost"
        raise MigrationError(Category.WORKER_KILLED, what, retryable=connection_lost)
    said = next((line for line in reversed(stderr) if CATEGORY_LINE.match(line)), None)
    if said is not None:
        category, message = said.split(": ", 1)
        raise MigrationError(Category(category), message)
    last = next((line for line in reversed(stderr) if line.strip()), f"exit code {code}")
    raise MigrationError(EXIT_CATEGORIES.get(code, Category.SCRIPT_ERROR), f"worker exited with {code}: {last}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def stream_lines(process: Process, timeout_seconds: float, grace_seconds: float) -> Iterator[tuple[Stream, str]]:
    """The process's lines; if they stop coming in time or the reader is interrupted, the process
    is stopped (SIGTERM, then SIGKILL after ``grace_seconds``) before the error goes on."""
    try:
        yield from process.lines(time.monotonic() + timeout_seconds)
    except BaseException:
        process.stop(grace_seconds)
        raise


class LogBatcher:
    """Redacted output lines, sent as one log event per 50 lines or per second at the latest
    (a timer flushes a batch even when the worker goes quiet)."""

    def __init__(self, emit: Callable[[str], None], max_lines: int = 50, max_seconds: float = 1.0) -> None:
        self.emit = emit
        self.max_lines = max_lines
        self.max_seconds = max_seconds
        self.lines: list[str] = []
        self.first_at = 0.0
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None

    def add(self, line: str) -> None:
        with self.lock:
            if not self.lines:
                self.first_at = time.monotonic()
                self.timer = threading.Timer(self.max_seconds, self.flush)
                self.timer.daemon = True
                self.timer.start()
            self.lines.append(redact(line))
        self.flush_if_due()

    def flush_if_due(self) -> None:
        if len(self.lines) >= self.max_lines or (self.lines and time.monotonic() - self.first_at >= self.max_seconds):
            self.flush()

    def flush(self) -> None:
        with self.lock:
            lines, self.lines = self.lines, []
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        if lines:
            self.emit("\n".join(lines))


class PipesStdoutMessageReader(PipesMessageReader):
    """Pipes messages travel on the worker's stdout, mixed with its other output."""

    def __init__(self, on_progress: Callable[[Mapping[str, Any]], None] = lambda _: None) -> None:
        self.handler: PipesMessageHandler | None = None
        self.on_progress = on_progress

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[PipesParams]:
        self.handler = handler
        yield {"stdio": "stdout"}

    def handle_line(self, line: str) -> bool:
        """Hand ``line`` to the session if it is a Pipes message; say whether it was one."""
        if not line.startswith("{") or self.handler is None:
            return False
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            return False
        if not isinstance(message, dict) or PIPES_PROTOCOL_VERSION_FIELD not in message:
            return False
        params = message.get("params") or {}
        if message.get("method") == "log":  # free text from the worker: redact like any line
            params["message"] = redact(str(params.get("message", "")))
        payload = params.get("payload") if message.get("method") == "report_custom_message" else None
        if isinstance(payload, dict) and "progress" in payload:
            self.on_progress(payload["progress"])
        self.handler.handle_message(message)  # type: ignore[arg-type]
        return True

    @property
    def expected_writer_count(self) -> int:
        return 1  # one worker process writes

    def no_messages_debug_text(self) -> str:
        return "Pipes messages are read from the worker's stdout; see the worker's log lines."


class WorkerPipesClient(PipesClient):
    """Runs the worker with a Pipes session over whatever started it."""

    def __init__(self, start: Starter, timeout_seconds: float, grace_seconds: float) -> None:
        self.start = start
        self.timeout_seconds = timeout_seconds
        self.grace_seconds = grace_seconds

    def run(  # type: ignore[override]
        self,
        *,
        context: RunContext,
        argv: Sequence[str],
        secrets: Mapping[str, Any],
        final_report: type,
        extras: PipesExtras | None = None,
    ) -> Sequence[PipesExecutionResult]:
        """Run the worker; return what it reported. A worker that exits 0 without a ``final_report``
        (a materialization, check results) failed, whatever its exit code says: nothing it sent is
        recorded, and no result is made up for it (no implicit materialization).

        ``context`` may be an asset check's (``@asset_check``/``@multi_asset_check``): the Pipes
        session then runs on the op context beneath it, which carries the partition, the run and the
        step's log; the check results the worker reports come back as ``AssetCheckResult``s."""
        if isinstance(context, AssetCheckExecutionContext):
            context = context.op_execution_context
        reader = PipesStdoutMessageReader(
            on_progress=lambda counts: context.log.info(f"progress: {json.dumps(counts, sort_keys=True)}")
        )
        logs = LogBatcher(context.log.info)
        stderr_tail: deque[str] = deque(maxlen=20)
        with open_pipes_session(
            context=context, context_injector=PipesEnvContextInjector(), message_reader=reader, extras=extras
        ) as session:
            payload = {**secrets, "pipes": dict(session.get_bootstrap_env_vars())}
            process = self.start(argv, json.dumps(payload).encode())
            try:
                for stream, line in stream_lines(process, self.timeout_seconds, self.grace_seconds):
                    if stream == "stdout" and reader.handle_line(line):
                        logs.flush_if_due()
                        continue
                    if stream == "stderr":
                        stderr_tail.append(redact(line))
                    logs.add(line)
            finally:
                logs.flush()
            code = process.wait()
            raise_for_exit(code, stderr_tail, connection_lost=process.connection_lost())
            reported = session.get_results(implicit_materializations=False)
        if not any(isinstance(result, final_report) for result in reported):
            raise MigrationError(
                Category.SCRIPT_ERROR,
                f"the worker exited {code} without its final report ({final_report.__name__}): nothing is recorded",
            )
        return reported


class WorkerResource(ConfigurableResource):
    """Where and how the worker runs (``WORKER_TRANSPORT``, ``WORKER_COMMAND``)."""

    transport: Literal["ssh", "local"] = "ssh"
    command: str = Field(default="clinic-migrate", description="the worker executable on the legacy host")
    ssh: SSHResource | None = None
    migrate_timeout_seconds: float = 6 * 3600
    verify_timeout_seconds: float = Field(
        default=2 * 3600, description="stop a verification (clinic-migrate verify) after this long"
    )
    kill_grace_seconds: float = 5.0
    resident_seconds: int = Field(
        default=0,
        ge=0,
        description="keep a resident worker ready on the worker host for this long after a command "
        "(worker/resident.py: its start-up paid between commands); 0: every command starts its own",
    )

    @property
    def command_argv(self) -> list[str]:
        return shlex.split(self.command)

    @property
    def invocation(self) -> list[str]:
        """How a worker command starts: the worker, in the environment that asks for a resident one."""
        if not self.resident_seconds:
            return self.command_argv
        return ["env", f"{RESIDENT_ENV}={self.resident_seconds}", *self.command_argv]

    @contextmanager
    def host(self) -> Iterator[Starter]:
        """A way to start processes on the worker host. Over SSH, each first checks that the worker is there
        (in the same session: a missing one exits 127, ``COMMAND_NOT_FOUND``, before anything runs)."""
        if self.transport == "local":
            yield LocalProcess
            return
        if self.ssh is None:
            raise MigrationError(Category.VALIDATION_ERROR, "WORKER_TRANSPORT=ssh needs the SSH_* settings")
        ssh, worker = self.ssh, self.command_argv[0]
        with ssh.connect() as client:
            yield lambda argv, stdin: ssh.start(client, argv, stdin, check=worker)

    def migrate(
        self,
        context: AssetExecutionContext | OpExecutionContext,
        argv: Sequence[str],
        secrets: Mapping[str, Any],
        timeout_seconds: float | None = None,
    ) -> Sequence[PipesExecutionResult]:
        """Run ``clinic-migrate <argv>`` as a Pipes process; return its materialization."""
        with self.host() as start:
            client = WorkerPipesClient(start, timeout_seconds or self.migrate_timeout_seconds, self.kill_grace_seconds)
            return client.run(
                context=context, argv=[*self.invocation, *argv], secrets=secrets, final_report=MaterializeResult
            )

    def verify(
        self,
        context: RunContext,
        argv: Sequence[str],
        secrets: Mapping[str, Any],
        timeout_seconds: float | None = None,
    ) -> Sequence[AssetCheckResult]:
        """Run ``clinic-migrate <argv>`` (``verify …``) as a Pipes process from an asset check's
        ``context``; return the check results it reported."""
        with self.host() as start:
            client = WorkerPipesClient(start, timeout_seconds or self.verify_timeout_seconds, self.kill_grace_seconds)
            reported = client.run(
                context=context, argv=[*self.invocation, *argv], secrets=secrets, final_report=AssetCheckResult
            )
        return [result for result in reported if isinstance(result, AssetCheckResult)]

    def run_json(self, argv: Sequence[str], secrets: Mapping[str, Any], timeout_seconds: float = 600) -> dict[str, Any]:
        """Run ``clinic-migrate <argv>`` (a command that prints its result as one JSON object line, not
        Pipes) with ``secrets`` on stdin; that object, or a categorized failure."""
        with self.host() as start:
            process = start([*self.invocation, *argv], json.dumps(dict(secrets)).encode())
            out: list[str] = []
            err: list[str] = []
            for stream, line in stream_lines(process, timeout_seconds, self.kill_grace_seconds):
                (out if stream == "stdout" else err).append(line)
            code = process.wait()
            raise_for_exit(code, err, connection_lost=process.connection_lost())
        for line in reversed(out):
            if line.startswith("{"):
                return dict(json.loads(line))
        raise MigrationError(Category.SCRIPT_ERROR, f"the worker printed no result for {argv[0] if argv else 'it'}")

    def list_sistemas(self, secrets: Mapping[str, Any], timeout_seconds: float = 120) -> list[str]:
        """The active sistemas of the legacy DB, asked of the worker (Dagster may not reach that DB)."""
        said = self.run_json(["sistemas"], secrets, timeout_seconds)
        if "sistemas" not in said:
            raise MigrationError(Category.SCRIPT_ERROR, "the worker printed no list of sistemas")
        return list(said["sistemas"])
