"""The clinical domain: patients and encounters (and the legacy tables they come from), their checks,
their job, the sistemas sensor, the nightly sync, their resources."""

from dagster import Definitions

from checks.factories import checks_for, checks_job
from migration_assets.clinical.assets import encounters, patients
from migration_assets.clinical.jobs import clinical_migration_job
from migration_assets.clinical.sensors import sistemas_discovery_sensor
from migration_assets.dashboard import legacy_tables
from migration_assets.operations.schedules import nightly_sync
from migration_assets.registry import of_group
from resources import clinical_resources

defs = Definitions(
    assets=[*legacy_tables("clinical"), patients, encounters],
    asset_checks=checks_for(of_group("clinical")),
    jobs=[clinical_migration_job, checks_job("clinical")],
    sensors=[sistemas_discovery_sensor],
    schedules=[nightly_sync("clinical", clinical_migration_job)],
    resources=clinical_resources(),
)
