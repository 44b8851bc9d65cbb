"""The clinical domain: patients and encounters, their job, the sistemas sensor, their resources."""

from dagster import Definitions

from migration_assets.clinical.assets import encounters, patients
from migration_assets.clinical.jobs import clinical_migration_job
from migration_assets.clinical.sensors import sistemas_discovery_sensor
from resources import clinical_resources

defs = Definitions(
    assets=[patients, encounters],
    jobs=[clinical_migration_job],
    sensors=[sistemas_discovery_sensor],
    resources=clinical_resources(),
)
