"""Run parameters and their validation (DESIGN §8), shared by the worker and the Dagster side.

Both sides refuse bad parameters before anything connects: the Dagster asset before it opens
an SSH session, the worker before it opens a database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from worker.rules import PractitionerMapping

SISTEMA_PATTERN = re.compile(r"^[A-Z0-9_]{2,16}$")
USUARIO_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
ENTITIES = ("patients", "encounters")
MODES = ("full", "incremental")


class InvalidParameters(ValueError):
    """Parameters that must not start a run; the message lists every problem found."""


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
    batch_size: int = 2000

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
            "--batch-size", str(self.batch_size),
        ]  # fmt: skip
        if self.mapping is not None:
            argv += ["--pract-source", str(self.pract_source), "--pract-target", str(self.pract_target)]
        if self.dry_run:
            argv.append("--dry-run")
        return argv


def validate(params: RunParameters) -> RunParameters:
    """Return ``params`` unchanged if every §8 rule holds, else raise with all the problems."""
    problems: list[str] = []
    if params.entity not in ENTITIES:
        problems.append(f"entity must be one of {', '.join(ENTITIES)}")
    if not isinstance(params.sistema, str) or not SISTEMA_PATTERN.match(params.sistema):
        problems.append("sistema must match ^[A-Z0-9_]{2,16}$")
    if not isinstance(params.usuario, str) or not USUARIO_PATTERN.match(params.usuario):
        problems.append("usuario must match ^[A-Za-z0-9._@-]{1,64}$")
    if not isinstance(params.run_id, str) or not RUN_ID_PATTERN.match(params.run_id):
        problems.append("run_id must match ^[A-Za-z0-9_.:-]{1,64}$")
    if params.mode not in MODES:
        problems.append(f"mode must be one of {', '.join(MODES)}")
    if (params.pract_source is None) != (params.pract_target is None):
        problems.append("pract_source and pract_target go together: give both or neither")
    for name in ("pract_source", "pract_target"):
        value = getattr(params, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            problems.append(f"{name} must be a positive integer")
    if (
        isinstance(params.batch_size, bool)
        or not isinstance(params.batch_size, int)
        or not 1 <= params.batch_size <= 50_000
    ):
        problems.append("batch_size must be an integer from 1 to 50000")
    if problems:
        raise InvalidParameters("; ".join(problems))
    return params
