"""Benchmark: the clinical ``integrity`` check (``clinic-migrate verify``) on one patients partition,
beside its floor, in one run.

    python -m bench.checks --patients 500000

On throw-away MariaDB and PostgreSQL databases it builds a patients partition with bench/clinical.py's
data builder (~8 % of the rows quarantined: duplicates, missing documents and names, bad birth
dates), migrates it with the worker (``clinic-migrate migrate``), then measures, a few times each,
alternating:

1. ``verify_partition`` for integrity, end to end — source read and §6, target read and re-hash,
   quarantine, comparison — in a child process of its own: its wall time, rows/s (eligible rows)
   and peak RSS;
2. the same through the command line (``clinic-migrate verify --checks integrity``), start-up and
   all (wall time);
3. the *floor*: a plain ``SELECT … ORDER BY id`` of the legacy partition (the columns the check reads,
   through connectorx into Arrow, as the worker reads them) plus a plain ``SELECT … ORDER BY
   legacy_id`` of the target partition (``COPY … TO STDOUT``), one after the other: what reading both
   sides costs, with no transform, no hash and no comparison.

It prints every measurement, then the best of each, the ratio to the floor and the 150k rows/s target.
With ``--rss-sizes`` it also verifies smaller copies of the partition, to show that memory is flat.
Not a test: it asserts nothing. The machine has 2 cores: run it alone for figures worth quoting.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from bench.clinical import SISTEMA, build_main, build_rss, count, say
from demo.databases import MARIADB_ADMIN, POSTGRES_ADMIN, throwaway_database
from worker import schema

WORKER = str(Path(sys.executable).with_name("clinic-migrate"))
TARGET_ROWS_PER_S = 150_000
# The measured process: set up as clinic-migrate's (worker/launch.py) before anything loads polars,
# and holding only what the worker's holds (bench/verify_child.py imports no Dagster, unlike this module).
CHILD = (
    "import sys; from worker.launch import prepare_process; prepare_process(); "
    "from bench.verify_child import child; child(*sys.argv[1:])"
)


@dataclass(frozen=True)
class Timed:
    label: str
    rows: int
    seconds: float
    rss_mb: float | None = None
    rss_start_mb: float | None = None  # before the check: the interpreter, its libraries, the engines
    rss_halves_mb: tuple[float, float] | None = None  # the highest RSS in the first and the second half

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        rss = f"  peak RSS {self.rss_mb:6.1f} MB (at start {self.rss_start_mb:.1f})" if self.rss_mb is not None else ""
        if self.rss_halves_mb is not None:
            rss += f", halves {self.rss_halves_mb[0]:.0f} / {self.rss_halves_mb[1]:.0f} MB"
        return f"{self.label:<44} {self.rows:>9} rows {self.seconds:>7.2f} s {self.rate:>9,.0f} rows/s{rss}"


# --- the check, in a process of its own ------------------------------------------------------------


def verify_in_child(label: str, urls: dict[str, str], sistema: str) -> tuple[Timed, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "patients", sistema],
        input=json.dumps(urls),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    timed = Timed(
        label,
        int(result["eligible"]),
        float(result["seconds"]),
        float(result["rss_mb"]),
        float(result["rss_before_mb"]),
        (float(result["rss_halves_mb"][0]), float(result["rss_halves_mb"][1])),
    )
    return timed, result


def verify_by_cli(label: str, urls: dict[str, str], sistema: str) -> Timed:
    argv = [WORKER, "verify", "--entity", "patients", "--sistema", sistema, "--checks", "integrity"]
    started = time.perf_counter()
    done = subprocess.run(argv, input=json.dumps(urls), capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed: {done.stderr.strip().splitlines()[-1:]}")
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    if not outcome["passed"]:
        raise RuntimeError(f"{label}: integrity failed on an untouched partition: {outcome['metadata']}")
    return Timed(label, int(outcome["metadata"]["eligible"]), seconds)


# --- the floor -------------------------------------------------------------------------------------


def floor(legacy: Engine, target: Engine, sistema: str) -> tuple[Timed, Timed]:
    """A plain read of each side of the partition, the columns the check reads, one after the other."""
    import connectorx
    import polars as pl

    from worker.source import LegacyReader
    from worker.verify_clinical import TARGET_TYPES, _target_query

    reader = LegacyReader(legacy, "patients", sistema, None)
    assert reader.url is not None, "the floor reads MariaDB through connectorx"
    t = reader.columns.table
    picked = ", ".join(
        f"CAST({n} AS CHAR) AS {n}" if n in reader.columns.datetimes else n for n in reader.columns.names
    )
    sql = f"SELECT {picked} FROM {t.name} WHERE sistema = '{sistema}' AND eliminado = 0 ORDER BY id"
    started = time.perf_counter()
    frame = pl.from_arrow(connectorx.read_sql(reader.url, sql, return_type="arrow"))
    source = Timed("floor: legacy SELECT … ORDER BY id", len(frame), time.perf_counter() - started)
    del frame
    whole = _target_query("patients", sistema, None, 10**9, unique=True)  # ORDER BY legacy_id
    query = whole.compile(target, compile_kwargs={"literal_binds": True})
    columns = ", ".join(TARGET_TYPES["patients"])
    started = time.perf_counter()
    with target.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        buffer = io.BytesIO()
        with cursor, cursor.copy(f"COPY ({query}) TO STDOUT (FORMAT csv)") as copy:
            for chunk in copy:
                buffer.write(chunk)
    rows = pl.read_csv(buffer.getvalue(), has_header=False, infer_schema=False).height if buffer.tell() else 0
    stored = Timed(f"floor: target SELECT {columns[:24]}… ORDER BY legacy_id", rows, time.perf_counter() - started)
    return source, stored


# --- the run ---------------------------------------------------------------------------------------


def migrate(urls: dict[str, str], sistema: str) -> float:
    argv = [WORKER, "migrate", "--entity", "patients", "--sistema", sistema, "--usuario", "bench",
            "--run-id", f"bench-checks-{sistema.lower()}"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(argv, input=json.dumps(urls), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"migration of {sistema} failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=3, help="measurements of each kind (default 3)")
    parser.add_argument("--rss-sizes", default="100000", help="smaller partitions verified for peak RSS ('' none)")
    parser.add_argument("--keep", action="store_true", help="keep the databases afterwards")
    args = parser.parse_args()
    rss_sizes = sorted(int(s) for s in args.rss_sizes.split(",") if s.strip())
    load_at_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    bench_started = time.monotonic()
    with (
        throwaway_database(MARIADB_ADMIN, "bench_checks_legacy", keep=args.keep) as legacy_url,
        throwaway_database(POSTGRES_ADMIN, "bench_checks_clinical", keep=args.keep) as target_url,
        throwaway_database(MARIADB_ADMIN, "bench_checks_rss", keep=args.keep) as rss_legacy_url,
    ):
        legacy, target = schema.make_engine(legacy_url), schema.make_engine(target_url)
        urls = {"legacy_db_url": legacy_url, "target_db_url": target_url}
        started = time.monotonic()
        build_main(legacy, args.patients, 0)
        built = count(legacy, "SELECT count(*) FROM pacientes")
        say(f"generated {built} patients in {time.monotonic() - started:.1f} s")
        say(f"migrated {SISTEMA} in {migrate(urls, SISTEMA):.1f} s (clinic-migrate migrate)")
        rss_sistemas: dict[int, str] = {}
        if rss_sizes:
            main_db = str(make_url(legacy_url).database)
            rss_sistemas = build_rss(main_db, schema.make_engine(rss_legacy_url), rss_sizes, args.patients)
            for size, sistema in rss_sistemas.items():
                rss_urls = {"legacy_db_url": rss_legacy_url, "target_db_url": target_url}
                say(f"migrated {sistema} ({size:,} patients) in {migrate(rss_urls, sistema):.1f} s")

        checks: list[Timed] = []
        clis: list[Timed] = []
        floors: list[tuple[Timed, Timed]] = []
        for attempt in range(1, args.repeat + 1):
            timed, result = verify_in_child(f"verify_partition (integrity) #{attempt}", urls, SISTEMA)
            if result["failures"]:
                raise RuntimeError(f"integrity failed on an untouched partition: {result}")
            checks.append(timed)
            say(timed.line())
            pair = floor(legacy, target, SISTEMA)
            floors.append(pair)
            say(pair[0].line())
            say(pair[1].line())
            clis.append(verify_by_cli(f"clinic-migrate verify --checks integrity #{attempt}", urls, SISTEMA))
            say(clis[-1].line())
        rss_runs = []
        for sistema in rss_sistemas.values():
            rss_urls = {"legacy_db_url": rss_legacy_url, "target_db_url": target_url}
            timed, _ = verify_in_child(f"verify_partition (integrity) {sistema}", rss_urls, sistema)
            rss_runs.append(timed)
            say(timed.line())

    best = min(checks, key=lambda t: t.seconds)
    best_floor = min(floors, key=lambda pair: pair[0].seconds + pair[1].seconds)
    floor_seconds = best_floor[0].seconds + best_floor[1].seconds
    floor_rate = best.rows / floor_seconds if floor_seconds > 0 else 0.0
    best_cli = min(clis, key=lambda t: t.seconds)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    say("")
    say("| measured (best of each) | rows | seconds | rows/s | peak RSS |")
    say("|---|--:|--:|--:|--:|")
    say(f"| verify_partition, integrity, end to end | {best.rows:,} | {best.seconds:.2f} | {best.rate:,.0f} "
        f"| {best.rss_mb:.0f} MB (at start {best.rss_start_mb:.0f}) |")  # fmt: skip
    say(f"| clinic-migrate verify --checks integrity (process, start-up included) | {best_cli.rows:,} "
        f"| {best_cli.seconds:.2f} | {best_cli.rate:,.0f} | |")  # fmt: skip
    say(
        f"| floor: legacy SELECT ORDER BY id + target SELECT ORDER BY legacy_id | {best.rows:,} | "
        f"{floor_seconds:.2f} ({best_floor[0].seconds:.2f} + {best_floor[1].seconds:.2f}) | {floor_rate:,.0f} | |"
    )
    for timed in rss_runs:
        say(f"| verify_partition, integrity, {timed.rows:,} rows | {timed.rows:,} | {timed.seconds:.2f} "
            f"| {timed.rate:,.0f} | {timed.rss_mb:.0f} MB (at start {timed.rss_start_mb:.0f}) |")  # fmt: skip
    say("")
    say(f"- ratio to the floor: {best.rate / floor_rate:.2f}× (the floor's time / the check's time)")
    halves = [t.rss_halves_mb for t in checks if t.rss_halves_mb is not None]
    if halves:
        growth = max(second - first for first, second in halves)
        say(f"- memory over the partition: highest RSS of the first / second half of each run "
            f"{'; '.join(f'{a:.0f} / {b:.0f} MB' for a, b in halves)} (most grown: {growth:+.0f} MB)")  # fmt: skip
    met = "met" if best.rate >= TARGET_ROWS_PER_S else "**not met**"
    say(f"- target: ≥ {TARGET_ROWS_PER_S:,} rows/s end to end: {met} ({best.rate:,.0f} rows/s)")
    say(f"- every measurement: check {', '.join(f'{t.seconds:.2f}' for t in checks)} s; floor "
        f"{', '.join(f'{a.seconds + b.seconds:.2f}' for a, b in floors)} s; CLI "
        f"{', '.join(f'{t.seconds:.2f}' for t in clis)} s")  # fmt: skip
    say(f"- benchmark wall time {time.monotonic() - bench_started:.0f} s on {os.cpu_count()} cores; load average "
        f"at start {load_at_start}, at the end {load} (other processes share the machine)")  # fmt: skip


if __name__ == "__main__":
    main()
