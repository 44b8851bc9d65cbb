"""The entity registry (DESIGN §2, §7): the one list the assets, their checks, the rollback order, the
demo and the tests are built from. Adding an entity is one entry here (and its §6 rules).

Light on purpose (no resources, no worker run): the run coordinator, which the daemon and the webserver
load on their own, reads it too.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from dagster import AssetKey, PartitionsDefinition

from migration_assets.partitions import app_shards, sistemas_partitions
from worker.params import shard_problem, sistema_problem

Group = Literal["clinical", "app"]


@dataclass(frozen=True)
class Entity:
    """One migrated entity: where it comes from, where it goes, what it needs first."""

    name: str
    group: Group
    partitions_def: PartitionsDefinition
    source_system: str  # the legacy system, as in shared/legacy/<source_system>.sql
    source: str  # the legacy table it is read from
    target: str  # the PostgreSQL table (schema.table) or the Firestore collection
    parents: tuple[str, ...]  # entities whose records this one references (same partition)
    rules: str  # the module holding its §6 rules (one place, shared by the worker and the checks)
    description: str
    key: str = "legacy_id"  # the target field that holds the legacy key: what the checks compare by

    @property
    def asset_key(self) -> AssetKey:
        return AssetKey(self.name)

    @property
    def source_key(self) -> AssetKey:
        """The legacy table, an external asset upstream of this one in the lineage."""
        return AssetKey(["legacy", self.source_system, self.source])

    @property
    def target_kind(self) -> str:
        return "postgres" if self.group == "clinical" else "firestore"

    def partition_problem(self, key: object) -> str | None:
        """Why ``key`` is not one of this entity's partition keys (§8: a sistema, or an app shard), or None."""
        return sistema_problem(key) if self.group == "clinical" else shard_problem(key)


ENTITIES: tuple[Entity, ...] = (
    Entity(
        name="patients",
        group="clinical",
        partitions_def=sistemas_partitions,
        source_system="clinical_mariadb",
        source="pacientes",
        target="clinical.patients",
        parents=(),
        rules="worker.batch",
        description="clinical.patients of one legacy sistema, migrated from pacientes (DESIGN §6).",
    ),
    Entity(
        name="encounters",
        group="clinical",
        partitions_def=sistemas_partitions,
        source_system="clinical_mariadb",
        source="atenciones",
        target="clinical.encounters",
        parents=("patients",),
        rules="worker.batch",
        description="clinical.encounters of one legacy sistema, from atenciones; needs its patients first.",
    ),
    Entity(
        name="users",
        group="app",
        partitions_def=app_shards,
        source_system="listcutter_postgres",
        source="auth_user",
        target="users",
        parents=(),
        rules="worker.app_rules",
        description="Firestore users/{id} of one shard, from the Django auth_user table (DESIGN §6).",
    ),
    Entity(
        name="files",
        group="app",
        partitions_def=app_shards,
        source_system="listcutter_postgres",
        source="list_cutter_savedfile",
        target="files",
        parents=("users",),
        rules="worker.app_rules",
        description=(
            "Firestore files/{id} of one shard and each file's blob (copied from MEDIA_ROOT, SHA-256 verified); "
            "needs the shard's users first."
        ),
    ),
    Entity(
        name="filters",
        group="app",
        partitions_def=app_shards,
        source_system="listcutter_postgres",
        source="list_cutter_savedfilter",
        target="filters",
        parents=("users", "files"),
        rules="worker.app_rules",
        description=(
            "Firestore filters/{id} of one shard, from list_cutter_savedfilter; "
            "needs the shard's users and files first."
        ),
    ),
)
BY_NAME = {entity.name: entity for entity in ENTITIES}


def entity(name: str) -> Entity:
    return BY_NAME[name]


def of_group(group: Group) -> tuple[Entity, ...]:
    return tuple(e for e in ENTITIES if e.group == group)


def names(entities: Iterable[Entity] = ENTITIES) -> tuple[str, ...]:
    return tuple(e.name for e in entities)


def parents_first(entities: Iterable[Entity] = ENTITIES) -> tuple[Entity, ...]:
    """The entities with every parent before its children (the order a migration runs them in)."""
    pending = list(entities)
    given = set(names(pending))
    done: list[Entity] = []
    while pending:
        ready = [e for e in pending if all(p in names(done) or p not in given for p in e.parents)]
        if not ready:
            raise ValueError("the registry's parents form a cycle")
        done.extend(ready)
        pending = [e for e in pending if e not in ready]
    return tuple(done)


def rollback_order(entities: Iterable[Entity] = ENTITIES) -> tuple[Entity, ...]:
    """Children before parents: the order a rollback undoes a partition in."""
    return tuple(reversed(parents_first(entities)))
