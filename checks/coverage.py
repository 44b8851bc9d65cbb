"""The accounting of one app shard (E from the Django DB, M from Firestore, Q from the quarantine); the
clinical one is the worker's (worker/counts.py), which runs where the legacy DB is reachable."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select

from resources.firestore import count_shard
from worker import app_rules, django_schema
from worker.counts import PartitionCounts, partition_counts, scalar


def count_app_partition(entity: str, shard: str, django: Engine, firestore: Any, state: Engine) -> PartitionCounts:
    """Count E (Django DB), M (Firestore documents of the shard, a count aggregation) and Q for one
    app entity and shard."""
    table = django_schema.SOURCES[entity]
    eligible = (
        select(func.count()).select_from(table).where(django_schema.shard_filter(table, app_rules.shard_number(shard)))
    )
    return partition_counts(
        entity, shard, lambda: scalar(django, eligible), lambda: count_shard(firestore, entity, shard), state
    )
