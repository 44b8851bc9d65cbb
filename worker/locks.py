"""One writer per entity and partition (DESIGN §5): a PostgreSQL advisory lock on the writing connection.

The lock is a session lock held by the very connection that writes, so losing that session (a
terminated backend, a dropped network) also loses the writer's ability to commit: a second worker
that then gets the lock can never interleave with the first. A writer whose target is not the lock's
database (Firestore, another PostgreSQL) calls :func:`require_held` before each commit.

SQLite (the demo) has no advisory locks; it serializes writers itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError, OperationalError


class PartitionBusy(RuntimeError):
    """Another worker holds the entity and partition."""


class LockLost(RuntimeError):
    """The session that held the lock is gone: this writer must stop before it commits again."""


def lock_key(entity: str, partition_key: str) -> int:
    digest = hashlib.sha256(f"migration:{entity}:{partition_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def exclusive(conn: Connection, entity: str, partition_key: str, wait_seconds: float) -> Iterator[None]:
    """Hold the lock of ``entity``/``partition_key`` on ``conn`` for the block; wait at most
    ``wait_seconds`` for it. ``conn`` must be the connection the block writes through."""
    if conn.dialect.name != "postgresql":
        yield
        return
    key = lock_key(entity, partition_key)
    acquired = conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})
    if not acquired:
        conn.execute(text("SELECT set_config('lock_timeout', :t, false)"), {"t": f"{int(wait_seconds * 1000)}ms"})
        try:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        except OperationalError:
            conn.rollback()
            raise PartitionBusy(
                f"another worker holds {entity}/{partition_key} after {wait_seconds:.0f} s of waiting"
            ) from None
        finally:
            if not conn.invalidated:
                conn.execute(text("SELECT set_config('lock_timeout', '0', false)"))
    conn.commit()  # the lock is the session's, not the transaction's: start the block clean
    try:
        yield
    finally:
        if not conn.invalidated and not conn.closed:
            try:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
            except DBAPIError:
                pass  # the session is gone, and the lock with it


def require_held(conn: Connection, entity: str, partition_key: str) -> None:
    """Raise :class:`LockLost` unless ``conn``'s session still holds the lock (call before a commit
    that does not go through ``conn`` itself)."""
    if conn.dialect.name != "postgresql":
        return
    try:
        held = conn.scalar(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = :k"
            ),
            {"k": lock_key(entity, partition_key)},
        )
    except DBAPIError:
        held = 0
    if not held:
        raise LockLost(f"the lock on {entity}/{partition_key} was lost: stopping before the next commit")
