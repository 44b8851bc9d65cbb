"""What makes an entity's asset page a dashboard (DESIGN §7): the target's table name and column
schema on the asset, and the legacy tables as external assets upstream of it in the lineage.

The per-materialization numbers (``dagster/row_count``, eligible, migrated, quarantined by reason,
missing, coverage_pct, rows/s) come with each run's metadata (worker/engine.py, worker/counts.py).
"""

from typing import Any

from dagster import AssetSpec, MetadataValue, TableColumn, TableSchema

from migration_assets.registry import Entity, Group, of_group
from worker import schema
from worker.app_rules import APP_ENTITIES, BOOKKEEPING

# Firestore value types of the app documents' fields (DESIGN §6 "Firestore types").
FIRESTORE_TYPES = {
    "legacy_id": "integer", "user_id": "integer", "size_bytes": "integer",
    "is_active": "boolean", "is_staff": "boolean", "is_superuser": "boolean",
    "date_joined": "timestamp", "last_login": "timestamp", "uploaded_at": "timestamp",
    "created_at": "timestamp", "updated_at": "timestamp", "migrated_at": "timestamp",
    "system_tags": "array", "user_tags": "array", "metadata": "map", "definition": "map",
}  # fmt: skip
FIRESTORE_TYPES_BY_ENTITY = {"filters": {"file_id": "integer"}}  # the file's legacy id (files' file_id: a UUID)


def target_schema(entity: Entity) -> TableSchema:
    """The columns of the entity's PostgreSQL table, or the fields of its Firestore documents."""
    if entity.group == "clinical":
        table = schema.TARGETS[entity.name]
        return TableSchema(
            columns=[
                TableColumn(column.name, str(column.type).lower(), description=None if column.nullable else "not null")
                for column in table.columns
            ]
        )
    types = {**FIRESTORE_TYPES, **FIRESTORE_TYPES_BY_ENTITY.get(entity.name, {})}
    fields = (*APP_ENTITIES[entity.name].fields, *BOOKKEEPING)
    return TableSchema(columns=[TableColumn(name, types.get(name, "string")) for name in fields])


def target_metadata(entity: Entity) -> dict[str, Any]:
    """The asset's own metadata: where its records go and their shape."""
    where = entity.target if entity.group == "clinical" else f"firestore:{entity.target}"
    return {
        "dagster/table_name": where,
        "dagster/column_schema": target_schema(entity),
        "source_table": MetadataValue.text(f"{entity.source_system}.{entity.source}"),
    }


def legacy_tables(group: Group) -> list[AssetSpec]:
    """The legacy tables the group's entities are read from, as external assets (read, never written)."""
    kinds = {"clinical": {"mariadb"}, "app": {"postgres"}}[group]
    specs: dict[str, AssetSpec] = {}
    for entity in of_group(group):
        specs.setdefault(
            entity.source,
            AssetSpec(
                key=entity.source_key,
                group_name=f"legacy_{group}",
                kinds=kinds,
                description=f"Legacy table {entity.source} of {entity.source_system} (shared/legacy/"
                f"{entity.source_system}.sql): read by the migration, never written.",
            ),
        )
    return list(specs.values())
