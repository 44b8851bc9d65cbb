"""Accounting of one partition: eligible E, migrated M, quarantined Q, missing = E − M − Q.

Counted independently of the run that moved the data: E from the legacy source, M from the
target, Q from the quarantine. A record that is neither migrated nor quarantined is *missing*:
silently lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine, func, select

from worker import schema
from worker.engine import SOURCES


@dataclass(frozen=True)
class PartitionCounts:
    entity: str
    partition_key: str
    eligible: int
    migrated: int
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def quarantined(self) -> int:
        return sum(self.quarantined_by_reason.values())

    @property
    def missing(self) -> int:
        return self.eligible - self.migrated - self.quarantined

    @property
    def coverage(self) -> float:
        return self.migrated / self.eligible if self.eligible else 1.0


def count_clinical_partition(
    entity: str, sistema: str, legacy: Engine, target: Engine, state: Engine
) -> PartitionCounts:
    """Count E, M and Q for one clinical entity and sistema, each from its own database."""
    source = SOURCES[entity]
    table = schema.TARGETS[entity]
    q = schema.quarantine
    with legacy.connect() as conn:
        eligible = conn.scalar(
            select(func.count()).select_from(source).where(source.c.sistema == sistema, source.c.eliminado == 0)
        )
    with target.connect() as conn:
        migrated = conn.scalar(select(func.count()).select_from(table).where(table.c.sistema == sistema))
    with state.connect() as conn:
        by_reason = dict(
            conn.execute(
                select(q.c.reason, func.count())
                .where(q.c.entity == entity, q.c.partition_key == sistema)
                .group_by(q.c.reason)
                .order_by(q.c.reason)
            ).all()
        )
    return PartitionCounts(entity, sistema, int(eligible or 0), int(migrated or 0), by_reason)
