"""Which error category (DESIGN §8) a failure inside a migration belongs to.

One mapping for every engine — the clinical worker reports it on stderr, the in-process app
assets raise it as the step's failure — so the same problem is never two categories.
"""

from __future__ import annotations

from sqlalchemy.exc import InterfaceError, OperationalError

from worker.engine import MassDeleteRefused
from worker.locks import LockLost
from worker.params import InvalidParameters
from worker.redact import redact

VALIDATION_ERROR = "VALIDATION_ERROR"
CONNECTION_ERROR = "CONNECTION_ERROR"
SCRIPT_ERROR = "SCRIPT_ERROR"


def category_of(problem: BaseException) -> str:
    """Bad parameters and a refused mass delete are the caller's to fix (never retried); a lost lock
    or a dropped database connection is worth another attempt; anything else is a script error."""
    if isinstance(problem, (InvalidParameters, MassDeleteRefused)):
        return VALIDATION_ERROR
    if isinstance(problem, LockLost):
        return CONNECTION_ERROR
    if isinstance(problem, (OperationalError, InterfaceError)) and (
        problem.connection_invalidated or "connect" in str(problem.orig).lower()
    ):
        return CONNECTION_ERROR
    return SCRIPT_ERROR


def failure_line(category: str, problem: BaseException | str) -> str:
    """The failure as one short, redacted line: its category, then the first line of the error (driver
    errors span lines: SQL, parameters, a link); a script error also names the exception's type."""
    text = problem if isinstance(problem, str) else str(getattr(problem, "orig", None) or problem)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    kind = "" if isinstance(problem, str) or category != SCRIPT_ERROR else f"{type(problem).__name__}: "
    return f"{category}: {kind}{redact(first)[:500]}"
