"""``rollback_job`` (DESIGN §7): undo one run of an entity and partition from the ledger.

Launched with ``entity``, ``partition`` and optionally ``run_id`` (default: the latest real run of
that entity and partition not rolled back) and ``confirm``. The run is undone for the entity and, first,
for every entity below it in the registry (children before parents: ``rollback_order()``) that the
same run wrote — a migration run of patients then encounters is undone encounters first. Without
``confirm: true`` it is a dry run: it reports what it would undo and writes nothing.

One op decides (validates the parameters before anything connects, resolves the run, picks the
branch); then only the branch of the entity's group runs, with only its resources:

- clinical: ``clinic-migrate rollback … --confirm`` on the legacy host (worker/rollback.py), through
  the same worker transport as the migration;
- app: in this process, Firestore documents and blobs (migration_assets/app/rollback.py).

The plans are read from the control DB (``migration.*``). Rolling back twice changes nothing; a run
whose records a later run changed again is refused, naming that run, until it is rolled back first.
A confirmed rollback alerts ROLLBACK_DONE when done and ROLLBACK_FAILED when it fails.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dagster import Config, Failure, MetadataValue, OpExecutionContext, Out, Output, job, op
from pydantic import Field

from migration_assets.app.rollback import apply_app
from migration_assets.registry import ENTITIES, entity, rollback_order
from resources.alerts import Alert, AlertResource, AlertType
from resources.blobstore import BlobStore
from resources.databases import DatabaseResource
from resources.errors import Category, MigrationError
from resources.firestore import FirestoreResource
from resources.worker import WorkerResource
from worker.params import RUN_ID_PATTERN, InvalidParameters, matches
from worker.rollback import RollbackRefused, plan_rollback

ROLLBACK_TIMEOUT_SECONDS = 3600.0


class RollbackConfig(Config):
    """Which run to undo, and whether to do it."""

    entity: str = Field(description="the entity whose run is undone (its children's part of that run first)")
    partition: str = Field(description="the sistema or shard")
    run_id: str | None = Field(default=None, description="the run to undo; unset: the latest real run")
    confirm: bool = Field(default=False, description="undo it; unset: a dry run that writes nothing")


@dataclass(frozen=True)
class Target:
    """What the chosen branch undoes: ``run_id`` for each of ``entities`` (children first)."""

    group: str
    entities: tuple[str, ...]
    partition: str
    run_id: str
    confirm: bool


def below(name: str) -> tuple[str, ...]:
    """``name`` and every entity that descends from it, children before parents."""
    family = {name}
    for candidate in reversed(rollback_order()):  # parents first: a child's parents are decided before it
        if any(parent in family for parent in candidate.parents):
            family.add(candidate.name)
    return tuple(e.name for e in rollback_order() if e.name in family)


def validated(config: RollbackConfig) -> str:
    """The entity's group, or a VALIDATION_ERROR naming every problem (before anything connects)."""
    problems = []
    known = {e.name: e for e in ENTITIES}
    if config.entity not in known:
        problems.append(f"entity must be one of {', '.join(known)}")
    else:
        if problem := known[config.entity].partition_problem(config.partition):
            problems.append(problem)
    if config.run_id is not None and not matches(RUN_ID_PATTERN, config.run_id):
        problems.append(f"run_id must match ^{RUN_ID_PATTERN.pattern}$")
    if problems:
        raise MigrationError(Category.VALIDATION_ERROR, "; ".join(problems), ours=True).as_failure()
    return known[config.entity].group


@op(
    out={"clinical": Out(Target, is_required=False), "app": Out(Target, is_required=False)},
    description="Validates the parameters, finds the run to undo and which entities it wrote.",
)
def choose_rollback(
    context: OpExecutionContext, config: RollbackConfig, state_db: DatabaseResource
) -> Iterator[Output]:
    group = validated(config)
    state = state_db.engine()
    try:
        plan = plan_rollback(state, config.entity, config.partition, config.run_id)
    except InvalidParameters as problem:
        raise MigrationError(Category.VALIDATION_ERROR, str(problem), ours=True).as_failure() from None
    finally:
        state.dispose()
    if plan.run_id is None:
        context.log.info(f"{config.entity}/{config.partition}: no run to roll back")
        return
    yield Output(
        Target(group, below(config.entity), config.partition, plan.run_id, config.confirm),
        output_name=group,
        metadata={"run_id": plan.run_id, "entities": ", ".join(below(config.entity)), "confirm": config.confirm},
    )


def _plans(target: Target, state: Any) -> list[Any]:
    """The plan of each entity the run wrote, children first (a child it did not write is left out).
    A parent's plan is refused while its children's part of the same run stands; this job undoes
    that part first, so such a refusal is not one here. Any other refusal raises before anything is
    written."""
    plans, ours = [], set()
    for name in target.entities:
        try:
            plan = plan_rollback(state, name, target.partition, target.run_id)
        except RollbackRefused:
            if name == target.entities[-1]:
                raise
            continue  # a child entity this run never ran
        if plan.refusal and not set(plan.blocking_runs) <= ours:
            raise RollbackRefused(plan.refusal)
        plans.append(plan)
        ours.add(f"{name}:{target.run_id}")
    return plans


def _alert(alerts: AlertResource, context: OpExecutionContext, target: Target, kind: AlertType, message: str,
           category: str | None = None, **details: Any) -> None:  # fmt: skip
    alerts.send(
        Alert(
            type=kind,
            key=f"{kind}:{context.run.run_id}",
            run_id=context.run.run_id,
            job=context.job_name,
            entity=target.entities[-1],
            partition=target.partition,
            category=category,
            message=message,
            details={"rolled_back_run": target.run_id, **details},
        )
    )


def _undo(context: OpExecutionContext, target: Target, alerts: AlertResource, apply: Any, state: Any) -> Output:
    """Each entity's plan (dry run) or its rollback (confirmed), children first; alerts when confirmed."""
    done: dict[str, dict[str, Any]] = {}
    try:
        for plan in _plans(target, state):
            if target.confirm:  # planned again now: its children's part is undone by now
                said = apply(plan_rollback(state, plan.entity, target.partition, target.run_id))
            else:
                after = [b.split(":")[0] for b in plan.blocking_runs]
                said = {**plan.summary(), "refusal": None} | ({"after": after} if after else {})
            done[plan.entity] = said
            verb = "would undo" if not target.confirm else "undid"
            context.log.info(f"{plan.entity}/{target.partition}: {verb} run {target.run_id}: {said}")
    except (RollbackRefused, InvalidParameters, MigrationError) as problem:
        error = problem if isinstance(problem, MigrationError) else None
        category = error.category.value if error else Category.VALIDATION_ERROR.value
        message = error.message if error else str(problem)
        if target.confirm:
            _alert(alerts, context, target, AlertType.ROLLBACK_FAILED, message, category)
        raise Failure(
            description=f"{category}: {message}",
            metadata={"error_category": MetadataValue.text(category)},
            allow_retries=bool(error and error.retryable),
        ) from None
    except Exception as problem:
        if target.confirm:
            _alert(alerts, context, target, AlertType.ROLLBACK_FAILED, str(problem), Category.SCRIPT_ERROR.value)
        raise
    if target.confirm:
        entities = ", ".join(done) or "nothing"
        _alert(alerts, context, target, AlertType.ROLLBACK_DONE, f"run {target.run_id} undone: {entities}")
    return Output(
        None, metadata={name: MetadataValue.json(said) for name, said in done.items()} | {"dry_run": not target.confirm}
    )


@op(description="Undoes the run in the clinical target, on the legacy host (clinic-migrate rollback).")
def rollback_clinical(
    context: OpExecutionContext,
    target: Target,
    worker: WorkerResource,
    clinical_db: DatabaseResource,
    state_db: DatabaseResource,
    alerts: AlertResource,
) -> Output:
    secrets = {"target_db_url": clinical_db.url, "state_db_url": state_db.url}

    def apply(plan: Any) -> dict[str, Any]:
        argv = ["rollback", "--entity", plan.entity, "--sistema", target.partition, "--run-id", target.run_id]
        return worker.run_json([*argv, "--confirm"], secrets, ROLLBACK_TIMEOUT_SECONDS)

    state = state_db.engine()
    try:
        return _undo(context, target, alerts, apply, state)
    finally:
        state.dispose()


@op(
    description="Undoes the run in Firestore and the blob store, in this process.",
    required_resource_keys={"firestore", "blob_store", "state_db", "alerts"},
)
def rollback_app(context: OpExecutionContext, target: Target) -> Output:
    # by key: the blob store is a plain object, not a ConfigurableResource (and one op cannot mix both)
    resources = context.resources
    firestore: FirestoreResource = resources.firestore
    blobs: BlobStore = resources.blob_store
    state = resources.state_db.engine()
    try:
        return _undo(
            context, target, resources.alerts, lambda plan: apply_app(plan, firestore, blobs, state).as_dict(), state
        )
    finally:
        state.dispose()


@job(description="Undoes one run of an entity and partition from the ledger (dry run unless confirm: true).")
def rollback_job() -> None:
    chosen_clinical, chosen_app = choose_rollback()
    rollback_clinical(chosen_clinical)
    rollback_app(chosen_app)


def rollback_request_config(name: str, partition: str, run_id: str | None) -> dict[str, Any]:
    """The run config of a confirmed rollback (what the failure sensors launch with AUTO_ROLLBACK)."""
    entity(name)  # a registry entity, or KeyError
    config = {"entity": name, "partition": partition, "run_id": run_id, "confirm": True}
    return {"ops": {"choose_rollback": {"config": config}}}
