"""Google's Cloud Firestore emulator, started and stopped by the tests, the demo and the benchmarks.

The emulator comes from the Debian package ``google-cloud-cli-firestore-emulator``; its launcher
is a shell script that starts a Java process tree, so it runs in its own process group and the
whole group is stopped on exit (SIGTERM, then SIGKILL). Projects are isolated from each other on
one emulator, so tests share one emulator and use a fresh project id each.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

PACKAGE = "google-cloud-cli-firestore-emulator"
LAUNCHER_NAME = "cloud_firestore_emulator"
DEFAULT_LAUNCHER = Path("/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator") / LAUNCHER_NAME
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class EmulatorUnavailable(RuntimeError):
    """The emulator is not installed (or cannot run here)."""


class EmulatorStartError(RuntimeError):
    """The emulator was found but did not start answering in time."""


def find_launcher() -> Path | None:
    """The ``cloud_firestore_emulator`` launcher that the Debian package installed, if any."""
    candidates: list[Path] = []
    try:
        listing = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True, timeout=10, check=False)
        if listing.returncode == 0:
            candidates += [Path(line) for line in listing.stdout.splitlines() if line.endswith("/" + LAUNCHER_NAME)]
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append(DEFAULT_LAUNCHER)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def emulator_available() -> bool:
    """True when the emulator and the Java runtime it needs are installed."""
    return find_launcher() is not None and shutil.which(os.environ.get("JAVA", "java")) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(host: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}/", timeout=1) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the emulator's whole process group, then SIGKILL what is left."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT)
    # the launcher may exit before its Java child: kill the group whatever the launcher did
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=STOP_TIMEOUT)


@contextmanager
def running_emulator(port: int | None = None, *, timeout: float = START_TIMEOUT) -> Iterator[str]:
    """Start the emulator on 127.0.0.1 (a free port unless given); yield ``"127.0.0.1:PORT"``."""
    launcher = find_launcher()
    if launcher is None or shutil.which(os.environ.get("JAVA", "java")) is None:
        raise EmulatorUnavailable(f"Google's Cloud Firestore emulator is not installed: apt-get install {PACKAGE}")
    port = port or _free_port()
    host = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="firestore-emulator-") as workdir:
        log = Path(workdir) / "emulator.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [str(launcher), "start", "--host=127.0.0.1", f"--port={port}"],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,  # its own process group: the Java tree is stopped as a whole
            )
        try:
            deadline = time.monotonic() + timeout
            while not _answers(host):
                if process.poll() is not None:
                    raise EmulatorStartError(
                        f"the Firestore emulator exited with code {process.returncode}:\n{_tail(log)}"
                    )
                if time.monotonic() > deadline:
                    raise EmulatorStartError(
                        f"the Firestore emulator did not answer on {host} in {timeout:.0f} s:\n{_tail(log)}"
                    )
                time.sleep(0.2)
            yield host
        finally:
            _stop_group(process)


def clear_documents(host: str, project: str) -> None:
    """Delete every document of ``project`` on the emulator at ``host``."""
    quoted = urllib.parse.quote(project, safe="")
    url = f"http://{host}/emulator/v1/projects/{quoted}/databases/(default)/documents"
    request = urllib.request.Request(url, method="DELETE")
    with urllib.request.urlopen(request, timeout=30) as response:
        if response.status != 200:
            raise RuntimeError(f"clearing project {project} on the emulator answered HTTP {response.status}")


if __name__ == "__main__":  # `make dev`: start on --port, print the host, stop on SIGINT/Ctrl-C
    import argparse

    parser = argparse.ArgumentParser(description="Google's Firestore emulator until interrupted")
    parser.add_argument("--port", type=int, default=None)
    # A background job of a shell ignores SIGINT: make SIGTERM (and SIGINT) unwind, stopping the emulator.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with running_emulator(parser.parse_args().port) as emulator_host:
        print(f"FIRESTORE_EMULATOR_HOST={emulator_host}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
