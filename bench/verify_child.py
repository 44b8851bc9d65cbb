"""The process bench/checks.py measures: one ``verify_partition`` of the clinical integrity check, set
up and loaded as ``clinic-migrate verify`` is (worker modules only: no Dagster, no benchmark code),
so that its RSS is the worker's."""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from pathlib import Path

from worker import schema


def _status_mb(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (``VmHWM``, ``VmRSS``), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: a child started by fork + exec reports
    there the parent's peak at the fork, when it is higher than its own."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    return _status_mb("VmRSS") or 0.0


def child(entity: str, sistema: str) -> None:
    """One ``verify_partition`` (URLs on stdin), in a process set up as the worker's (bench/checks.py's
    ``CHILD``: worker/launch.py's allocator caps before polars loads); one JSON line with its time, peak RSS,
    and the highest RSS of each half of the run (sampled every 20 ms): equal halves mean memory flat
    over the partition."""
    from worker.verify_clinical import verify_partition

    urls = json.loads(sys.stdin.read())
    legacy, target = schema.make_engine(urls["legacy_db_url"]), schema.make_engine(urls["target_db_url"])
    before = peak_rss_mb()
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            samples.append((time.perf_counter(), current_rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    report = verify_partition(entity, sistema, legacy, target, target)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    middle = started + seconds / 2
    halves = [max((mb for at, mb in samples if (at < middle) == first), default=0.0) for first in (True, False)]
    print(
        json.dumps(
            {
                "seconds": seconds,
                "eligible": report.eligible,
                "stored": report.stored,
                "failures": report.integrity_failures,
                "rss_mb": peak_rss_mb(),
                "rss_before_mb": before,
                "rss_halves_mb": halves,
            }
        )
    )
