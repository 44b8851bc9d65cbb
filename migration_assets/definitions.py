"""Everything Dagster loads: assets, jobs, sensors and resources (read from the environment)."""

from dagster import Definitions

from migration_assets.clinical import encounters, patients
from migration_assets.jobs import clinical_migration_job
from migration_assets.sensors import sistemas_discovery_sensor
from resources import resources_from_env

defs = Definitions(
    assets=[patients, encounters],
    jobs=[clinical_migration_job],
    sensors=[sistemas_discovery_sensor],
    resources=resources_from_env(),
)
