"""Everything Dagster loads: the domains' own Definitions, merged (nothing is defined here)."""

from dagster import Definitions

from migration_assets.app import definitions as app
from migration_assets.clinical import definitions as clinical
from migration_assets.operations import definitions as operations

defs = Definitions.merge(clinical.defs, app.defs, operations.defs)
