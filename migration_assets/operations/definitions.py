"""The operations domain: the coverage report over every entity (alerts, rollback and schedules join it)."""

from dagster import Definitions

from migration_assets.operations.assets import coverage_report

defs = Definitions(assets=[coverage_report])
