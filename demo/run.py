"""``make demo``: legacy data, partitions, a full migration of every sistema and every app shard, a summary.

Reads the same environment as the Dagster definitions (the Makefile sets it for the demo:
SQLite files and the local worker transport under .demo/).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dagster import AssetCheckEvaluation, materialize

from demo.app_data import generate_app
from demo.firestore_emulator import running_emulator
from demo.instance import driver_instance, write_local_instance
from demo.legacy_data import generate
from migration_assets.clinical.sensors import discover_sistemas
from migration_assets.launch import USUARIO_TAG
from migration_assets.operations.assets import coverage_report
from migration_assets.partitions import app_shards, sistemas_partitions
from migration_assets.registry import names, of_group
from resources import worker_from_env
from resources.databases import DatabaseResource
from worker import schema
from worker.counts import PartitionCounts

CLINICAL = names(of_group("clinical"))
APP = names(of_group("app"))


def summary_table(rows: list[PartitionCounts], verdicts: dict[tuple[str, str], dict[str, str]]) -> str:
    """One line per entity and partition: its counts, and what its checks said in the run."""
    header = (
        f"{'entity':<11} {'partition':<9} {'eligible':>8} {'migrated':>8} {'quarant.':>8} {'missing':>7} "
        f"{'coverage':>8} {'checked':>7} {'integrity':>9} {'expect.':>7}  quarantined by reason"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        reasons = ", ".join(f"{k}={v}" for k, v in r.quarantined_by_reason.items()) or "-"
        checks = verdicts.get((r.entity, r.partition_key), {})
        lines.append(
            f"{r.entity:<11} {r.partition_key:<9} {r.eligible:>8} {r.migrated:>8} {r.quarantined:>8} "
            f"{r.missing:>7} {r.coverage:>8.1%} {checks.get('coverage', 'not run'):>7} "
            f"{checks.get('integrity', 'not run'):>9} "
            f"{checks.get('expectations', 'not run'):>7}  {reasons}"
        )
    return "\n".join(lines)


def coverage_counts(entity: str, partition: str, evaluation: AssetCheckEvaluation) -> PartitionCounts:
    """The counts a coverage check made (eligible from the source, migrated from the target, the quarantine)."""
    values = {key: value.value for key, value in evaluation.metadata.items()}
    reasons = values["quarantined_by_reason"]
    return PartitionCounts(entity, partition, int(values["eligible"]), int(values["migrated"]), dict(reasons))


def verdict(evaluation: AssetCheckEvaluation) -> str:
    return "passed" if evaluation.passed else f"{evaluation.severity.value.lower()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2000, help="patients per sistema")
    parser.add_argument("--users", type=int, default=300, help="List Cutter users (all 16 shards)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--usuario", default="demo")
    args = parser.parse_args()

    home = Path(os.environ["DAGSTER_HOME"])
    write_local_instance(home)
    legacy = schema.make_engine(os.environ["LEGACY_DB_URL"])
    print(f"generating the legacy clinical DB ({args.patients} patients per sistema, seed {args.seed}) …")
    generate(legacy, patients_per_sistema=args.patients, seed=args.seed)

    from migration_assets.definitions import defs  # reads the environment set by the Makefile

    instance = driver_instance(home)
    legacy_db = DatabaseResource(url=os.environ["LEGACY_DB_URL"])
    sistemas, refused = discover_sistemas(worker_from_env(), legacy_db)
    instance.add_dynamic_partitions(sistemas_partitions.name, sistemas)
    print(f"partitions: {', '.join(sistemas)}" + (f" ({refused} refused)" if refused else ""))

    verdicts: dict[tuple[str, str], dict[str, str]] = {}
    counted: dict[tuple[str, str], PartitionCounts] = {}  # what each partition's coverage check counted

    def migrate(job_name: str, keys: list[str], entities: tuple[str, ...]) -> list[str]:
        """One run of ``job_name`` (the group's assets and their checks) per partition, one at a time;
        the keys whose run failed."""
        job = defs.resolve_job_def(job_name)
        failed = []
        for key in keys:
            result = job.execute_in_process(
                partition_key=key,
                instance=instance,
                run_config={"ops": {e: {"config": {"usuario": args.usuario}} for e in entities}},
                tags={USUARIO_TAG: args.usuario},
                raise_on_error=False,
            )
            print(f"  {key}: run {result.run_id} {'succeeded' if result.success else 'FAILED'}")
            for evaluation in result.get_asset_check_evaluations():
                entity = evaluation.asset_key.to_user_string()
                verdicts.setdefault((entity, key), {})[evaluation.check_name] = verdict(evaluation)
                if evaluation.check_name == "coverage":
                    counted[(entity, key)] = coverage_counts(entity, key, evaluation)
            if not result.success:
                failed.append(key)
        return failed

    failed = migrate("clinical_migration_job", sistemas, CLINICAL)

    django = schema.make_engine(os.environ["DJANGO_DB_URL"])
    media_root = Path(os.environ["MEDIA_ROOT"])
    print(f"\ngenerating the List Cutter Django DB and media folder ({args.users} users, seed {args.seed}) …")
    generate_app(django, media_root, users=args.users, seed=args.seed, outside_dir=media_root.parent / "outside")
    print("starting Google's Firestore emulator …")
    with running_emulator() as emulator_host:
        os.environ["FIRESTORE_EMULATOR_HOST"] = emulator_host  # read by the firestore resource
        failed += migrate("app_migration_job", app_shards.get_partition_keys(), APP)
    print("Firestore emulator stopped (its documents with it; the blobs stay in BLOB_STORE_URL).")
    print()
    keys = [(e, s) for e in CLINICAL for s in sistemas] + [(e, s) for e in APP for s in app_shards.get_partition_keys()]
    rows = [counted[key] for key in keys if key in counted]  # a run that failed before its checks: in `failed`
    print(summary_table(rows, verdicts))
    lost = sum(r.missing for r in rows)
    broken = sorted(f"{e} {p}" for (e, p), checks in verdicts.items() if checks.get("integrity") != "passed")
    migrated, quarantined = sum(r.migrated for r in rows), sum(r.quarantined for r in rows)
    print(f"\n{migrated} records migrated, {quarantined} quarantined, {lost} missing.")
    print(f"integrity: {'passed on every partition' if not broken else 'FAILED on ' + ', '.join(broken)}")
    made = materialize([coverage_report], instance=instance, raise_on_error=False)
    if made.success:
        [report] = made.asset_materializations_for_node("coverage_report")
        print(f"coverage report: {report.metadata['html'].value} (and coverage.json beside it)")
    else:
        failed.append("coverage_report")
    print("Open the UI on this data with `make dev`.")
    return 1 if failed or lost or broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
