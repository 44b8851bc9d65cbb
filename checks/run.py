"""``python -m checks.run`` (``make check``): run asset checks alone, for one partition, from the command line.

    python -m checks.run --entity patients --partition HSJ                 # coverage, integrity, expectations
    python -m checks.run --entity files --partition shard-03 --check integrity

The checks run as a Dagster run of their own on the instance of ``DAGSTER_HOME`` (their results land
where the UI, the sensors and ``coverage_report`` read them), with the same resources from the
environment as in their asset's run. One line per check; exit 0 when every ERROR check passed,
1 when one failed, 2 for bad arguments.
"""

import argparse
import sys
from collections.abc import Sequence

from dagster import AssetCheckKey, AssetSelection, DagsterEventType, DagsterInstance, Definitions, define_asset_job

from migration_assets.registry import BY_NAME, ENTITIES
from worker.params import shard_problem, sistema_problem

CHECK_NAMES = ("coverage", "integrity", "expectations")
JOB = "checks_from_the_command_line"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--entity", required=True, choices=[e.name for e in ENTITIES])
    parser.add_argument("--partition", required=True, help="a sistema (clinical) or shard-NN (app)")
    parser.add_argument("--check", action="append", choices=CHECK_NAMES, help="repeat for several; default: all")
    args = parser.parse_args(argv)
    entity = BY_NAME[args.entity]
    problem = sistema_problem(args.partition) if entity.group == "clinical" else shard_problem(args.partition)
    if problem:
        print(f"VALIDATION_ERROR: {problem}", file=sys.stderr)
        return 2

    from migration_assets.definitions import defs  # reads the environment

    keys = [AssetCheckKey(entity.asset_key, name) for name in (args.check or CHECK_NAMES)]
    job = define_asset_job(JOB, selection=AssetSelection.checks(*keys), description="checks run alone")
    instance = DagsterInstance.get()
    if entity.group == "clinical" and not instance.has_dynamic_partition(
        entity.partitions_def.name,  # type: ignore[attr-defined]
        args.partition,
    ):
        print(f"VALIDATION_ERROR: {args.partition} is not a partition of {entity.name} yet", file=sys.stderr)
        return 2
    result = (
        Definitions.merge(defs, Definitions(jobs=[job]))
        .resolve_job_def(JOB)
        # the partition as a tag, as the UI launches a check alone (a job of checks has no assets to
        # take a partitions definition from)
        .execute_in_process(instance=instance, tags={"dagster/partition": args.partition}, raise_on_error=False)
    )
    failed = False
    for event in result.all_events:
        if event.event_type != DagsterEventType.ASSET_CHECK_EVALUATION:
            continue
        evaluation = event.asset_check_evaluation_data  # type: ignore[attr-defined]
        verdict = "passed" if evaluation.passed else f"FAILED ({evaluation.severity.value})"
        failed |= not evaluation.passed and evaluation.severity.value == "ERROR"
        counts = {k: v.value for k, v in evaluation.metadata.items() if isinstance(v.value, int | float)}
        shown = ", ".join(f"{k}={v}" for k, v in counts.items())
        print(f"{entity.name} {args.partition} {evaluation.check_name}: {verdict}  {shown}")
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure and event.step_failure_data.error is not None:
                print(event.step_failure_data.error.message.strip().splitlines()[0], file=sys.stderr)
        return 1
    print(f"run {result.run_id}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
