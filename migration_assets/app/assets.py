"""users, files and filters: the List Cutter Django DB → Firestore (+ the blob store), in-process.

Each materialization is one run of one entity over one shard (``shard-00`` … ``shard-15``, a row's
shard being ``user_id % 16``). The run is checked first — it passed the run queue, its parameters
and shard key are valid (§8), the clinical path's checks shared — before anything connects; then
migrate.AppMigration streams, transforms, writes and accounts for every row, and its counts
become the materialization's metadata, the same keys as the clinical assets'.
"""

import json
from typing import Any, Literal

from dagster import AssetExecutionContext, AssetKey, AssetsDefinition, Config, MaterializeResult, MetadataValue, asset
from google.api_core import exceptions as api_exceptions
from pydantic import Field

from checks.coverage import count_app_partition
from migration_assets import registry
from migration_assets.app.migrate import AppMigration, AppRunParameters, validate_app
from migration_assets.clinical.assets import MIGRATION_RETRY
from migration_assets.dashboard import target_metadata
from migration_assets.launch import refused_before_start, require_queued
from migration_assets.registry import Entity
from resources.errors import Category, MigrationError
from resources.firestore import RETRYABLE, PartialCommit
from worker.failures import CONNECTION_ERROR, category_of, failure_line


class AppMigrationConfig(Config):
    """What a person chooses for an app run; validated per DESIGN §8 before anything connects."""

    usuario: str = Field(description="who runs the migration (recorded in migration.runs)")
    mode: Literal["full", "incremental"] = Field(
        default="full", description="full sweep (deletes what is gone) or changes since the watermark"
    )
    dry_run: bool = Field(default=False, description="compute everything, write nothing")
    allow_mass_delete: bool = Field(
        default=False, description="let a full run delete more than MAX_DELETE_SHARE of the shard"
    )
    batch_size: int | None = Field(
        default=None, description="source rows per batch; unset: the entity's own (users, filters 1,000; files 500)"
    )


def _category(problem: BaseException) -> Category:
    """Firestore unreachable or overloaded after our retries is a connection failure (retried)."""
    cause = problem.cause if isinstance(problem, PartialCommit) else problem
    if isinstance(cause, (*RETRYABLE, api_exceptions.RetryError, ConnectionError)):
        return Category.CONNECTION_ERROR
    return Category(category_of(problem))


def as_metadata(values: dict[str, Any]) -> dict[str, Any]:
    """The run's metadata for Dagster: entries in the Pipes form ``{"raw_value": …, "type": "json"}`` (how
    the worker reports them) become JSON metadata values, the rest stay as they are."""

    def one(value: Any) -> Any:
        pipes_json = isinstance(value, dict) and value.get("type") == "json"
        return MetadataValue.json(value["raw_value"]) if pipes_json else value

    return {key: one(value) for key, value in values.items()}


def app_asset(spec: Entity) -> AssetsDefinition:
    """One app entity of one shard per materialization, migrated in the step's own process."""
    entity = spec.name
    needs_files = entity == "files"

    @asset(
        name=entity,
        group_name=spec.group,
        partitions_def=spec.partitions_def,
        deps=[spec.source_key, *(AssetKey(parent) for parent in spec.parents)],
        retry_policy=MIGRATION_RETRY,
        kinds={"postgres", "firestore"} | ({"sftp"} if needs_files else set()),
        description=spec.description,
        metadata=target_metadata(spec),
        required_resource_keys={"django_db", "state_db", "firestore", "policy"}
        | ({"media", "blob_store"} if needs_files else set()),
    )
    def migrate(context: AssetExecutionContext, config: AppMigrationConfig) -> MaterializeResult:
        resources = context.resources
        with refused_before_start():
            require_queued(context, config.usuario)
            params = validate_app(
                AppRunParameters(
                    entity=entity,
                    shard=context.partition_key,
                    usuario=config.usuario,
                    run_id=context.run.run_id,
                    mode=config.mode,
                    dry_run=config.dry_run,
                    batch_size=config.batch_size,
                    allow_mass_delete=config.allow_mass_delete,
                    max_delete_share=resources.policy.max_delete_share,
                )
            )

        def progress(counts: Any) -> None:
            context.log.info(f"progress: {json.dumps(counts.as_dict(), sort_keys=True)}")

        try:
            migration = AppMigration(
                params,
                resources.django_db.engine(),
                resources.state_db.engine(),
                resources.firestore.writer(),
                media=resources.media if needs_files else None,
                blobs=resources.blob_store if needs_files else None,
                log=context.log.info,
                progress=progress,
            )
            result = migration.run()
        except MigrationError as problem:  # SSH/SFTP, configuration: already categorized and redacted
            context.log.error(str(problem))
            raise problem.as_failure() from None
        except Exception as problem:
            category = _category(problem)
            line = failure_line(category.value, problem)
            context.log.error(line)
            error = MigrationError(category, line.split(": ", 1)[1], retryable=category.value == CONNECTION_ERROR)
            raise error.as_failure() from None
        metadata = as_metadata(result.metadata(entity, {"shard": params.shard}, params.dry_run))
        if not params.dry_run:  # the shard as it now stands, for the asset page's plots
            counts = count_app_partition(
                entity,
                params.shard,
                resources.django_db.engine(),
                resources.firestore.client(),
                resources.state_db.engine(),
            )
            metadata |= counts.metadata()
        return MaterializeResult(metadata=metadata)

    return migrate


users = app_asset(registry.entity("users"))
files = app_asset(registry.entity("files"))
filters = app_asset(registry.entity("filters"))
