"""The control tables of one run (DESIGN §5): ``migration.runs`` and ``migration.checkpoints``.

Shared by every engine — the clinical worker and the in-process app migration — so a run is
recorded, resumed and closed the same way whatever it moves. Every method is called only while the
run holds its entity+partition lock (worker/locks.py): a waiting run reads and writes nothing here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, and_, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from worker import rules, schema


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class RunBook:
    """What one run of ``entity`` over ``partition_key`` records about itself.

    ``parameters`` are those a checkpoint must match to be resumed (a run with other parameters
    starts over); ``extra`` are recorded in ``migration.runs`` beside them.
    """

    entity: str
    partition_key: str
    run_id: str
    usuario: str
    mode: str
    dry_run: bool
    parameters: Mapping[str, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = lambda _: None

    def resumable_checkpoint(self, conn: Connection) -> RowMapping | None:
        """The checkpoint a killed run with the same parameters left, if any."""
        c = schema.checkpoints
        row = (
            conn.execute(select(c).where(c.c.entity == self.entity, c.c.partition_key == self.partition_key))
            .mappings()
            .first()
        )
        conn.rollback()
        if row is None or row["status"] != "running":
            return None
        if row["parameters"] != dict(self.parameters):
            self.log(f"checkpoint of run {row['run_id']} had other parameters: starting over")
            return None
        return row

    def close_interrupted_runs(self, conn: Connection) -> None:
        """Runs of this entity and partition still marked running were killed: say so. Only ever
        called while this run holds the lock, so the run it marks cannot be alive."""
        r = schema.runs
        conn.execute(
            update(r)
            .where(r.c.entity == self.entity, r.c.partition_key == self.partition_key,
                   r.c.status == "running", r.c.run_id != self.run_id)
            .values(status="interrupted")
        )  # fmt: skip
        conn.commit()

    def last_watermark(self, conn: Connection) -> datetime | None:
        """The source watermark of the latest successful, real (not dry) run."""
        r = schema.runs
        latest = conn.scalar(
            select(func.max(r.c.watermark)).where(
                r.c.entity == self.entity,
                r.c.partition_key == self.partition_key,
                r.c.status == "succeeded",
                r.c.dry_run.is_(False),
            )
        )
        conn.rollback()
        return rules.coerce_datetime(latest)

    def checkpoint(
        self, conn: Connection, last: int, counts: Mapping[str, Any], watermark: datetime | None, status: str
    ) -> None:
        """Upsert the partition's checkpoint (not committed here: it commits with its batch)."""
        if self.dry_run:
            return
        values = {
            "entity": self.entity,
            "partition_key": self.partition_key,
            "run_id": self.run_id,
            "mode": self.mode,
            "parameters": dict(self.parameters),
            "last_legacy_id": last,
            "counts": dict(counts),
            "watermark": watermark,
            "status": status,
            "updated_at": utcnow(),
        }
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(schema.checkpoints).values(values)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["entity", "partition_key"],
                set_={k: v for k, v in values.items() if k not in ("entity", "partition_key")},
            )
        )

    def record_start(self, conn: Connection, mode: str, resumed_from: str | None) -> None:
        values = {
            "usuario": self.usuario,
            "parameters": {**self.parameters, **self.extra, "dry_run": self.dry_run, "effective_mode": mode},
            "mode": mode,
            "dry_run": self.dry_run,
            "status": "running",
            "resumed_from": resumed_from,
            "started_at": utcnow(),
            "finished_at": None,
            "counts": None,
            "watermark": None,
        }
        r = schema.runs
        key = and_(r.c.run_id == self.run_id, r.c.entity == self.entity, r.c.partition_key == self.partition_key)
        if conn.execute(update(r).where(key).values(values)).rowcount == 0:  # a retried step re-uses its run id
            conn.execute(
                r.insert().values(run_id=self.run_id, entity=self.entity, partition_key=self.partition_key, **values)
            )
        conn.commit()

    def record_end(
        self,
        conn: Connection,
        status: str,
        counts: Mapping[str, Any],
        watermark: datetime | None,
        reconnect: Callable[[], Any],
    ) -> None:
        """On the run's own connection; if that session is gone (a lost lock, a dropped server), on a
        new one from ``reconnect`` (an ``Engine.begin``): the run's own row is all it touches."""
        r = schema.runs
        stmt = (
            update(r)
            .where(r.c.run_id == self.run_id, r.c.entity == self.entity, r.c.partition_key == self.partition_key)
            .values(status=status, counts=dict(counts), watermark=watermark, finished_at=utcnow())
        )
        try:
            conn.rollback()
            conn.execute(stmt)
            conn.commit()
        except DBAPIError:
            with reconnect() as fresh:
                fresh.execute(stmt)
