"""The accounting of one app shard (E from the Django DB, M from Firestore, Q from the quarantine); the
clinical one is the worker's (worker/counts.py), which runs where the legacy DB is reachable."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select

from resources.firestore import count_shard
from worker import app_rules, django_schema
from worker.counts import PartitionCounts, quarantined


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
