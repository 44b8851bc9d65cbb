"""How long the coverage report takes on a busy instance: 5 entities × 500 partitions (target < 2 s).

Fills a fresh temporary DagsterInstance (its default SQLite storage) with real events, stored the way
Dagster stores them: per entity and partition a materialization with the metadata a migration run
reports, a ``coverage`` evaluation with the metadata of ``worker.verify.Report`` (a few WARN and ERROR
ones among them) and an ``integrity`` evaluation (a few failed, every seventh partition none); every
tenth partition also has an older evaluation of both checks, so "latest" has something to choose from.
Then times ``build_report`` + ``write_report`` a few times from nothing (a first report) and a few times
given the previous report (every later one: only what changed is read), and checks the report's totals
against what was recorded and the two kinds of build against each other.

SQLite commits every event (~15 ms each on tmpfs, ~50 ms on this machine's disk), so the instance goes
to ``/dev/shm`` when there is one: filling ~8,000 events takes about two minutes there. The figure
measured is the report's, not the fill's.

    .venv/bin/python -m bench.report [--partitions 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    DagsterEventType,
    DagsterInstance,
)
from dagster._core.events import DagsterEvent

from checks.report import CHECKS, DEFAULT_ENTITIES, build_report, write_report

TARGET_S = 2.0
RUNS = ("bench-run-1", "bench-run-2")  # the older evaluations, the latest ones


def _report_evaluation(instance: DagsterInstance, evaluation: AssetCheckEvaluation, run_id: str) -> None:
    """Store a check evaluation as a run stores it (a runless one can exist once per check and partition)."""
    event = DagsterEvent(
        event_type_value=DagsterEventType.ASSET_CHECK_EVALUATION.value,
        event_specific_data=evaluation,
        job_name="bench_report",
    )
    instance.report_dagster_event(event, run_id=run_id)


def _coverage(entity_index: int, partition_index: int, older: bool) -> tuple[bool, AssetCheckSeverity, dict[str, Any]]:
    eligible = 1000 + 37 * partition_index + 11 * entity_index
    quarantined = {"INVALID_VALUE": partition_index % 5, "MISSING_DOCUMENT": (partition_index * 7) % 13}
    missing = 1 if partition_index % 97 == 3 else 0
    if older:  # superseded by the latest evaluation: must not show
        missing = 999
    migrated = eligible - sum(quarantined.values()) - missing
    if partition_index % 50 == 7:  # low coverage: a WARN
        migrated -= eligible // 10
        quarantined["INVALID_VALUE"] += eligible // 10
    coverage = migrated / eligible
    severity = AssetCheckSeverity.ERROR if missing or coverage >= 0.95 else AssetCheckSeverity.WARN
    metadata = {
        "eligible": eligible,
        "migrated": migrated,
        "quarantined": sum(quarantined.values()),
        "missing": missing,
        "coverage_pct": round(100.0 * coverage, 3),
        "min_coverage_pct": 95.0,
        "quarantined_by_reason": dict(sorted(quarantined.items())),
        **{f"quarantined_{reason}": count for reason, count in sorted(quarantined.items())},
        "missing_sample_ids": [partition_index * 1000 + 1] if missing else [],
    }
    return missing == 0 and coverage >= 0.95, severity, metadata


def _run_metadata(entity: str, index: int) -> dict[str, Any]:
    """A run's materialization metadata, key for key as the migration reports it (worker/engine.py
    ``Result.metadata`` and worker/counts.py ``PartitionCounts.metadata``)."""
    reasons = {"INVALID_VALUE": index % 5, "MISSING_DOCUMENT": (index * 7) % 13}
    read = 1000 + index
    return {
        "entity": entity,
        "partition": f"P{index:04d}",
        "mode": "full",
        "dry_run": False,
        "rows_read": read,
        "inserted": read - sum(reasons.values()),
        "updated": 0,
        "unchanged": 0,
        "deleted": 0,
        "rehashed": 0,
        "migrated": read - sum(reasons.values()),
        "quarantined": sum(reasons.values()),
        "quarantined_by_reason": reasons,
        **{f"quarantined_{reason}": count for reason, count in reasons.items()},
        "resumed_from_run": "",
        "duration_s": 0.2,
        "rows_per_s": 5000.0 + index,
        "worker_peak_rss_mb": 120.5,
        "dagster/row_count": read - sum(reasons.values()),
        "partition_eligible": read,
        "partition_migrated": read - sum(reasons.values()),
        "partition_quarantined": sum(reasons.values()),
        "partition_missing": 0,
        "coverage_pct": 99.0,
    }


def _integrity_metadata(eligible: int, failures: int) -> dict[str, Any]:
    """An integrity evaluation's metadata, key for key as ``worker.verify.Report.integrity_metadata``."""
    sample = list(range(1, failures + 1))
    return {
        "eligible": eligible,
        "stored": eligible,
        "mismatched": failures,
        "mismatched_sample_ids": sample,
        "unexpected": 0,
        "unexpected_sample_ids": [],
        "duplicates": 0,
        "duplicates_sample_ids": [],
        "failures": failures,
    }


def fill(instance: DagsterInstance, partitions: int) -> dict[str, int]:
    """Report the events; return what the latest coverage evaluations add up to (for the check)."""
    expected = {"eligible": 0, "migrated": 0, "missing": 0, "integrity_failed": 0, "integrity_not_run": 0}
    for entity_index, entity in enumerate(DEFAULT_ENTITIES):
        key = AssetKey([entity])
        for index in range(partitions):
            partition = f"P{index:04d}"
            rounds = (True, False) if index % 10 == 0 else (False,)
            for older in rounds:
                instance.report_runless_asset_event(
                    AssetMaterialization(asset_key=key, partition=partition, metadata=_run_metadata(entity, index))
                )
                run_id = RUNS[0] if older else RUNS[1]
                passed, severity, metadata = _coverage(entity_index, index, older)
                _report_evaluation(
                    instance,
                    AssetCheckEvaluation(
                        asset_key=key,
                        check_name="coverage",
                        passed=passed,
                        severity=severity,
                        metadata=metadata,
                        partition=partition,
                    ),
                    run_id,
                )
                if index % 7 == 0 and not older:
                    continue  # this partition's latest integrity run never happened
                failures = 0 if older or index % 41 else 2
                _report_evaluation(
                    instance,
                    AssetCheckEvaluation(
                        asset_key=key,
                        check_name="integrity",
                        passed=failures == 0,
                        metadata=_integrity_metadata(metadata["eligible"], failures),
                        partition=partition,
                    ),
                    run_id,
                )
            _, _, latest = _coverage(entity_index, index, older=False)
            for name in ("eligible", "migrated", "missing"):
                expected[name] += latest[name]
            expected["integrity_failed"] += 1 if index % 41 == 0 and index % 7 else 0
            # a partition whose only integrity result is the older one still shows that one
            expected["integrity_not_run"] += 1 if index % 7 == 0 and index % 10 else 0
    return expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=500, help="partitions per entity (default 500)")
    parser.add_argument("--rounds", type=int, default=3, help="timed report builds (default 3)")
    parser.add_argument("--dir", type=Path, default=None, help="where the instance goes (default: /dev/shm)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Dagster's preview/beta warnings are not the subject here
    base = args.dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    with tempfile.TemporaryDirectory(dir=base) as home, DagsterInstance.local_temp(home) as instance:
        started = time.perf_counter()
        expected = fill(instance, args.partitions)
        filled = time.perf_counter() - started
        entities = [(entity, [f"P{i:04d}" for i in range(args.partitions)]) for entity in DEFAULT_ENTITIES]
        rows = len(entities) * args.partitions
        print(f"filled {rows} entity partitions × {len(CHECKS)} checks + runs in {filled:.1f} s ({home})")
        out = Path(home) / "reports"
        cold: list[float] = []
        warm: list[float] = []
        report: dict[str, Any] = {}
        for _ in range(args.rounds):  # from nothing, as a first `make report`
            started = time.perf_counter()
            report = build_report(instance, entities)
            json_path, html_path = write_report(report, out)
            cold.append(time.perf_counter() - started)
        for _ in range(args.rounds):  # with the last report beside it, as every later one
            started = time.perf_counter()
            again = build_report(instance, entities, previous=json.loads(json_path.read_text()))
            write_report(again, out)
            warm.append(time.perf_counter() - started)
        check(report, expected, rows)
        if {**again, "generated_at": ""} != {**report, "generated_at": ""}:
            raise SystemExit("a report built on the previous one differs from one built from nothing")
        size = json_path.stat().st_size + html_path.stat().st_size
        for name, figures in (("from nothing", cold), ("on the previous report", warm)):
            median = statistics.median(figures)
            verdict = "within" if median < TARGET_S else "OVER"
            rounds = ", ".join(f"{figure:.3f}" for figure in figures)
            print(
                f"build_report + write_report of {rows} partitions, {name}: median {median:.3f} s "
                f"(rounds {rounds}; target < {TARGET_S:.0f} s: {verdict})"
            )
        print(f"json + html: {size / 1024:.0f} KiB")


def check(report: dict[str, Any], expected: dict[str, int], rows: int) -> None:
    """The report adds up to what was recorded, or the timing means nothing."""
    totals = report["totals"]
    integrity = totals["integrity_status"]
    got = {
        "eligible": totals["eligible"],
        "migrated": totals["migrated"],
        "missing": totals["missing"],
        "integrity_failed": integrity.get("failed", 0),
        "integrity_not_run": integrity.get("not run", 0),
    }
    if got != expected or totals["partitions"] != rows:
        raise SystemExit(f"the report does not add up: expected {expected}, got {got}")


if __name__ == "__main__":
    main()
