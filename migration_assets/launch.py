"""The run queue's limits hold for every way a migration run can start (DESIGN §7).

dagster.yaml limits migration runs by tags: at most 2 at once (``migration/kind``), 1 per partition
(``dagster/partition``), 1 per person (``migration/usuario``). Runs from a job's launchpad carry the
job's tags, but runs from an asset page or a backfill (``__ASSET_JOB``), a sensor or a schedule do not,
and the usuario is in the run config, which Dagster never turns into tags. So:

- :class:`MigrationRunCoordinator` (dagster.yaml ``run_coordinator``) sees every run submitted to the
  queue — launchpad, asset page, backfill, sensor, schedule, ``dagster job launch``, GraphQL — and,
  before it is queued, tags a migration run from its own run config, or refuses it (one short line)
  when it cannot carry the limits: no usuario, two usuarios, a bad partition key, a partition range.
- :func:`require_queued` is the first thing a migration step does: on an instance whose queue is this
  coordinator, a run that never passed it (``dagster asset materialize``, ``dagster job execute``:
  in-process, past the queue) is refused before anything connects, with the way to launch instead.

Nothing here imports the definitions: the daemon and the webserver load this module on their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from dagster import (
    AssetExecutionContext,
    DagsterEventType,
    DagsterRun,
    QueuedRunCoordinator,
    SubmitRunContext,
)

from migration_assets.registry import names, of_group
from resources.errors import Category, MigrationError
from worker.params import InvalidParameters, shard_problem, sistema_problem, usuario_problem

KIND_TAG = "migration/kind"
USUARIO_TAG = "migration/usuario"
PARTITION_TAG = "dagster/partition"
RANGE_TAG = "dagster/asset_partition_range_start"
MIGRATION = "migration"
# Migration assets and how their partition keys are checked: the registry's clinical and app entities.
CLINICAL_ASSETS = frozenset(names(of_group("clinical")))
APP_ASSETS = frozenset(names(of_group("app")))
MIGRATION_ASSETS = CLINICAL_ASSETS | APP_ASSETS
HOW_TO_LAUNCH = (
    "launch it from the UI (a job's launchpad, an asset page or a backfill) or with "
    "`dagster job launch -j <job> --tags '{\"dagster/partition\": \"<key>\"}' --config-json '<run config>'`"
)


class LaunchRefused(ValueError):
    """A run that must not be queued; the message is one line a person can act on."""


def _migration_ops(run: DagsterRun) -> set[str]:
    """The migration assets a run executes, by its asset selection, its run config or its job's tag."""
    selected = {key.to_user_string() for key in run.asset_selection or ()}
    configured = set((run.run_config or {}).get("ops", {}))
    found = (selected | configured) & MIGRATION_ASSETS
    if not found and run.tags.get(KIND_TAG) == MIGRATION:
        found = configured & MIGRATION_ASSETS or set(MIGRATION_ASSETS)
    return found


def migration_tags(run: DagsterRun) -> dict[str, str]:
    """The tags the queue limits a migration run by, derived from the run itself; ``{}`` for any
    other run. Raises :class:`LaunchRefused` for a migration run that cannot carry them."""
    ops = _migration_ops(run)
    if not ops:
        return {}
    config: Mapping[str, Any] = (run.run_config or {}).get("ops", {})
    usuarios = {(config.get(op) or {}).get("config", {}).get("usuario") for op in ops}
    if None in usuarios:
        raise LaunchRefused("VALIDATION_ERROR: a migration run needs a usuario in the config of each of its assets")
    if len(usuarios) > 1:
        raise LaunchRefused("VALIDATION_ERROR: one usuario runs a migration run: give its assets the same usuario")
    usuario = str(usuarios.pop())
    problem = usuario_problem(usuario)
    if problem:
        raise LaunchRefused(f"VALIDATION_ERROR: {problem}")
    tagged = run.tags.get(USUARIO_TAG)
    if tagged is not None and tagged != usuario:
        raise LaunchRefused(f"VALIDATION_ERROR: run tag {USUARIO_TAG} and the config's usuario differ")
    if RANGE_TAG in run.tags:
        raise LaunchRefused("VALIDATION_ERROR: a migration run migrates one partition: launch one run per partition")
    partition = run.tags.get(PARTITION_TAG)
    if partition is None:
        raise LaunchRefused("VALIDATION_ERROR: a migration run needs a partition (dagster/partition)")
    if ops & CLINICAL_ASSETS and ops & APP_ASSETS:
        raise LaunchRefused("VALIDATION_ERROR: clinical and app assets have different partitions: launch them apart")
    problem = sistema_problem(partition) if ops & CLINICAL_ASSETS else shard_problem(partition)
    if problem:
        raise LaunchRefused(f"VALIDATION_ERROR: partition key: {problem}")
    return {KIND_TAG: MIGRATION, USUARIO_TAG: usuario}


class MigrationRunCoordinator(QueuedRunCoordinator):
    """The queued run coordinator, which tags migration runs for the queue's limits or refuses them."""

    def submit_run(self, context: SubmitRunContext) -> DagsterRun:
        run = context.dagster_run
        try:
            tags = migration_tags(run)
        except LaunchRefused as refused:
            self._instance.report_run_failed(run, message=str(refused))
            refreshed = self._instance.get_run_by_id(run.run_id)
            assert refreshed is not None
            return refreshed
        if tags and any(run.tags.get(k) != v for k, v in tags.items()):
            self._instance.add_run_tags(run.run_id, tags)
            refreshed = self._instance.get_run_by_id(run.run_id)
            assert refreshed is not None
            context = SubmitRunContext(refreshed, context.workspace)
        return super().submit_run(context)


@contextmanager
def refused_before_start() -> Iterator[None]:
    """Bad parameters, or a run the queue's limits cannot hold: a one-line ``VALIDATION_ERROR`` failure
    (never retried, no stack trace) before anything connects. Shared by every migration asset."""
    try:
        yield
    except InvalidParameters as problem:
        raise MigrationError(Category.VALIDATION_ERROR, str(problem)).as_failure() from None
    except MigrationError as problem:
        raise problem.as_failure() from None


def require_queued(context: AssetExecutionContext, usuario: str) -> None:
    """Refuse, before anything connects, a migration step whose run cannot be held to the queue's
    limits: on an instance queued by :class:`MigrationRunCoordinator`, a run that was never enqueued
    (an in-process CLI run) or that lacks its usuario tag."""
    tagged = context.run.tags.get(USUARIO_TAG)
    if tagged is not None and tagged != usuario:
        raise MigrationError(Category.VALIDATION_ERROR, f"run tag {USUARIO_TAG} and the config's usuario differ")
    if not isinstance(context.instance.run_coordinator, MigrationRunCoordinator):
        return  # no queue on this instance (tests, the demo's sequential driver): nothing to hold
    enqueued = context.instance.get_records_for_run(context.run.run_id, of_type=DagsterEventType.RUN_ENQUEUED)
    if not enqueued.records or context.run.tags.get(KIND_TAG) != MIGRATION or tagged != usuario:
        raise MigrationError(
            Category.VALIDATION_ERROR,
            "this run did not pass the run queue, whose limits (2 migrations at once, 1 per partition, "
            f"1 per usuario) every migration keeps: {HOW_TO_LAUNCH}, not `dagster asset materialize`",
            ours=True,
        )
