"""Error categories (DESIGN §8) and how each one fails a Dagster step.

Connection and timeout failures are worth retrying; authentication, host keys, a missing worker,
bad parameters and script errors fail at once, whatever the retry policy says.
"""

from __future__ import annotations

from enum import StrEnum

from dagster import Failure, MetadataValue

from worker.redact import redact


class Category(StrEnum):
    AUTHENTICATION_ERROR = "AUTHENTICATION_ERROR"
    COMMAND_NOT_FOUND = "COMMAND_NOT_FOUND"
    CONNECTION_ERROR = "CONNECTION_ERROR"
    SSH_HOST_KEY_ERROR = "SSH_HOST_KEY_ERROR"
    TIMEOUT_ERROR = "TIMEOUT_ERROR"
    SCRIPT_ERROR = "SCRIPT_ERROR"
    VALIDATION_ERROR = "VALIDATION_ERROR"
    WORKER_KILLED = "WORKER_KILLED"


RETRYABLE = frozenset({Category.CONNECTION_ERROR, Category.TIMEOUT_ERROR})


class MigrationError(Exception):
    """A failure with its category; the message is redacted when it is made."""

    def __init__(self, category: Category, message: str, *, retryable: bool | None = None, ours: bool = False) -> None:
        """``ours``: the message is the project's own text (no value of any source or driver in it), so
        it is kept as written — redaction would mask the quoted commands it shows a person."""
        self.category = category
        self.message = message if ours else redact(message)
        self._retryable = retryable
        super().__init__(f"{category}: {self.message}")

    @property
    def retryable(self) -> bool:
        """Connection and timeout failures; a WORKER_KILLED only when the connection was lost too."""
        return self.category in RETRYABLE if self._retryable is None else self._retryable

    def as_failure(self) -> Failure:
        """The Dagster failure for this error: category in metadata, retries only if retryable."""
        return Failure(
            description=str(self),
            metadata={"error_category": MetadataValue.text(self.category.value)},
            allow_retries=self.retryable,
        )
