"""Benchmark: issue 7's figures in one run — MariaDB → PostgreSQL, the worker run over sshd, beside
the floor and Sling measured on the same copy.

    python -m bench.clinical --patients 500000 --encounters-per-patient 1.5

On throw-away MariaDB and PostgreSQL databases and a loopback sshd, it measures, for patients and
encounters:

1. the *floor*: ``mariadb --batch … | psql -c "\\copy …"`` into a plain table with a primary key;
2. *Sling* (the peer), full refresh of the same rows (installed into .bench/sling-venv on first use);
3. this project's first full run (the worker over sshd);
4. an unchanged re-run (new run id): rows/s and the ledger rows it wrote (must be 0);
5. incremental runs, each after a new 1 % of the rows changed (data and ``actualizado_en``): the
   median's time (``--incremental-rounds``, 3: a run of 1–2 s varies by half on a shared machine)
   and its speed-up over the full run of the same partition; with ``--resident`` (the default), as many
   rounds again with each command in a process of its own, alternating, beside the same full runs;
6. a *wide* copy (notes of 50–400 characters, ~3 % bad rows): floor, Sling and first run;
7. the worker's peak RSS at each ``--rss-sizes`` (patients only), of a first run and of an unchanged
   re-run, to show it is flat.

The worker's shared libraries are dropped from the page cache first (bench/pagecache.py): the RSS of a
process that maps them depends on how their pages came into the cache.

It prints one line per run (rows, seconds, rows/s, peak RSS), then the table in Markdown, and beside it
the CPU seconds each run cost the client (the worker as it reports itself; Sling; the floor's mariadb and
psql), PostgreSQL and MariaDB, with the cores they kept busy: where a run's time goes. Rates are
wall-clock: the floor and Sling as whole processes, the worker from opening the SSH session to its
exit (its own ``rows_per_s``, which leaves out connecting and start-up, is shown beside). Every
figure is measured in the run; the targets are issue 7's. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from bench import pagecache, peers
from demo.databases import MARIADB_ADMIN, POSTGRES_ADMIN, throwaway_database
from demo.legacy_data import generate
from demo.sshd import running_sshd
from resources.processes import ChannelProcess, Stream
from resources.ssh import SSHResource
from worker import schema
from worker.launch import RESIDENT_ENV
from worker.resident import DIR_ENV as RESIDENT_DIR_ENV

WORKER = str(Path(sys.executable).with_name("clinic-migrate"))
SISTEMA = "BENCH"
ENTITIES = ("patients", "encounters")
TABLES = {"patients": "pacientes", "encounters": "atenciones"}
# Issue 7's targets (rows/s, wall clock). Wide rows: ≥ 4× the ~7–8k rows/s of before.
FIRST_RUN_TARGET = {"patients": 60_000, "encounters": 90_000}
WIDE_TARGET = 4 * 8_000
UNCHANGED_TARGET = 150_000
INCREMENTAL_SPEEDUP = 10.0
RSS_LIMIT_MB = 300.0
RSS_FLAT = 1.25
SECTIONS = ("main", "wide", "rss")  # the largest size may use at most this much more than the smallest


def say(message: str) -> None:
    print(message, flush=True)


# --- CPU: where a run's time goes ------------------------------------------------------------

SERVERS = {"PostgreSQL": ("postgres",), "MariaDB": ("mariadbd", "mysqld")}


def server_cpu() -> dict[str, float]:
    """CPU seconds (user + system) each database server has used so far, over all its processes and
    the children they reaped: PostgreSQL's backends end with their connections, and their time goes
    to the postmaster's children's times."""
    spent = dict.fromkeys(SERVERS, 0.0)
    for process in psutil.process_iter(["name", "cpu_times"]):
        times = process.info["cpu_times"]
        for label, names in SERVERS.items():
            if times is not None and (process.info["name"] or "").startswith(names):
                spent[label] += times.user + times.system + times.children_user + times.children_system
    return spent


@functools.cache
def _admin(url: str) -> Engine:
    return schema.make_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)  # no connection left open


def checkpoint_target(target_url: str) -> None:
    """``CHECKPOINT`` the target's server before a timed step: what the step before it wrote is flushed
    now, not while this one runs (the next checkpoint, forced by WAL volume, and the first change to each
    page after it logged in full), so no step pays for the one before it, whichever comes first."""
    with _admin(target_url).connect() as conn:
        conn.execute(text("CHECKPOINT"))


@contextmanager
def timed_step(target_url: str) -> Iterator[dict[str, float]]:
    """One timed step (the floor, Sling, a worker run), begun after a checkpoint of the target
    (:func:`checkpoint_target`): the CPU seconds spent during the block by each database server, and by this
    process's children that ended in it ("client": the floor's mariadb and psql, Sling)."""
    checkpoint_target(target_url)
    spent: dict[str, float] = {}
    servers, children = server_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        yield spent
    finally:
        after, ended = server_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
        spent["client"] = (ended.ru_utime + ended.ru_stime) - (children.ru_utime + children.ru_stime)
        spent |= {label: after[label] - servers[label] for label in SERVERS}


# --- the worker over SSH ---------------------------------------------------------------------


@dataclass
class WorkerRun:
    entity: str
    result: dict[str, Any]
    wall: float
    cpu: dict[str, float]  # client (the worker, as it reports itself), PostgreSQL, MariaDB

    @property
    def rows(self) -> int:
        return int(self.result["rows_read"])

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall if self.wall > 0 else 0.0


class Worker:
    def __init__(self, ssh: SSHResource, batch_size: int | None, resident: list[str] | None = None) -> None:
        self.ssh = ssh
        self.batch_size = batch_size
        self.resident = resident or []  # ``env`` and the variables that ask for a resident worker

    def run(
        self, label: str, entity: str, sistema: str, run_id: str, urls: dict[str, str], mode: str = "full"
    ) -> WorkerRun:
        argv = [*self.resident, WORKER, "migrate", "--entity", entity, "--sistema", sistema, "--usuario", "bench",
                "--run-id", run_id, "--mode", mode]  # fmt: skip
        if self.batch_size is not None:
            argv += ["--batch-size", str(self.batch_size)]
        secrets = json.dumps(urls).encode()
        with timed_step(urls["target_db_url"]) as cpu:
            started = time.monotonic()  # from the SSH connection on, to its close
            _, lines, status, way = self._over_ssh(argv, secrets, 7200)
            wall = time.monotonic() - started
        out = [line for stream, line in lines if stream == "stdout"]
        errors = [line for stream, line in lines if stream == "stderr"]
        if status != 0 or not out:
            raise RuntimeError(f"{label} {entity} failed ({status}): {errors[-1:]}")
        result = json.loads(out[-1])
        run = WorkerRun(entity, result, wall, cpu | {"client": float(result["worker_cpu_s"])})
        r = run.result
        say(
            f"{label:<22} {entity:<11} {r['rows_read']:>9} {r['duration_s']:>8.1f} {r['rows_per_s']:>8.0f} "
            f"{r['worker_peak_rss_mb']:>12.1f}   wall {wall:6.1f} s = {run.rows_per_s:>7.0f} rows/s {way:<7} "
            f"ins {r['inserted']} upd {r['updated']} unch {r['unchanged']} del {r['deleted']} q {r['quarantined']}"
        )
        return run

    def round_trip(self, rounds: int = 5) -> tuple[float, float]:
        """The median seconds of connecting and of running ``true`` over SSH, as every run above does before
        and around the worker: what each worker's wall time carries that the floor's and Sling's do not
        (sshd runs the command through the user's login shell, with whatever that shell's start-up does)."""
        connects, commands = [], []
        for _ in range(rounds):
            started = time.monotonic()
            connect, _, status, _ = self._over_ssh(["true"], b"", 60)
            if status != 0:
                raise RuntimeError("`true` over SSH failed")
            connects.append(connect)
            commands.append(time.monotonic() - started - connect)
        return statistics.median(connects), statistics.median(commands)

    def _over_ssh(
        self, argv: list[str], stdin: bytes, timeout: float
    ) -> tuple[float, list[tuple[Stream, str]], int, str]:
        """Connect, run ``argv`` with ``stdin``, read its output lines to the end and close: the seconds the
        connection took, the (stream, line) pairs, the exit status and the way it went (through the login
        shell, or a resident worker's channel: resources/resident.py)."""
        started = time.monotonic()
        with self.ssh.connect() as client:
            connected = time.monotonic()
            process = self.ssh.start(client, argv, stdin)
            lines = list(process.lines(time.monotonic() + timeout))
            status = process.wait()
        return connected - started, lines, status, "channel" if isinstance(process, ChannelProcess) else "shell"


# --- the data --------------------------------------------------------------------------------


def sql(engine: Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


def count(engine: Engine, statement: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text(statement), params) or 0)


def build_main(engine: Engine, patients: int, encounters: int) -> None:
    """``patients`` patients; the generator takes whole encounters per patient, so it makes
    ceil(encounters/patients) on average and the table is cut back to ``encounters`` rows."""
    per_patient = max(0, math.ceil(encounters / patients)) if patients else 0
    generate(engine, patients_per_sistema=patients, encounters_per_patient=per_patient,
             sistemas=(SISTEMA,), chunk_size=10_000)  # fmt: skip
    sql(engine, f"DELETE FROM atenciones WHERE id > {int(encounters)}")


def copy_legacy(source_db: str, engine: Engine, *, patients_only: bool = False) -> None:
    """Fresh legacy tables in ``engine``'s database, filled from database ``source_db`` (same server)."""
    schema.legacy_metadata.drop_all(engine)
    schema.legacy_metadata.create_all(engine)
    tables = ("sistemas", "profesionales", "pacientes") + (() if patients_only else ("atenciones",))
    sql(engine, *(f"INSERT INTO {t} SELECT * FROM {source_db}.{t}" for t in tables))


def widen(engine: Engine) -> None:
    """The wide data set: every §6 problem the generator planted is repaired, then 3 % of the rows
    are made bad again, one reason per residue of ``id mod 100``; notes become 50–400 characters."""
    good_patient = "p.eliminado = 0 AND MOD(p.id, 100) > 2"
    valid_icd10 = r"'^[A-Z][0-9]{2}(\\.?[0-9A-Z]{1,4})?$'"
    sql(
        engine,
        # patients: unique documents, a name, a birth date that is valid or absent
        "UPDATE pacientes SET documento = CONCAT(COALESCE(documento, ''), 'W', id)",
        "UPDATE pacientes SET nombres = 'Ana' WHERE TRIM(COALESCE(nombres, '')) = ''",
        "UPDATE pacientes SET fecha_nacimiento = NULL WHERE NOT ("
        " fecha_nacimiento IS NULL OR fecha_nacimiento IN ('', '0000-00-00')"
        " OR (fecha_nacimiento REGEXP '^(19[3-9][0-9]|20[01][0-9])-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])$')"
        " OR (fecha_nacimiento REGEXP '^(0[1-9]|1[0-9]|2[0-8])/(0[1-9]|1[0-2])/(19[3-9][0-9]|20[01][0-9])$'))",
        # 3 % bad patients
        "UPDATE pacientes SET documento = NULL WHERE MOD(id, 100) = 0",
        "UPDATE pacientes SET fecha_nacimiento = 'ayer' WHERE MOD(id, 100) = 1",
        "UPDATE pacientes SET nombres = NULL, apellidos = NULL WHERE MOD(id, 100) = 2",
        # encounters: a date, a valid code, a migrated patient
        "UPDATE atenciones SET fecha = '2025-06-01 10:00:00' WHERE fecha IS NULL OR fecha < '1900-01-01'",
        "UPDATE atenciones SET diagnostico = 'J45.9' WHERE TRIM(COALESCE(diagnostico, '')) <> ''"
        f" AND UPPER(REPLACE(diagnostico, ' ', '')) NOT REGEXP BINARY {valid_icd10}",
        f"UPDATE atenciones a LEFT JOIN pacientes p ON p.id = a.paciente_id AND {good_patient}"
        f" SET a.paciente_id = (SELECT MIN(id) FROM pacientes p WHERE {good_patient}) WHERE p.id IS NULL",
        # 3 % bad encounters
        "UPDATE atenciones SET fecha = NULL WHERE MOD(id, 100) = 0",
        "UPDATE atenciones SET diagnostico = 'JJ45' WHERE MOD(id, 100) = 1",
        "UPDATE atenciones SET paciente_id = NULL WHERE MOD(id, 100) = 2",
        # notes of 50–400 characters, varied, with the old note (newlines, emoji) at their start
        "UPDATE atenciones SET notas = LEFT(REPEAT(CONCAT(COALESCE(notas, ''),"
        " ' Paciente refiere dolor abdominal; se indica control, hidratación y analgesia. '), 12),"
        " 50 + MOD(id * 7919, 351))",
    )


def build_rss(source_db: str, engine: Engine, sizes: list[int], source_patients: int) -> dict[int, str]:
    """One sistema of patients per size, copied (ids shifted, documents suffixed per copy so each
    copy keeps its own duplicates) from the main data set. Returns size → sistema."""
    schema.legacy_metadata.drop_all(engine)
    schema.legacy_metadata.create_all(engine)
    names = [c.name for c in schema.pacientes.columns]
    picked = ", ".join(names)
    offset = 0
    sistemas = {}
    for size in sizes:
        sistema = f"RSS{size}"[:16]
        sistemas[size] = sistema
        for copy in range(math.ceil(size / source_patients)):
            take = min(source_patients, size - copy * source_patients)
            values = ", ".join(
                f"id + {offset}" if n == "id" else f"'{sistema}'" if n == "sistema"
                else f"CONCAT(documento, 'K{copy}')" if n == "documento" else n
                for n in names
            )  # fmt: skip
            sql(engine, f"INSERT INTO pacientes ({picked}) SELECT {values} FROM {source_db}.pacientes "
                        f"WHERE sistema = '{SISTEMA}' ORDER BY id LIMIT {take}")  # fmt: skip
            offset = count(engine, "SELECT COALESCE(MAX(id), 0) FROM pacientes")
    return sistemas


def change_one_percent(engine: Engine, round_: int = 0) -> dict[str, int]:
    """1 % of each table's rows (``id mod 100 = 37 + round_``) get new data and ``actualizado_en = NOW()``.
    The rows of the round before are first put back before every watermark (``actualizado_en`` of
    2001), so each round's incremental run finds its own 1 % alone (its watermark is ``>=``: the round
    before's rows would be read again)."""
    residue = 37 + round_
    changed = {}
    for entity, column in (("patients", "nombres"), ("encounters", "notas")):
        table = TABLES[entity]
        with engine.begin() as conn:
            if round_:
                conn.execute(
                    text(f"UPDATE {table} SET actualizado_en = '2001-01-01' WHERE sistema = :s AND MOD(id, 100) = :r"),
                    {"s": SISTEMA, "r": residue - 1},
                )
            done = conn.execute(
                text(
                    f"UPDATE {table} SET {column} = CONCAT(COALESCE({column}, ''), ' (revisado)'),"
                    f" actualizado_en = NOW() WHERE sistema = :s AND MOD(id, 100) = :r"
                ),
                {"s": SISTEMA, "r": residue},
            )
            changed[entity] = done.rowcount
    return changed


# --- the table -------------------------------------------------------------------------------


@dataclass
class Line:
    dataset: str
    path: str
    entity: str
    rows: int
    seconds: float
    own_rate: float | None = None  # the worker's own rows/s
    target: str = ""
    met: bool | None = None
    note: str = ""
    compare: bool = True  # print its ratios to the floor and Sling
    cpu: dict[str, float] | None = None  # CPU seconds: client, PostgreSQL, MariaDB (timed_step)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)
    rss: list[tuple[str, int, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, line: Line) -> Line:
        self.lines.append(line)
        return line

    def reference(self, dataset: str, path: str, entity: str) -> float | None:
        for line in self.lines:
            if (line.dataset, line.path, line.entity) == (dataset, path, entity) and line.rate > 0:
                return line.rate
        return None

    def markdown(self) -> str:
        out = [
            "| data set | path | entity | rows | seconds | rows/s (wall) | worker's own rows/s "
            "| × floor | × Sling | target | met | notes |",
            "|---|---|---|--:|--:|--:|--:|--:|--:|---|---|---|",
        ]
        for line in self.lines:
            floor = self.reference(line.dataset, "floor", line.entity)
            peer = self.reference(line.dataset, "Sling", line.entity)
            vs_floor = f"{line.rate / floor:.2f}" if floor and line.compare and line.path != "floor" else "—"
            vs_peer = f"{line.rate / peer:.2f}" if peer and line.compare and line.path != "Sling" else "—"
            met = "" if line.met is None else ("yes" if line.met else "**no**")
            own = f"{line.own_rate:,.0f}" if line.own_rate is not None else ""
            out.append(
                f"| {line.dataset} | {line.path} | {line.entity} | {line.rows:,} | {line.seconds:.1f} "
                f"| {line.rate:,.0f} | {own} | {vs_floor} | {vs_peer} "
                f"| {line.target} | {met} | {line.note} |"
            )
        spent = [line for line in self.lines if line.cpu]
        if spent:
            cores = os.cpu_count() or 1
            out += [
                "",
                "| CPU seconds | entity | wall s | client (worker, Sling, mariadb + psql) | PostgreSQL | MariaDB "
                f"| cores busy of {cores} |",
                "|---|---|--:|--:|--:|--:|--:|",
            ]
            for line in spent:
                cpu = line.cpu or {}
                busy = sum(cpu.values()) / line.seconds if line.seconds > 0 else 0.0
                out.append(
                    f"| {line.dataset} {line.path} | {line.entity} | {line.seconds:.1f} | {cpu['client']:.1f} "
                    f"| {cpu['PostgreSQL']:.1f} | {cpu['MariaDB']:.1f} | {busy:.2f} |"
                )
        if self.rss:
            out += ["", "| worker peak RSS | rows (patients) | MB |", "|---|--:|--:|"]
            out += [f"| {label} | {rows:,} | {mb:.1f} |" for label, rows, mb in self.rss]
        if self.notes:
            out += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(out)


# --- the run ---------------------------------------------------------------------------------


def ledger_rows(target: Engine, run_id: str, entity: str) -> int:
    """Ledger rows written by one run of one entity."""
    statement = "SELECT count(*) FROM migration.ledger WHERE run_id = :r AND entity = :e"
    return count(target, statement, r=run_id, e=entity)


def measure_peers(
    report: Report, dataset: str, legacy_url: str, target: Engine, sling_bin: Path | None, entities: tuple[str, ...]
) -> None:
    url = target.url.render_as_string(hide_password=False)
    measures: list[tuple[str, Callable[[str], peers.Timed]]] = [
        ("floor", lambda entity: peers.floor(legacy_url, target, entity, SISTEMA))
    ]
    if sling_bin is not None:
        measures.append(("Sling", lambda entity: peers.sling(sling_bin, legacy_url, target, entity, SISTEMA)))
    for path, measure in measures:
        for entity in entities:
            with timed_step(url) as cpu:
                timed = measure(entity)
            say(f"{dataset:<8} {path:<6} {entity:<11} {timed.rows:>9} {timed.seconds:>8.1f} {timed.rows_per_s:>8.0f}")
            report.add(Line(dataset, path, entity, timed.rows, timed.seconds, cpu=cpu))


def first_runs(
    report: Report, worker: Worker, dataset: str, urls: dict[str, str], run_id: str, target_rate: Callable[[str], int]
) -> dict[str, WorkerRun]:
    runs = {}
    for entity in ENTITIES:
        run = worker.run(f"{dataset} first full", entity, SISTEMA, run_id, urls)
        runs[entity] = run
        goal = target_rate(entity)
        bad = int(run.result["quarantined"]) / run.rows if run.rows else 0.0
        report.add(
            Line(
                dataset,
                "this project, first full run",
                entity,
                run.rows,
                run.wall,
                own_rate=float(run.result["rows_per_s"]),
                target=f"≥ {goal:,} rows/s",
                met=run.rows_per_s >= goal,
                note=f"{bad:.1%} quarantined; peak RSS {run.result['worker_peak_rss_mb']:.0f} MB",
                cpu=run.cpu,
            )
        )
    return runs


def attempt(report: Report, section: str, step: Callable[[], None]) -> bool:
    """Run one section; a failure (e.g. a database restarted by someone else) is reported in the
    table's notes and the other sections still run."""
    try:
        step()
        return True
    except Exception as problem:  # any failure of a section is reported, not raised
        first = str(problem).strip().splitlines()[0][:400] if str(problem).strip() else type(problem).__name__
        say(f"{section} FAILED: {first}")
        report.notes.append(f"**{section} failed**: {first}")
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=500_000)
    parser.add_argument("--encounters-per-patient", type=float, default=1.5)
    parser.add_argument("--encounters", type=int, help="encounters in all (default: patients × per patient)")
    parser.add_argument("--batch-size", type=int, help="rows per transaction (default: sized by memory)")
    parser.add_argument("--rss-sizes", default="100000,2000000", help="patient counts for the RSS runs ('' none)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"which of {','.join(SECTIONS)} to run (default: all)"
    )
    parser.add_argument("--no-wide", action="store_true", help="skip the wide-rows data set")
    parser.add_argument("--no-sling", action="store_true", help="skip the peer")
    parser.add_argument("--keep", action="store_true", help="keep the databases afterwards")
    parser.add_argument(
        "--resident",
        type=int,
        default=600,
        help="the worker's resident seconds (worker/resident.py; the first worker run starts it); 0: none",
    )
    parser.add_argument(
        "--incremental-rounds", type=int, default=3, help="incremental runs, each after a new 1 %% changed (median)"
    )
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if unknown := sections - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}")
    if not 1 <= args.incremental_rounds <= 30:
        parser.error("--incremental-rounds must be from 1 to 30 (each run changes its own residue of id mod 100)")
    if args.no_wide:
        sections.discard("wide")
    rss_sizes = sorted(int(s) for s in args.rss_sizes.split(",") if s.strip()) if "rss" in sections else []
    main_wanted = "main" in sections
    encounters = args.encounters if args.encounters is not None else round(args.patients * args.encounters_per_patient)
    if not (main_wanted or "wide" in sections):
        encounters = 0  # the RSS runs are patients only
    bench_started = time.monotonic()
    load_at_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    report = Report()
    sling_bin = None if args.no_sling or not (sections & {"main", "wide"}) else peers.sling_binary(say)
    if sling_bin is not None:
        report.notes.append(f"Sling {peers.sling_version(sling_bin)} (sling-linux-amd64 wheel, own venv)")
    report.notes.append("every timed step (floor, Sling, each worker run) starts after a CHECKPOINT of the target")
    cached = pagecache.drop(pagecache.libraries())
    report.notes.append(
        f"the worker's {cached.files} shared libraries were dropped from the page cache before the runs "
        f"({cached.before / 2**20:.0f} MB of them were cached, {cached.after / 2**20:.0f} MB stayed: mapped by "
        "running processes), so that the worker's RSS counts their pages as a host that read them from disk "
        "maps them, not as the install wrote them (bench/pagecache.py)"
    )

    tag = uuid.uuid4().hex[:8]
    try:
        with (
            throwaway_database(MARIADB_ADMIN, "bench_legacy", keep=args.keep) as legacy_url,
            throwaway_database(POSTGRES_ADMIN, "bench_clinical", keep=args.keep) as target_url,
            throwaway_database(MARIADB_ADMIN, "bench_wide", keep=args.keep) as wide_legacy_url,
            throwaway_database(POSTGRES_ADMIN, "bench_wide", keep=args.keep) as wide_target_url,
            throwaway_database(MARIADB_ADMIN, "bench_rss", keep=args.keep) as rss_legacy_url,
            throwaway_database(POSTGRES_ADMIN, "bench_rss", keep=args.keep) as rss_target_url,
        ):
            legacy, target = schema.make_engine(legacy_url), schema.make_engine(target_url)
            wide_legacy = schema.make_engine(wide_legacy_url)
            started = time.monotonic()
            build_main(legacy, args.patients, encounters)
            sizes = {e: count(legacy, f"SELECT count(*) FROM {TABLES[e]}") for e in ENTITIES}
            say(f"generated {sizes['patients']} patients and {sizes['encounters']} encounters in MariaDB "
                f"in {time.monotonic() - started:.1f} s")  # fmt: skip
            main_db = str(make_url(legacy_url).database)
            if "wide" in sections:
                started = time.monotonic()
                copy_legacy(main_db, wide_legacy)
                widen(wide_legacy)
                say(f"built the wide data set in {time.monotonic() - started:.1f} s")
            rss_sistemas: dict[int, str] = {}
            if rss_sizes:
                started = time.monotonic()
                rss_sistemas = build_rss(main_db, schema.make_engine(rss_legacy_url), rss_sizes, sizes["patients"])
                say(f"built the RSS data sets {rss_sistemas} in {time.monotonic() - started:.1f} s")

            with tempfile.TemporaryDirectory() as home, running_sshd(Path(home)) as server:
                resident = []
                if args.resident:
                    resident = ["env", f"{RESIDENT_ENV}={args.resident}", f"{RESIDENT_DIR_ENV}={home}/resident"]
                    report.notes.append(
                        f"every worker command ran through a resident worker ({RESIDENT_ENV}={args.resident}): the "
                        "first one (the first full run of patients) started it and waited for its imports, through "
                        "the login shell; the others reached it through its SSH channel, with no shell (each run's "
                        "line above says which way it went)"
                    )
                worker = Worker(SSHResource(**server.resource_kwargs()), args.batch_size, resident)
                alone = Worker(SSHResource(**server.resource_kwargs()), args.batch_size)
                connect, command = worker.round_trip()
                say(f"SSH round trip: connect {connect:.3f} s, `true` {command:.3f} s (median of 5)")
                report.notes.append(
                    f"every worker wall time includes SSH: connecting took {connect:.2f} s and running `true` "
                    f"{command:.2f} s here (median of 5; sshd runs a command through the user's login shell; a "
                    "resident worker's channel skips it)"
                )
                say(f"{'run':<22} {'entity':<11} {'rows':>9} {'seconds':>8} {'rows/s':>8} {'peak RSS MB':>12}")
                urls = {"legacy_db_url": legacy_url, "target_db_url": target_url}
                full: dict[str, WorkerRun] = {}

                def peers_and_first_run() -> None:  # 1-3: floor, peer, first full run — the same rows
                    measure_peers(report, "main", legacy_url, target, sling_bin, ENTITIES)
                    full.update(
                        first_runs(report, worker, "main", urls, f"bench-{tag}-full", FIRST_RUN_TARGET.__getitem__)
                    )

                def unchanged_rerun() -> None:  # 4: same parameters, a new run id
                    rerun_id = f"bench-{tag}-rerun"
                    for entity in ENTITIES:
                        run = worker.run("main unchanged re-run", entity, SISTEMA, rerun_id, urls)
                        written = ledger_rows(target, rerun_id, entity)
                        report.add(
                            Line("main", "this project, unchanged re-run", entity, run.rows, run.wall,
                                 own_rate=float(run.result["rows_per_s"]),
                                 target=f"≥ {UNCHANGED_TARGET:,} rows/s, 0 ledger rows",
                                 met=run.rows_per_s >= UNCHANGED_TARGET and written == 0,
                                 note=f"{written} ledger rows written; {run.result['unchanged']} unchanged",
                                 cpu=run.cpu)
                        )  # fmt: skip

                def incremental() -> None:  # 5: 1 % of the rows changed, a new 1 % each round
                    # Through a resident worker, then also with each command in its own process (alternating
                    # which goes first each round), so both stand beside the same full runs.
                    kinds = [("", worker)]
                    if resident:
                        kinds.append((" (each command in its own process)", alone))
                    runs: dict[tuple[str, str], list[tuple[WorkerRun, int, str]]] = {
                        (kind, entity): [] for kind, _ in kinds for entity in ENTITIES
                    }
                    changes = 0  # each measured run finds a 1 % of its own (change_one_percent's residues)
                    for round_ in range(args.incremental_rounds):
                        for kind, runner in kinds if round_ % 2 == 0 else kinds[::-1]:
                            changed = change_one_percent(legacy, changes)
                            say(f"round {round_ + 1}{kind}: changed 1 % of the legacy rows: {changed}")
                            time.sleep(1.0)  # NOW() of the next round's changes is a later second
                            incremental_id = f"bench-{tag}-incr{changes}"
                            changes += 1
                            for entity in ENTITIES:
                                label = "main incremental 1 %"
                                run = runner.run(label, entity, SISTEMA, incremental_id, urls, "incremental")
                                runs[(kind, entity)].append((run, changed[entity], incremental_id))
                    for (kind, entity), done_runs in runs.items():
                        rounds = sorted(done_runs, key=lambda done: done[0].wall)
                        run, changed_rows, incremental_id = rounds[len(rounds) // 2]  # the median by wall time
                        written = ledger_rows(target, incremental_id, entity)
                        speedup = full[entity].wall / run.wall if run.wall > 0 else 0.0
                        own_full = float(full[entity].result["duration_s"])
                        own_incremental = float(run.result["duration_s"])
                        own_speedup = own_full / own_incremental if own_incremental > 0 else 0.0
                        walls = ", ".join(f"{done.wall:.2f}" for done, _, _ in done_runs)
                        report.add(
                            Line("main", f"this project, incremental 1 %{kind}", entity, run.rows, run.wall,
                                 own_rate=float(run.result["rows_per_s"]),
                                 target=f"≥ {INCREMENTAL_SPEEDUP:.0f}× faster than full",
                                 met=speedup >= INCREMENTAL_SPEEDUP, compare=False, cpu=run.cpu,
                                 note=f"the median of {len(rounds)} rounds (walls {walls} s): "
                                      f"{speedup:.1f}× faster than the first full run ({full[entity].wall:.1f} s); "
                                      f"by the worker's own timing {own_speedup:.1f}× "
                                      f"({own_full:.1f} s → {own_incremental:.1f} s); "
                                      f"{changed_rows} rows changed, mode {run.result['mode']}, "
                                      f"{run.result['updated']} updated, {written} ledger rows")
                        )  # fmt: skip

                def wide() -> None:  # 6: wide rows, against their own floor and Sling
                    wide_target = schema.make_engine(wide_target_url)
                    measure_peers(report, "wide", wide_legacy_url, wide_target, sling_bin, ENTITIES)
                    wide_urls = {"legacy_db_url": wide_legacy_url, "target_db_url": wide_target_url}
                    first_runs(report, worker, "wide", wide_urls, f"bench-{tag}-wide", lambda _: WIDE_TARGET)
                    avg = count(wide_legacy, "SELECT ROUND(AVG(CHAR_LENGTH(notas))) FROM atenciones")
                    report.notes.append(
                        f"wide: notes of 50–400 characters (average {avg}); 3 % of rows made bad by id mod 100 "
                        "(the rest repaired); its target is 4× the ~8k rows/s measured before issue 7"
                    )

                def rss() -> None:  # 7: peak RSS, patients only, per size: a first run, then an unchanged re-run
                    rss_urls = {"legacy_db_url": rss_legacy_url, "target_db_url": rss_target_url}
                    for size, sistema in rss_sistemas.items():
                        for label, run_id in (("first full run", "rss"), ("unchanged re-run", "rss-again")):
                            name = f"RSS {size} {label.split()[0]}"
                            run = worker.run(name, "patients", sistema, f"bench-{tag}-{run_id}{size}", rss_urls)
                            mb = float(run.result["worker_peak_rss_mb"])
                            report.rss.append((f"{label}, {sistema}", run.rows, mb))

                if main_wanted and attempt(report, "floor, Sling and first full run", peers_and_first_run):
                    attempt(report, "unchanged re-run", unchanged_rerun)
                    attempt(report, "incremental run", incremental)
                if "wide" in sections:
                    attempt(report, "wide rows", wide)
                if rss_sistemas:
                    attempt(report, "RSS runs", rss)
                report.rss += [
                    (f"main first full run, {e}", r.rows, float(r.result["worker_peak_rss_mb"]))
                    for e, r in full.items()
                ]
                ok = all(mb < RSS_LIMIT_MB for _, _, mb in report.rss)
                for kind in ("first full run", "unchanged re-run"):
                    measured = [mb for label, _, mb in report.rss if label.startswith(kind)]
                    if len(measured) >= 2:
                        low, high = measured[0], measured[-1]
                        report.notes.append(
                            f"peak RSS, {kind}: < {RSS_LIMIT_MB:.0f} MB {'met' if ok else '**not met**'}; "
                            f"{min(rss_sizes):,} → {max(rss_sizes):,} patients: {low:.1f} → {high:.1f} MB "
                            f"({high / low:.2f}×): {'flat' if high <= low * RSS_FLAT else '**not flat**'} "
                            f"(flat: ≤ {RSS_FLAT}×)"
                        )
    finally:
        report.notes.append(
            "rows/s are wall clock: floor and Sling as whole processes, the worker from SSH connect to exit; "
            "floor/Sling rows are every row of the sistema, the worker's rows those it read (eliminado = 0)"
        )
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        report.notes.append(
            f"benchmark wall time {time.monotonic() - bench_started:.0f} s on {os.cpu_count()} cores; "
            f"load average at start {load_at_start}, at the end {load} (other processes share the machine)"
        )
        say("")
        say(report.markdown())


if __name__ == "__main__":
    main()
