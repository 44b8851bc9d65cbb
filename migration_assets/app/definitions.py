"""The app domain: users, files and filters (and the legacy tables they come from), their checks, their
job, the nightly sync, their resources."""

from dagster import Definitions

from checks.factories import checks_for, checks_job
from migration_assets.app.assets import files, filters, users
from migration_assets.app.jobs import app_migration_job
from migration_assets.dashboard import legacy_tables
from migration_assets.operations.schedules import nightly_sync
from migration_assets.registry import of_group
from resources import app_resources

defs = Definitions(
    assets=[*legacy_tables("app"), users, files, filters],
    asset_checks=checks_for(of_group("app")),
    jobs=[app_migration_job, checks_job("app")],
    schedules=[nightly_sync("app", app_migration_job)],
    resources=app_resources(),
)
