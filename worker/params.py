"""Run parameters and their validation (DESIGN §8), shared by the worker and the Dagster side.

Both sides refuse bad parameters before anything connects: the Dagster asset before it opens
an SSH session, the worker before it opens a database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from worker import app_rules
from worker.rules import PractitionerMapping

# Matched whole, with re.fullmatch: a pattern ending in ``$`` also matches before a final newline,
# which let 'SEC1\n' through as a partition key.
SISTEMA_PATTERN = re.compile(r"[A-Z0-9_]{2,16}")
USUARIO_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
ENTITIES = ("patients", "encounters")
MODES = ("full", "incremental")
DEFAULT_MAX_DELETE_SHARE = 0.10
INT64_MAX = 2**63 - 1


class InvalidParameters(ValueError):
    """Parameters that must not start a run; the message lists every problem found."""


def matches(pattern: re.Pattern[str], value: object) -> bool:
    """``value`` is a string and the whole of it matches ``pattern``."""
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def sistema_problem(value: object) -> str | None:
    """Why ``value`` is not a usable sistema (clinical partition key), or None if it is."""
    return None if matches(SISTEMA_PATTERN, value) else f"sistema must match ^{SISTEMA_PATTERN.pattern}$"


def shard_problem(value: object) -> str | None:
    """Why ``value`` is not an app shard key (``shard-00`` … ``shard-15``, whole), or None if it is."""
    try:
        app_rules.shard_number(value)  # type: ignore[arg-type]
    except ValueError as problem:
        return str(problem)
    return None


def usuario_problem(value: object) -> str | None:
    """Why ``value`` is not a usable usuario, or None if it is."""
    return None if matches(USUARIO_PATTERN, value) else f"usuario must match ^{USUARIO_PATTERN.pattern}$"


@dataclass(frozen=True)
class RunParameters:
    entity: Literal["patients", "encounters"]
    sistema: str
    usuario: str
    run_id: str
    mode: Literal["full", "incremental"] = "full"
    dry_run: bool = False
    pract_source: int | None = None
    pract_target: int | None = None
    batch_size: int | None = None  # rows per transaction; None: pages sized by memory (worker/source.py)
    allow_mass_delete: bool = False
    max_delete_share: float = DEFAULT_MAX_DELETE_SHARE

    @property
    def mapping(self) -> PractitionerMapping | None:
        if self.pract_source is None or self.pract_target is None:
            return None
        return PractitionerMapping(self.pract_source, self.pract_target)

    def worker_argv(self) -> list[str]:
        """The worker's arguments: every value a separate element, quoted later, never pasted."""
        argv = [
            "migrate",
            "--entity", self.entity,
            "--sistema", self.sistema,
            "--usuario", self.usuario,
            "--run-id", self.run_id,
            "--mode", self.mode,
            "--max-delete-share", repr(float(self.max_delete_share)),
        ]  # fmt: skip
        if self.batch_size is not None:
            argv += ["--batch-size", str(self.batch_size)]
        if self.mapping is not None:
            argv += ["--pract-source", str(self.pract_source), "--pract-target", str(self.pract_target)]
        if self.dry_run:
            argv.append("--dry-run")
        if self.allow_mass_delete:
            argv.append("--allow-mass-delete")
        return argv


def common_problems(params: Any, *, batch_size_optional: bool = False) -> list[str]:
    """The §8 problems of what every run has — usuario, run id, mode, batch size, the mass-delete
    settings — whatever it migrates (the clinical worker's and the app's parameters alike).
    ``batch_size_optional``: no batch size (None) is allowed, the run then choosing its pages (the clinical
    worker sizes them by memory, an app run takes its entity's own)."""
    problems = [p for p in (usuario_problem(params.usuario),) if p]
    if not matches(RUN_ID_PATTERN, params.run_id):
        problems.append(f"run_id must match ^{RUN_ID_PATTERN.pattern}$")
    if params.mode not in MODES:
        problems.append(f"mode must be one of {', '.join(MODES)}")
    if not (batch_size_optional and params.batch_size is None) and (
        isinstance(params.batch_size, bool)
        or not isinstance(params.batch_size, int)
        or not 1 <= params.batch_size <= 50_000
    ):
        problems.append("batch_size must be an integer from 1 to 50000")
    if not isinstance(params.allow_mass_delete, bool):
        problems.append("allow_mass_delete must be true or false")
    share = params.max_delete_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        problems.append("max_delete_share must be a number from 0 to 1")
    return problems


def validate(params: RunParameters) -> RunParameters:
    """Return ``params`` unchanged if every §8 rule holds, else raise with all the problems."""
    problems: list[str] = []
    if params.entity not in ENTITIES:
        problems.append(f"entity must be one of {', '.join(ENTITIES)}")
    problems += [p for p in (sistema_problem(params.sistema),) if p]
    problems += common_problems(params, batch_size_optional=True)
    if (params.pract_source is None) != (params.pract_target is None):
        problems.append("pract_source and pract_target go together: give both or neither")
    for name in ("pract_source", "pract_target"):
        value = getattr(params, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= INT64_MAX):
            problems.append(f"{name} must be a positive 64-bit integer")
    if problems:
        raise InvalidParameters("; ".join(problems))
    return params
