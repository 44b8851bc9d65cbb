"""coverage_report: the proof of every migrated partition on one page (DESIGN §7).

From the latest ``coverage`` and ``integrity`` results and the latest run of each entity and
partition in this Dagster instance, writes ``coverage.json`` and a self-contained ``coverage.html``
(no network needed to open it) to ``REPORTS_DIR`` (default ``reports/``). ``make report`` writes the
same from the command line.
"""

import os
from pathlib import Path

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from checks.report import build_report, load_previous, registry_entities, write_report
from migration_assets.registry import ENTITIES


def reports_dir() -> Path:
    return Path(os.environ.get("REPORTS_DIR") or "reports")


@asset(
    group_name="operations",
    deps=[entity.asset_key for entity in ENTITIES],
    kinds={"html", "json"},
    description="coverage.json and coverage.html: eligible, migrated, quarantined by reason, missing, coverage %, "
    "integrity status and last throughput of every entity × partition, from the latest check results.",
)
def coverage_report(context: AssetExecutionContext) -> MaterializeResult:
    out = reports_dir()
    report = build_report(context.instance, registry_entities(context.instance), previous=load_previous(out))
    json_path, html_path = write_report(report, out)
    totals = report["totals"]
    lines = [
        "| entity | partitions | eligible | migrated | quarantined | missing | coverage % |",
        "|---|---|---|---|---|---|---|",
    ]
    for section in report["entities"]:
        t = section["totals"]
        pct = "—" if t["coverage_pct"] is None else f"{t['coverage_pct']:.1f}"
        lines.append(
            f"| {section['entity']} | {t['partitions']} | {t['eligible']} | {t['migrated']} | {t['quarantined']} "
            f"| {t['missing']} | {pct} |"
        )
    return MaterializeResult(
        metadata={
            "json": MetadataValue.path(str(json_path.resolve())),
            "html": MetadataValue.path(str(html_path.resolve())),
            "partitions": totals["partitions"],
            "eligible": totals["eligible"],
            "migrated": totals["migrated"],
            "quarantined": totals["quarantined"],
            "missing": totals["missing"],
            "summary": MetadataValue.md("\n".join(lines)),
        }
    )
