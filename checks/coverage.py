"""Accounting of one partition: eligible E, migrated M, quarantined Q, missing = E − M − Q.

Counted independently of the run that moved the data: E from the legacy source, M from the
target, Q from the quarantine. A record that is neither migrated nor quarantined is *missing*:
silently lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select

from resources.firestore import count_shard
from worker import app_rules, django_schema, schema
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
    with legacy.connect() as conn:
        eligible = conn.scalar(
            select(func.count()).select_from(source).where(source.c.sistema == sistema, source.c.eliminado == 0)
        )
    with target.connect() as conn:
        migrated = conn.scalar(select(func.count()).select_from(table).where(table.c.sistema == sistema))
    return PartitionCounts(entity, sistema, int(eligible or 0), int(migrated or 0), quarantined(state, entity, sistema))


def quarantined(state: Engine, entity: str, partition_key: str) -> dict[str, int]:
    """The current quarantine of one entity and partition, by reason."""
    q = schema.quarantine
    with state.connect() as conn:
        return dict(
            conn.execute(
                select(q.c.reason, func.count())
                .where(q.c.entity == entity, q.c.partition_key == partition_key)
                .group_by(q.c.reason)
                .order_by(q.c.reason)
            ).all()
        )


def count_app_partition(entity: str, shard: str, django: Engine, firestore: Any, state: Engine) -> PartitionCounts:
    """Count E (Django DB), M (Firestore documents of the shard, a count aggregation) and Q for one
    app entity and shard."""
    table = django_schema.SOURCES[entity]
    with django.connect() as conn:
        eligible = conn.scalar(
            select(func.count())
            .select_from(table)
            .where(django_schema.shard_filter(table, app_rules.shard_number(shard)))
        )
    migrated = count_shard(firestore, entity, shard)
    return PartitionCounts(entity, shard, int(eligible or 0), int(migrated or 0), quarantined(state, entity, shard))
