"""Jobs. Their tags feed the run queue limits of dagster.yaml (§7); the run coordinator adds the rest."""

from dagster import AssetSelection, define_asset_job

from migration_assets.launch import KIND_TAG, MIGRATION

clinical_migration_job = define_asset_job(
    "clinical_migration_job",
    selection=AssetSelection.groups("clinical"),
    tags={KIND_TAG: MIGRATION},
    description="patients then encounters of one sistema, over SSH on the legacy host.",
)
