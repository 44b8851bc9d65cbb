"""``clinic-migrate``'s entry point: the process's memory set up before anything allocates, then
worker/cli.py. It imports nothing heavy itself: polars' allocator (jemalloc) reads its settings once,
when polars is loaded, and glibc's cap holds only for arenas not yet made.

- glibc's malloc, used by connectorx and the drivers, gives threads that allocate at once arenas of
  their own, up to eight per core; connectorx reads each page on threads of its own, and the pages
  it freed stayed behind in those arenas: RSS crept by ~3 MB a page (56 MB over a 480k-row
  partition, bench/checks.py). Two arenas keep it flat.
- polars' jemalloc spreads threads over four arenas per core likewise; pages freed in one arena are
  not reused by a thread of another, and the integrity check's peak RSS at 480k rows was ~490 MB
  against ~430 MB with one arena, at the same speed (bench/checks.py, interleaved runs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from worker.libc import libc

M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 2
POLARS_ARENAS = 1
POLARS_ALLOCATOR_SETTINGS = "_RJEM_MALLOC_CONF"  # jemalloc's MALLOC_CONF, as polars' build names it
RESIDENT_ENV = "CLINIC_MIGRATE_RESIDENT_SECONDS"  # worker/resident.py


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process (like ``MALLOC_ARENA_MAX``); False when not glibc."""
    try:
        return bool(libc().mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def limit_polars_arenas(arenas: int = POLARS_ARENAS) -> bool:
    """Give polars' jemalloc ``arenas`` arenas; False when it is too late (polars is loaded) or the
    environment already names a number of arenas (that choice is kept). Other settings stay: those a
    parent process that loaded polars passes on (polars writes its defaults into the variable)."""
    settings = os.environ.get(POLARS_ALLOCATOR_SETTINGS, "")
    if "polars" in sys.modules or "narenas:" in settings:
        return False
    os.environ[POLARS_ALLOCATOR_SETTINGS] = ",".join(filter(None, (settings, f"narenas:{arenas}")))
    return True


def prepare_process() -> None:
    """Both caps, before any thread allocates and before polars is loaded."""
    limit_malloc_arenas()
    limit_polars_arenas()


def leave(code: int, last: Callable[[], None] | None = None) -> NoReturn:
    """End the process with ``code`` now that its work is done, skipping Python's teardown of its
    modules and objects (0.25–0.3 s after the integrity check of 480k rows: a quarter of ``clinic-migrate
    verify``'s time outside the check, bench/checks.py). What that teardown would have done that
    matters is done first: every database connection closed (a goodbye to each server, not a dropped
    socket), the logs and the output flushed."""
    from worker import schema

    schema.dispose_engines()
    logging.shutdown()
    _flush()
    if last is not None:  # a resident worker's spare: the exit status to its client (worker/resident.py)
        last()
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def run_command(argv: Sequence[str]) -> int:
    """The command ``argv`` (worker/cli.py) in this process; its exit status."""
    from worker.cli import main as run

    return run(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get(RESIDENT_ENV):  # worker/resident.py (opt-in) reads its value
        from worker.resident import handed_over

        if (code := handed_over(args)) is not None:
            _flush()
            os._exit(code)
    prepare_process()
    leave(run_command(args))
