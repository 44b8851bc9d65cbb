"""The app domain: users, files and filters, their job, their resources."""

from dagster import Definitions

from migration_assets.app.assets import files, filters, users
from migration_assets.app.jobs import app_migration_job
from resources import app_resources

defs = Definitions(assets=[users, files, filters], jobs=[app_migration_job], resources=app_resources())
