"""The operations domain: the coverage report over every entity; the failure and health sensors and
their alerts; rollback_job; the retention clean-up (its job and daily schedule)."""

from dagster import Definitions

from migration_assets.operations.assets import coverage_report
from migration_assets.operations.rollback import rollback_job
from migration_assets.operations.schedules import retention_job, retention_schedule
from migration_assets.operations.sensors import check_failure_sensor, health_sensor, migration_failure_sensor
from resources import ALERTS, BLOB_STORE, CLINICAL_DB, FIRESTORE, POLICY, STATE_DB, WORKER

defs = Definitions(
    assets=[coverage_report],
    jobs=[rollback_job, retention_job],
    schedules=[retention_schedule],
    sensors=[migration_failure_sensor, check_failure_sensor, health_sensor],
    resources={
        "alerts": ALERTS,
        "state_db": STATE_DB,
        "policy": POLICY,
        "worker": WORKER,
        "clinical_db": CLINICAL_DB,
        "firestore": FIRESTORE,
        "blob_store": BLOB_STORE,
    },
)
