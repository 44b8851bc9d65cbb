"""``clinic-migrate``: the worker's command line, run on the legacy host.

Parameters arrive as argv; secrets (database URLs) and the Dagster Pipes bootstrap arrive as one
JSON object on stdin, so no password ever shows in ``ps`` or a shell history. Results go back as
Pipes messages on stdout; everything else it prints is redacted first. ``verify`` compares one
partition's source, target and quarantine (worker/verify_clinical.py) and reports the ``coverage``
and ``integrity`` checks as asset-check results (one JSON line each when run by hand). ``health`` prints
one JSON line: this worker's version and whether each database answers a ``SELECT 1`` from this host.

Exit codes: 0 done (``health``: whenever it could report, whatever it found), 2 bad parameters or a refused
run (e.g. a mass delete), 3 a database could not be reached or the lock's session was lost, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from dagster_pipes import PipesContext, PipesMappingParamsLoader, open_dagster_pipes
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import NullPool

from worker import schema
from worker.counts import count_clinical_partition, count_eligible
from worker.engine import Counts, Migration
from worker.failures import CONNECTION_ERROR, SCRIPT_ERROR, VALIDATION_ERROR, category_of, failure_line
from worker.params import (
    DEFAULT_MAX_DELETE_SHARE,
    ENTITIES,
    MODES,
    InvalidParameters,
    RunParameters,
    sistema_problem,
    validate,
)
from worker.redact import redact
from worker.rollback import add_parser as add_rollback_parser
from worker.rollback import run_cli as run_rollback
from worker.verify import CHECKS, DEFAULT_MIN_COVERAGE, Outcome

DISTRIBUTION = "migration-platform"  # this project's name in pyproject.toml
HEALTH_DATABASES = {"legacy_db": "legacy_db_url", "target_db": "target_db_url", "state_db": "state_db_url"}
EXIT_OK, EXIT_FAILED, EXIT_BAD_PARAMETERS, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_CODES = {SCRIPT_ERROR: EXIT_FAILED, VALIDATION_ERROR: EXIT_BAD_PARAMETERS, CONNECTION_ERROR: EXIT_UNREACHABLE}


class Reporter:
    """Talks to Dagster through Pipes when run by Dagster, to stderr/stdout when run by hand."""

    def __init__(self, pipes: PipesContext | None) -> None:
        self.pipes = pipes

    def log(self, message: str) -> None:
        if self.pipes is not None:
            self.pipes.log.info(redact(message))
        else:
            print(redact(message), file=sys.stderr, flush=True)

    def progress(self, counts: Counts) -> None:
        if self.pipes is not None:
            self.pipes.report_custom_message({"progress": counts.as_dict()})
        else:
            print(json.dumps({"progress": counts.as_dict()}), file=sys.stderr, flush=True)

    def materialization(self, metadata: dict[str, Any]) -> None:
        if self.pipes is not None:
            self.pipes.report_asset_materialization(metadata=metadata)
        else:
            print(json.dumps(metadata, sort_keys=True), flush=True)

    def check(self, entity: str, outcome: Outcome) -> None:
        """One asset-check result (``entity``'s asset): through Pipes, or one JSON line on stdout."""
        if self.pipes is not None:
            self.pipes.report_asset_check(
                check_name=outcome.check,
                passed=outcome.passed,
                severity=outcome.severity,  # type: ignore[arg-type]  # ERROR or WARN
                metadata=pipes_metadata(outcome.metadata),
                asset_key=entity,
            )
        else:
            line = {"check": outcome.check, "passed": outcome.passed, "severity": outcome.severity}
            print(json.dumps({**line, "metadata": outcome.metadata}, sort_keys=True), flush=True)


def pipes_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Check metadata for Pipes: lists and maps as JSON metadata values (Dagster infers the rest)."""
    return {
        key: {"raw_value": value, "type": "json"} if isinstance(value, (list, dict)) else value
        for key, value in metadata.items()
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clinic-migrate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate", help="migrate one entity of one sistema")
    migrate.add_argument("--entity", required=True, choices=ENTITIES)
    migrate.add_argument("--sistema", required=True)
    migrate.add_argument("--usuario", required=True)
    migrate.add_argument("--run-id", required=True)
    migrate.add_argument("--mode", default="full", choices=MODES)
    migrate.add_argument("--dry-run", action="store_true")
    migrate.add_argument("--pract-source", type=int)
    migrate.add_argument("--pract-target", type=int)
    migrate.add_argument(
        "--batch-size", type=int, default=None, help="rows per transaction (default: pages sized by memory)"
    )
    migrate.add_argument("--allow-mass-delete", action="store_true", help="let a full run delete any share")
    migrate.add_argument("--max-delete-share", type=float, default=DEFAULT_MAX_DELETE_SHARE)
    verify = commands.add_parser("verify", help="the coverage and integrity checks of one entity of one sistema")
    verify.add_argument("--entity", required=True, choices=ENTITIES)
    verify.add_argument("--sistema", required=True)
    verify.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of {', '.join(CHECKS)}")
    verify.add_argument("--min-coverage", type=float, default=DEFAULT_MIN_COVERAGE)
    commands.add_parser("sistemas", help="print the codes of the active sistemas as JSON")
    health = commands.add_parser("health", help="print this worker's version and whether each database answers")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to connect to each database")
    add_rollback_parser(commands)
    return parser


def _migrate(args: argparse.Namespace, secrets: dict[str, Any], reporter: Reporter) -> int:
    params = validate(
        RunParameters(
            entity=args.entity,
            sistema=args.sistema,
            usuario=args.usuario,
            run_id=args.run_id,
            mode=args.mode,
            dry_run=args.dry_run,
            pract_source=args.pract_source,
            pract_target=args.pract_target,
            batch_size=args.batch_size,
            allow_mass_delete=args.allow_mass_delete,
            max_delete_share=args.max_delete_share,
        )
    )
    _require(secrets, "legacy_db_url", "target_db_url")
    target = schema.make_engine(secrets["target_db_url"])
    state = schema.state_engine(secrets, target)
    legacy = schema.make_engine(secrets["legacy_db_url"])
    migration = Migration(params, legacy, target, state, log=reporter.log, progress=reporter.progress)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eligible") as beside:
        # The partition's counts for the asset page's plots (none for a dry run): E counted beside the
        # run, from its start (the legacy as the run's watermark saw it; the count took 0.1–0.2 s of
        # an incremental run of 1–2 s) — by the run itself when it reads the source's ids anyway
        # (Migration.counts_eligible) — M and Q once the run is done.
        counting = None
        if not (params.dry_run or migration.counts_eligible):
            counting = beside.submit(count_eligible, params.entity, params.sistema, legacy)
        result = migration.run()
    metadata = result.metadata(params.entity, {"sistema": params.sistema}, params.dry_run)
    if not params.dry_run:
        eligible = migration.eligible if counting is None else counting.result
        metadata |= count_clinical_partition(params.entity, params.sistema, eligible, target, state).metadata()
    # What the run cost the legacy host's CPU (every thread of the worker, user and system).
    used = resource.getrusage(resource.RUSAGE_SELF)
    metadata["worker_cpu_s"] = round(used.ru_utime + used.ru_stime, 2)
    reporter.materialization(metadata)
    return EXIT_OK


def verify_checks(args: argparse.Namespace) -> list[str]:
    """The checks ``verify`` is asked for, after §8 validation of its parameters (every problem at once)."""
    problems = [p for p in (sistema_problem(args.sistema),) if p]
    checks = [c.strip() for c in str(args.checks).split(",") if c.strip()]
    if not checks or any(c not in CHECKS for c in checks) or len(set(checks)) != len(checks):
        problems.append(f"checks must be a comma-separated list of distinct checks of {', '.join(CHECKS)}")
    if not 0 <= args.min_coverage <= 1:
        problems.append("min_coverage must be a number from 0 to 1")
    if problems:
        raise InvalidParameters("; ".join(problems))
    return checks


def _verify(args: argparse.Namespace, secrets: dict[str, Any], reporter: Reporter) -> int:
    from worker.verify_clinical import migration_settings, verify_partition  # not needed by migrate

    checks = verify_checks(args)
    _require(secrets, "legacy_db_url", "target_db_url")
    target = schema.make_engine(secrets["target_db_url"])
    state = schema.state_engine(secrets, target)
    settings = migration_settings(state, args.entity, args.sistema)
    reporter.log(
        f"verifying {args.entity} of {args.sistema} with the settings of run {settings.run_id}"
        if settings.run_id
        else f"verifying {args.entity} of {args.sistema}: no finished run recorded"
    )
    started = time.monotonic()
    report = verify_partition(
        args.entity, args.sistema, schema.make_engine(secrets["legacy_db_url"]), target, state, settings=settings
    )
    seconds = time.monotonic() - started
    rate = report.eligible / seconds if seconds > 0 else 0.0
    reporter.log(
        f"verified {report.eligible} eligible and {report.stored} stored {args.entity} of {args.sistema} "
        f"in {seconds:.1f} s ({rate:.0f} rows/s)"
    )
    for outcome in report.outcomes(checks, args.min_coverage):
        reporter.check(args.entity, outcome)
    return EXIT_OK


def _require(secrets: dict[str, Any], *keys: str) -> None:
    missing = [key for key in keys if not secrets.get(key)]
    if missing:
        raise InvalidParameters(f"stdin JSON lacks {', '.join(missing)}")


def _sistemas(secrets: dict[str, Any]) -> int:
    _require(secrets, "legacy_db_url")
    s = schema.sistemas
    with schema.make_engine(secrets["legacy_db_url"]).connect() as conn:
        codes = conn.scalars(select(s.c.codigo).where(s.c.activo == 1).order_by(s.c.codigo)).all()
    print(json.dumps({"sistemas": list(codes)}), flush=True)
    return EXIT_OK


def worker_version() -> str:
    """The installed version of this project's distribution (``unknown`` when it is not installed)."""
    import importlib.metadata  # only ``health`` asks (~25 ms of every other command's start-up)

    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _database_category(problem: BaseException) -> str:
    """A failed connection or ``SELECT 1`` as its §8 category: the server refused the credentials, did
    not answer in time, or could not be reached (a closed port, a missing database, a dropped link)."""
    if isinstance(problem, (ArgumentError, NoSuchModuleError, ValueError)):
        return VALIDATION_ERROR
    said = str(getattr(problem, "orig", None) or problem).lower()
    if any(words in said for words in ("password authentication failed", "access denied", "authentication")):
        return "AUTHENTICATION_ERROR"
    if any(words in said for words in ("timeout expired", "timed out", "timeout")):
        return "TIMEOUT_ERROR"
    return CONNECTION_ERROR


def probe_database(url: str, timeout_seconds: float = 5.0) -> dict[str, Any]:
    """Connect to ``url`` (within ``timeout_seconds``) and run ``SELECT 1``. Never raises: returns
    ``{"ok", "error" ("<CATEGORY>: <short redacted message>" or None), "latency_ms"}``. A SQLite file that
    does not exist is an error, not created."""
    started = time.monotonic()
    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        connect_args: dict[str, Any] = {}
        if backend == "postgresql":  # libpq: whole seconds, at least 2
            connect_args["connect_timeout"] = max(2, math.ceil(timeout_seconds))
        elif backend in ("mysql", "mariadb"):
            connect_args |= {"connect_timeout": max(1, math.ceil(timeout_seconds)), "read_timeout": timeout_seconds}
        elif backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
            path = str(parsed.database).removeprefix("file:").split("?", 1)[0]
            if not os.path.isfile(path):
                raise FileNotFoundError("the SQLite database file does not exist")
        engine = schema.make_engine(url, poolclass=NullPool, connect_args=connect_args)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1").scalar()
        finally:
            engine.dispose()
    except Exception as problem:
        category = CONNECTION_ERROR if isinstance(problem, FileNotFoundError) else _database_category(problem)
        if category == VALIDATION_ERROR:
            problem = f"not a usable database URL ({type(problem).__name__})"  # the URL itself is never shown
        return {"ok": False, "error": failure_line(category, problem)[:300], "latency_ms": _elapsed_ms(started)}
    return {"ok": True, "error": None, "latency_ms": _elapsed_ms(started)}


def _elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _health(args: argparse.Namespace, secrets: dict[str, Any]) -> int:
    """One JSON line: the worker's version and each database's ``probe_database`` (checked at once)."""
    if not args.timeout > 0:
        raise InvalidParameters("timeout must be a positive number of seconds")
    report: dict[str, Any] = {"worker_version": worker_version()}
    given = {name: secrets.get(key) for name, key in HEALTH_DATABASES.items()}
    with ThreadPoolExecutor(max_workers=len(given)) as pool:
        probes = {name: pool.submit(probe_database, url, args.timeout) for name, url in given.items() if url}
    for name, key in HEALTH_DATABASES.items():
        missing = {"ok": False, "error": f"{VALIDATION_ERROR}: stdin JSON lacks {key}", "latency_ms": None}
        report[name] = probes[name].result() if name in probes else missing
    print(json.dumps(report), flush=True)
    return EXIT_OK


def _report(category: str, problem: BaseException | str) -> None:
    """One short, redacted line on stderr: the category the Dagster side reads, then what happened."""
    print(failure_line(category, problem), file=sys.stderr, flush=True)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: open transactions roll back, connections close


def main(argv: Sequence[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # one Pipes message per line, now
    signal.signal(signal.SIGTERM, _terminate)
    args = _parser().parse_args(argv)
    try:
        secrets = json.loads(sys.stdin.read() or "{}")
    except json.JSONDecodeError:
        _report("VALIDATION_ERROR", "stdin must be one JSON object with the database URLs")
        return EXIT_BAD_PARAMETERS
    pipes_params = secrets.pop("pipes", None)
    with ExitStack() as stack:
        pipes = (
            stack.enter_context(open_dagster_pipes(params_loader=PipesMappingParamsLoader(pipes_params)))
            if pipes_params
            else None
        )
        reporter = Reporter(pipes)
        try:
            if args.command == "sistemas":
                return _sistemas(secrets)
            if args.command == "health":
                return _health(args, secrets)
            if args.command == "verify":
                return _verify(args, secrets, reporter)
            if args.command == "rollback":  # worker/rollback.py: the plan or the result, one JSON line
                return run_rollback(args, secrets, lambda line: print(json.dumps(line, sort_keys=True), flush=True))
            return _migrate(args, secrets, reporter)
        except Exception as problem:
            category = category_of(problem)
            _report(category, problem)
            return EXIT_CODES[category]
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
