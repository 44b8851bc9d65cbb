"""The asset checks of every registry entity, made by factories (DESIGN §7): ``coverage`` and
``integrity`` (one verification, so a partition's source and target are read once for both;
either can run alone) and ``expectations``. Fifteen checks from five entries, partitioned like
their assets; they run in their asset's run and alone, for one partition, from the UI or the CLI.

- clinical: ``clinic-migrate verify`` on the legacy host, through the same SSH/Pipes client as the
  migration (the control plane may not reach the legacy DB); it reports the check results itself;
- app: in this process (checks/app_verify.py);
- both compare with the one pure function of worker/verify.py.
"""

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetSelection,
    PreviewWarning,
    asset_check,
    define_asset_job,
    multi_asset_check,
)

from checks.expectations import ExpectationsError, run_suite
from migration_assets.launch import refused_before_start
from migration_assets.registry import ENTITIES, Entity, Group, names, of_group
from resources.errors import Category, MigrationError
from worker.params import InvalidParameters, shard_problem, sistema_problem
from worker.verify import CHECKS, Outcome

# Partitioned checks are a preview feature of Dagster 1.13, used on purpose (tests/test_checks.py holds them).
warnings.filterwarnings("ignore", "Specifying a partitions_def on an AssetCheckSpec", PreviewWarning)

COVERAGE, INTEGRITY = CHECKS
VERIFY_DESCRIPTIONS = {
    COVERAGE: "Every eligible legacy record is migrated or quarantined with a reason: missing = E − M − Q "
    "must be 0 (ERROR); WARN below MIN_COVERAGE.",
    INTEGRITY: "Each record's content hash recomputed from the source through §6 and from the fields stored in "
    "the target must agree; nothing unexpected, duplicated or dangling in the target (blocking).",
}


def _partition(context: AssetCheckExecutionContext, entity: Entity) -> str:
    """The run's partition key, checked like a migration's (§8) before anything connects."""
    with refused_before_start():
        if not context.has_partition_key:
            raise InvalidParameters(f"the checks of {entity.name} run for one partition: choose one")
        key = context.partition_key
        problem = sistema_problem(key) if entity.group == "clinical" else shard_problem(key)
        if problem:
            raise InvalidParameters(problem)
    return key


def _selected(context: AssetCheckExecutionContext) -> list[str]:
    return [name for name in CHECKS if any(k.name == name for k in context.selected_asset_check_keys)]


def as_result(entity: Entity, outcome: Outcome) -> AssetCheckResult:
    return AssetCheckResult(
        asset_key=entity.asset_key,
        check_name=outcome.check,
        passed=outcome.passed,
        severity=AssetCheckSeverity(outcome.severity),
        metadata=outcome.metadata,
    )


def verification_checks(entity: Entity) -> AssetChecksDefinition:
    """``coverage`` and ``integrity`` of one entity (one multi-check: a run of both reads once)."""
    specs = [
        AssetCheckSpec(
            name,
            asset=entity.asset_key,
            description=VERIFY_DESCRIPTIONS[name],
            blocking=name == INTEGRITY,
            partitions_def=entity.partitions_def,
        )
        for name in CHECKS
    ]
    clinical = entity.group == "clinical"
    needs = (
        {"worker", "legacy_db", "clinical_db", "state_db", "policy"}
        if clinical
        else {"django_db", "firestore", "state_db", "policy"}
        | ({"media", "blob_store"} if entity.name == "files" else set())
    )

    @multi_asset_check(
        name=f"{entity.name}_verification",
        specs=specs,
        can_subset=True,
        required_resource_keys=needs,
        description=f"coverage and integrity of {entity.name}, one partition",
    )
    def verify(context: AssetCheckExecutionContext) -> Iterator[AssetCheckResult]:
        key = _partition(context, entity)
        checks = _selected(context)
        resources = context.resources
        try:
            if clinical:
                yield from _clinical(context, entity, key, checks)
                return
            from checks.app_verify import verify_app_partition

            report = verify_app_partition(
                entity.name,
                key,
                django=resources.django_db.engine(),
                firestore_client=resources.firestore.client(),
                state=resources.state_db.engine(),
                media=resources.media if entity.name == "files" else None,
                blobs=resources.blob_store if entity.name == "files" else None,
            )
        except MigrationError as problem:
            context.log.error(str(problem))
            raise problem.as_failure() from None
        for outcome in report.outcomes(checks, resources.policy.min_coverage):
            yield as_result(entity, outcome)

    return verify


def _clinical(
    context: AssetCheckExecutionContext, entity: Entity, sistema: str, checks: Sequence[str]
) -> Sequence[AssetCheckResult]:
    """``clinic-migrate verify`` on the legacy host; its check results come back through Pipes."""
    resources = context.resources
    argv = ["verify", "--entity", entity.name, "--sistema", sistema, "--checks", ",".join(checks)]
    argv += ["--min-coverage", repr(resources.policy.min_coverage)]
    secrets = {
        "legacy_db_url": resources.legacy_db.url,
        "target_db_url": resources.clinical_db.url,
        "state_db_url": resources.state_db.url,
    }
    return resources.worker.verify(context, argv, secrets)


def expectations_check(entity: Entity) -> AssetChecksDefinition:
    """The entity's Great Expectations suite on its target partition (WARN)."""
    target = "clinical_db" if entity.group == "clinical" else "firestore"

    @asset_check(
        asset=entity.asset_key,
        name="expectations",
        partitions_def=entity.partitions_def,
        required_resource_keys={target},
        description=f"Great Expectations suite of {entity.name} on the target partition (WARN).",
    )
    def expectations(context: AssetCheckExecutionContext) -> AssetCheckResult:
        key = _partition(context, entity)
        resource = getattr(context.resources, target)
        where = {"database_url": resource.url} if entity.group == "clinical" else {"firestore": resource.client()}
        try:
            outcome = run_suite(entity.name, key, **where)
        except ExpectationsError as problem:  # the target could not be validated: a failed step
            raise MigrationError(Category.SCRIPT_ERROR, str(problem)).as_failure() from None
        return AssetCheckResult(passed=outcome.passed, severity=AssetCheckSeverity.WARN, metadata=outcome.metadata)

    return expectations


def checks_job(group: Group) -> Any:
    """The group's checks alone, without their assets: the UI's way to run them for one partition (its
    *Execute* button does not run a partitioned check alone). Launched with the ``dagster/partition``
    tag, as a check-only run (its job has no asset to take a partitions definition from)."""
    entities = of_group(group)
    return define_asset_job(
        f"{group}_checks_job",
        selection=AssetSelection.checks_for_assets(*(e.asset_key for e in entities)),
        description=f"coverage, integrity and expectations of {', '.join(names(entities))} for the partition "
        "named by the run's dagster/partition tag, without migrating anything",
    )


def checks_for(entities: Sequence[Entity] = ENTITIES) -> list[AssetChecksDefinition]:
    """Every check of ``entities``: coverage, integrity and expectations of each."""
    return [made for entity in entities for made in (verification_checks(entity), expectations_check(entity))]
