"""patients and encounters: MariaDB → PostgreSQL, run by the worker on the legacy host.

Each materialization is one worker run for one sistema. The run is checked first — it passed the
run queue, its parameters and partition key are valid (§8) — before any connection is opened; the
worker streams, transforms and writes, and reports its counts back through Dagster Pipes as the
materialization's metadata.
"""

from collections.abc import Iterator
from typing import Any, Literal

from dagster import AssetExecutionContext, AssetKey, AssetsDefinition, Backoff, Config, RetryPolicy, asset
from pydantic import Field

from migration_assets.dashboard import target_metadata
from migration_assets.launch import refused_before_start, require_queued
from migration_assets.registry import Entity, entity
from resources.databases import DatabaseResource
from resources.errors import MigrationError
from resources.policy import MigrationPolicy
from resources.worker import WorkerResource
from worker.params import RunParameters, validate

# Connection and timeout failures get 3 attempts in all (retries after 2 s, 4 s); others fail at once.
MIGRATION_RETRY = RetryPolicy(max_retries=2, delay=2, backoff=Backoff.EXPONENTIAL)


class MigrationConfig(Config):
    """What a person chooses for a run; validated per DESIGN §8 before anything connects."""

    usuario: str = Field(description="who runs the migration (recorded in migration.runs)")
    mode: Literal["full", "incremental"] = Field(
        default="full", description="full sweep or changes since the watermark"
    )
    dry_run: bool = Field(default=False, description="compute everything, write nothing")
    pract_source: int | None = Field(default=None, description="legacy practitioner id to re-assign")
    pract_target: int | None = Field(default=None, description="practitioner id it becomes")
    allow_mass_delete: bool = Field(
        default=False, description="let a full run delete more than MAX_DELETE_SHARE of the partition"
    )
    batch_size: int | None = Field(
        default=None,
        description="rows per transaction (1–50000); unset: pages sized by memory, 2,000–20,000 rows",
    )
    timeout_seconds: float | None = Field(default=None, description="stop the worker after this long")


def run_parameters(
    context: AssetExecutionContext, entity: str, config: MigrationConfig, policy: MigrationPolicy
) -> RunParameters:
    """The worker's parameters, or a VALIDATION_ERROR failure that no retry repeats."""
    with refused_before_start():
        require_queued(context, config.usuario)
        return validate(
            RunParameters(
                entity=entity,  # type: ignore[arg-type]
                sistema=context.partition_key,
                usuario=config.usuario,
                run_id=context.run.run_id,
                mode=config.mode,
                dry_run=config.dry_run,
                pract_source=config.pract_source,
                pract_target=config.pract_target,
                batch_size=config.batch_size,
                allow_mass_delete=config.allow_mass_delete,
                max_delete_share=policy.max_delete_share,
            )
        )


def clinical_asset(spec: Entity) -> AssetsDefinition:
    """One clinical entity of one sistema per materialization, run by the worker."""

    @asset(
        name=spec.name,
        group_name=spec.group,
        partitions_def=spec.partitions_def,
        deps=[spec.source_key, *(AssetKey(parent) for parent in spec.parents)],
        retry_policy=MIGRATION_RETRY,
        kinds={"mariadb", "postgres", "ssh"},
        description=spec.description,
        metadata=target_metadata(spec),
    )
    def migrate(
        context: AssetExecutionContext,
        config: MigrationConfig,
        worker: WorkerResource,
        legacy_db: DatabaseResource,
        clinical_db: DatabaseResource,
        state_db: DatabaseResource,
        policy: MigrationPolicy,
    ) -> Iterator[Any]:
        params = run_parameters(context, spec.name, config, policy)
        secrets = {"legacy_db_url": legacy_db.url, "target_db_url": clinical_db.url, "state_db_url": state_db.url}
        try:
            reported = worker.migrate(context, params.worker_argv(), secrets, config.timeout_seconds)
        except MigrationError as problem:
            context.log.error(str(problem))
            raise problem.as_failure() from None
        yield from reported

    return migrate


patients = clinical_asset(entity("patients"))
encounters = clinical_asset(entity("encounters"))
