"""``clinic-migrate``: the worker's command line, run on the legacy host.

Parameters arrive as argv; secrets (database URLs) and the Dagster Pipes bootstrap arrive as one
JSON object on stdin, so no password ever shows in ``ps`` or a shell history. Results go back as
Pipes messages on stdout; everything else it prints is redacted first.

Exit codes: 0 done, 2 bad parameters or a refused run (e.g. a mass delete), 3 a database could not
be reached or the lock's session was lost, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from dagster_pipes import PipesContext, PipesMappingParamsLoader, open_dagster_pipes
from sqlalchemy import select

from worker import schema
from worker.engine import Counts, Migration
from worker.failures import CONNECTION_ERROR, SCRIPT_ERROR, VALIDATION_ERROR, category_of, failure_line
from worker.params import (
    DEFAULT_MAX_DELETE_SHARE,
    ENTITIES,
    MODES,
    InvalidParameters,
    RunParameters,
    validate,
)
from worker.redact import redact

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
    commands.add_parser("sistemas", help="print the codes of the active sistemas as JSON")
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
    state_url = secrets.get("state_db_url")
    state = schema.make_engine(state_url) if state_url and state_url != secrets["target_db_url"] else None
    migration = Migration(
        params,
        schema.make_engine(secrets["legacy_db_url"]),
        target,
        state,
        log=reporter.log,
        progress=reporter.progress,
    )
    result = migration.run()
    reporter.materialization(result.metadata(params.entity, {"sistema": params.sistema}, params.dry_run))
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
            return _migrate(args, secrets, reporter)
        except Exception as problem:
            category = category_of(problem)
            _report(category, problem)
            return EXIT_CODES[category]
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
