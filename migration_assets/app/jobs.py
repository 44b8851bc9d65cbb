"""The app group's job. Its tag feeds the run queue limits of dagster.yaml (§7); the run coordinator adds the rest."""

from dagster import AssetSelection, define_asset_job

from migration_assets.launch import KIND_TAG, MIGRATION

app_migration_job = define_asset_job(
    "app_migration_job",
    selection=AssetSelection.groups("app"),
    tags={KIND_TAG: MIGRATION},
    description="users, then files (with their blobs), then filters of one shard, into Firestore.",
)
