"""The entity registry drives the assets, their fifteen checks, the lineage and the rollback order."""

import importlib

import pytest
from dagster import AssetCheckKey, AssetKey, TableSchema

from migration_assets import registry
from migration_assets.registry import ENTITIES, Entity, parents_first, rollback_order


@pytest.fixture
def defs(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("WORKER_TRANSPORT", "local")
    from migration_assets import definitions

    return importlib.reload(definitions).defs


def test_the_registry_names_five_entities_in_two_groups() -> None:
    assert registry.names() == ("patients", "encounters", "users", "files", "filters")
    assert registry.names(registry.of_group("clinical")) == ("patients", "encounters")
    assert all(parent in registry.BY_NAME for e in ENTITIES for parent in e.parents)


def test_parents_come_first_and_rollbacks_undo_children_first() -> None:
    order = registry.names(parents_first())
    for e in ENTITIES:
        assert all(order.index(p) < order.index(e.name) for p in e.parents)
    assert registry.names(rollback_order()) == tuple(reversed(order))
    looped = (
        Entity("a", "app", ENTITIES[2].partitions_def, "s", "t", "t", ("b",), "r", "d"),
        Entity("b", "app", ENTITIES[2].partitions_def, "s", "t", "t", ("a",), "r", "d"),
    )
    with pytest.raises(ValueError, match="cycle"):
        parents_first(looped)


def test_every_entity_is_an_asset_of_its_group_partitions_and_parents(defs) -> None:  # type: ignore[no-untyped-def]
    graph = defs.resolve_asset_graph()
    for e in ENTITIES:
        node = graph.get(e.asset_key)
        assert node.group_name == e.group
        assert node.partitions_def == e.partitions_def
        assert node.parent_keys == {e.source_key, *(AssetKey(p) for p in e.parents)}
        legacy = graph.get(e.source_key)
        assert not legacy.is_materializable  # the legacy tables are external: read, never written
        metadata = node.metadata
        assert metadata["dagster/table_name"] == (e.target if e.group == "clinical" else f"firestore:{e.target}")
        schema = metadata["dagster/column_schema"]
        assert isinstance(schema, TableSchema)
        assert {"legacy_id", "content_hash", "run_id", "migrated_at"} <= {c.name for c in schema.columns}


def test_fifteen_partitioned_checks_integrity_blocking(defs) -> None:  # type: ignore[no-untyped-def]
    graph = defs.resolve_asset_graph()
    expected = {AssetCheckKey(e.asset_key, n) for e in ENTITIES for n in ("coverage", "integrity", "expectations")}
    assert set(graph.asset_check_keys) == expected
    for key in expected:
        spec = graph.get_check_spec(key)
        assert spec.blocking == (key.name == "integrity")
        assert spec.partitions_def == registry.entity(key.asset_key.to_user_string()).partitions_def


def test_the_migration_jobs_run_their_assets_checks(defs) -> None:  # type: ignore[no-untyped-def]
    for job_name, group in (("clinical_migration_job", "clinical"), ("app_migration_job", "app")):
        job = defs.resolve_job_def(job_name)
        checks = job.asset_layer.asset_graph.asset_check_keys
        for e in registry.of_group(group):
            assert {AssetCheckKey(e.asset_key, n) for n in ("coverage", "integrity", "expectations")} <= set(checks)


def test_each_group_has_a_job_of_its_checks_alone(defs) -> None:  # type: ignore[no-untyped-def]
    for group in ("clinical", "app"):
        job = defs.resolve_job_def(f"{group}_checks_job")
        graph = job.asset_layer.asset_graph
        assert not graph.executable_asset_keys  # nothing is migrated by it
        expected = {
            AssetCheckKey(e.asset_key, n)
            for e in registry.of_group(group)
            for n in ("coverage", "integrity", "expectations")
        }
        assert set(graph.asset_check_keys) == expected
