"""Jobs. Their tags feed the run queue limits of dagster.yaml (§7)."""

from dagster import AssetSelection, define_asset_job

MIGRATION_TAGS = {"migration/kind": "migration"}

clinical_migration_job = define_asset_job(
    "clinical_migration_job",
    selection=AssetSelection.groups("clinical"),
    tags=MIGRATION_TAGS,
    description="patients then encounters of one sistema, over SSH on the legacy host.",
)
