"""The coverage report (DESIGN §7 ``coverage_report``): check results recorded by real Dagster runs on a
real (SQLite) instance come out in coverage.json number for number, and coverage.html renders in a real
headless browser — Debian's chromium driven by Playwright — with its table rows and chart visible and
nothing fetched from anywhere."""

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSelection,
    DagsterInstance,
    Definitions,
    MaterializeResult,
    PreviewWarning,
    StaticPartitionsDefinition,
    asset,
    define_asset_job,
    multi_asset_check,
)

from checks import report as coverage_report

from .conftest import unavailable

warnings.filterwarnings("ignore", category=PreviewWarning)
PARTITIONS = StaticPartitionsDefinition(["HSJ", "CLN01", "BOG", "CALI", "MED"])
# What the runs record, keyed by (check, partition): set by each test before it materializes.
OUTCOMES: dict[tuple[str, str], dict[str, Any]] = {}
THROUGHPUT: dict[str, float] = {}


@asset(name="patients", partitions_def=PARTITIONS)
def patients(context: AssetExecutionContext) -> MaterializeResult:
    return MaterializeResult(metadata={"rows_per_s": THROUGHPUT[context.partition_key], "rows_read": 10})


@multi_asset_check(
    specs=[AssetCheckSpec(name, asset="patients", partitions_def=PARTITIONS) for name in ("coverage", "integrity")],
    can_subset=True,
)
def verification(context: AssetCheckExecutionContext) -> Iterator[AssetCheckResult]:
    for key in sorted(context.selected_asset_check_keys, key=lambda k: k.name):
        outcome = OUTCOMES[(key.name, context.partition_key)]
        yield AssetCheckResult(asset_key=key.asset_key, check_name=key.name, **outcome)


def coverage(
    eligible: int, migrated: int, reasons: dict[str, int], *, severity: str = "ERROR", passed: bool = True
) -> dict[str, Any]:
    """A coverage result with the metadata of worker.verify.Report.coverage_metadata."""
    missing = eligible - migrated - sum(reasons.values())
    return {
        "passed": passed,
        "severity": AssetCheckSeverity(severity),
        "metadata": {
            "eligible": eligible,
            "migrated": migrated,
            "quarantined": sum(reasons.values()),
            "missing": missing,
            "coverage_pct": round(100.0 * migrated / eligible, 3),
            "min_coverage_pct": 95.0,
            "quarantined_by_reason": reasons,
            **{f"quarantined_{reason}": count for reason, count in reasons.items()},
            "missing_sample_ids": list(range(1, missing + 1)),
        },
    }


def integrity(failures: int) -> dict[str, Any]:
    return {
        "passed": failures == 0,
        "metadata": {"eligible": 1, "stored": 1, "mismatched": failures, "failures": failures},
    }


CHECK = {name: AssetCheckKey(AssetKey("patients"), name) for name in ("coverage", "integrity")}


def run(instance: DagsterInstance, partition: str, *checks: str, asset: bool = True) -> None:
    """One run of ``partition``: the asset (unless ``asset`` is False) and the named checks."""
    selection = AssetSelection.assets("patients").without_checks() if asset else None
    for name in checks:
        chosen = AssetSelection.checks(CHECK[name])
        selection = chosen if selection is None else selection | chosen
    job = define_asset_job("report_test", selection=selection)
    definitions = Definitions(assets=[patients], asset_checks=[verification], jobs=[job])
    # checks alone: the partition as a tag, as the UI and checks/run.py launch them (no asset to take
    # a partitions definition from)
    options: dict[str, Any] = {"partition_key": partition} if asset else {"tags": {"dagster/partition": partition}}
    result = definitions.resolve_job_def("report_test").execute_in_process(instance=instance, **options)
    assert result.success


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    OUTCOMES.clear()
    THROUGHPUT.clear()
    home = tmp_path / "dagster_home"
    home.mkdir()
    with DagsterInstance.local_temp(str(home)) as made:
        THROUGHPUT.update({"HSJ": 812.5, "CLN01": 640.0, "BOG": 99.9, "CALI": 1500.0})
        # HSJ: a first run lost 3 records (ERROR), the latest accounts for all of them
        OUTCOMES[("coverage", "HSJ")] = coverage(
            100, 92, {"MISSING_DOCUMENT": 3, "INVALID_BIRTH_DATE": 2}, passed=False
        )
        OUTCOMES[("integrity", "HSJ")] = integrity(0)
        run(made, "HSJ", "coverage", "integrity")
        OUTCOMES[("coverage", "HSJ")] = coverage(100, 95, {"MISSING_DOCUMENT": 3, "INVALID_BIRTH_DATE": 2})
        THROUGHPUT["HSJ"] = 900.0
        run(made, "HSJ", "coverage", "integrity")
        # CLN01: coverage below MIN_COVERAGE (WARN), integrity failed
        OUTCOMES[("coverage", "CLN01")] = coverage(200, 150, {"INVALID_VALUE": 50}, severity="WARN", passed=False)
        OUTCOMES[("integrity", "CLN01")] = integrity(4)
        run(made, "CLN01", "coverage", "integrity")
        # BOG: coverage only, integrity never ran
        OUTCOMES[("coverage", "BOG")] = coverage(10, 10, {})
        run(made, "BOG", "coverage")
        # CALI: both checks passed in the migration's run, then integrity alone failed in a run of its own
        OUTCOMES[("coverage", "CALI")] = coverage(50, 49, {"ORPHAN_PATIENT": 1})
        OUTCOMES[("integrity", "CALI")] = integrity(0)
        run(made, "CALI", "coverage", "integrity")
        OUTCOMES[("integrity", "CALI")] = integrity(1)
        run(made, "CALI", "integrity", asset=False)
        yield made


ENTITIES = [("patients", ["HSJ", "CLN01", "BOG", "CALI", "MED"]), ("encounters", ["HSJ"])]


def rows(report: dict[str, Any], entity: str = "patients") -> dict[str, dict[str, Any]]:
    (section,) = [s for s in report["entities"] if s["entity"] == entity]
    return {row["partition"]: row for row in section["partitions"]}


def test_the_json_holds_the_latest_results_number_for_number(instance: DagsterInstance, tmp_path: Path) -> None:
    report = coverage_report.build_report(instance, ENTITIES)
    by_partition = rows(report)
    assert list(by_partition) == ["HSJ", "CLN01", "BOG", "CALI", "MED"]
    hsj, cln, bog, cali, med = (by_partition[key] for key in ("HSJ", "CLN01", "BOG", "CALI", "MED"))

    assert (hsj["eligible"], hsj["migrated"], hsj["quarantined"], hsj["missing"]) == (100, 95, 5, 0)
    assert hsj["quarantined_by_reason"] == {"INVALID_BIRTH_DATE": 2, "MISSING_DOCUMENT": 3}
    assert (hsj["coverage_pct"], hsj["coverage_status"], hsj["missing_sample_ids"]) == (95.0, "passed", [])
    assert (hsj["integrity_status"], hsj["integrity_failures"]) == ("passed", 0)
    assert hsj["integrity_evaluated_at"] == hsj["coverage_evaluated_at"] is not None
    assert hsj["rows_per_s"] == 900.0 and hsj["materialized_at"] is not None

    assert (cln["eligible"], cln["migrated"], cln["quarantined"], cln["missing"]) == (200, 150, 50, 0)
    assert (cln["coverage_pct"], cln["coverage_status"]) == (75.0, "warn")
    assert (cln["integrity_status"], cln["integrity_failures"], cln["rows_per_s"]) == ("failed", 4, 640.0)

    assert (bog["eligible"], bog["migrated"], bog["coverage_status"]) == (10, 10, "passed")
    assert (bog["integrity_status"], bog["integrity_failures"], bog["integrity_evaluated_at"]) == (
        "not run",
        None,
        None,
    )

    assert (cali["coverage_status"], cali["integrity_status"], cali["integrity_failures"]) == ("passed", "failed", 1)
    assert cali["integrity_evaluated_at"] >= cali["coverage_evaluated_at"]

    assert med["coverage_status"] == med["integrity_status"] == "not run"
    assert med["eligible"] is None and med["rows_per_s"] is None

    totals = report["entities"][0]["totals"]
    assert (totals["eligible"], totals["migrated"], totals["quarantined"], totals["missing"]) == (360, 304, 56, 0)
    assert totals["quarantined_by_reason"] == {
        "INVALID_BIRTH_DATE": 2,
        "INVALID_VALUE": 50,
        "MISSING_DOCUMENT": 3,
        "ORPHAN_PATIENT": 1,
    }
    assert totals["coverage_pct"] == round(100 * 304 / 360, 3)
    assert totals["coverage_status"] == {"not run": 1, "passed": 3, "warn": 1}
    assert totals["integrity_status"] == {"failed": 2, "not run": 2, "passed": 1}
    assert rows(report, "encounters")["HSJ"]["coverage_status"] == "not run"
    assert report["totals"]["partitions"] == 6

    json_path, html_path = coverage_report.write_report(report, tmp_path / "reports")
    assert (json_path.name, html_path.name) == ("coverage.json", "coverage.html")
    assert json.loads(json_path.read_text()) == report


def test_a_missing_record_is_an_error_and_its_ids_are_sampled(instance: DagsterInstance) -> None:
    OUTCOMES[("coverage", "MED")] = coverage(20, 15, {"MISSING_NAME": 2}, passed=False)
    THROUGHPUT["MED"] = 10.0
    run(instance, "MED", "coverage")
    med = rows(coverage_report.build_report(instance, ENTITIES))["MED"]
    assert (med["missing"], med["coverage_status"], med["missing_sample_ids"]) == (3, "error", [1, 2, 3])


def test_without_partition_keys_the_instance_says_which(instance: DagsterInstance) -> None:
    report = coverage_report.build_report(instance, [("patients", [])])
    assert list(rows(report)) == ["BOG", "CALI", "CLN01", "HSJ"]


def test_a_report_built_on_the_previous_one_reads_only_what_changed(instance: DagsterInstance) -> None:
    first = coverage_report.build_report(instance, ENTITIES)
    again = coverage_report.build_report(instance, ENTITIES, previous=json.loads(json.dumps(first)))
    assert {**again, "generated_at": None} == {**first, "generated_at": None}

    # unchanged rows come from the previous report: a doctored number shows that it was not read again
    doctored = json.loads(json.dumps(first))
    rows(doctored)["BOG"]["eligible"] = 12345
    assert rows(coverage_report.build_report(instance, ENTITIES, previous=doctored))["BOG"]["eligible"] == 12345
    # ... but never from a report of another instance
    doctored["instance"] = "another"
    assert rows(coverage_report.build_report(instance, ENTITIES, previous=doctored))["BOG"]["eligible"] == 10

    # a new run of CLN01 replaces what the previous report said of it
    OUTCOMES[("integrity", "CLN01")] = integrity(0)
    OUTCOMES[("coverage", "CLN01")] = coverage(200, 190, {"INVALID_VALUE": 10})
    THROUGHPUT["CLN01"] = 700.0
    run(instance, "CLN01", "coverage", "integrity")
    cln = rows(coverage_report.build_report(instance, ENTITIES, previous=first))["CLN01"]
    assert (cln["migrated"], cln["coverage_status"], cln["integrity_status"], cln["rows_per_s"]) == (
        190,
        "passed",
        "passed",
        700.0,
    )


def test_the_runs_read_in_a_forked_child_give_the_same_report(
    instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = coverage_report.build_report(instance, ENTITIES)  # 4 runs: read in this process
    monkeypatch.setattr(coverage_report, "PARALLEL_RUNS", 1)
    parent, read = os.getpid(), coverage_report._read_runs

    def in_the_child_only(*args: Any) -> Any:
        assert os.getpid() != parent, "the runs were read in this process"
        return read(*args)

    monkeypatch.setattr(coverage_report, "_read_runs", in_the_child_only)
    forked = coverage_report.build_report(instance, ENTITIES)
    assert {**forked, "generated_at": None} == {**here, "generated_at": None}
    assert rows(forked)["HSJ"]["rows_per_s"] == 900.0

    # a child that dies before it sends anything: the runs are read here instead
    monkeypatch.setattr(coverage_report, "_read_runs", read)
    monkeypatch.setattr(coverage_report, "_send_runs", lambda *_: os._exit(3))
    fallen_back = coverage_report.build_report(instance, ENTITIES)
    assert {**fallen_back, "generated_at": None} == {**here, "generated_at": None}


def test_make_report_writes_both_files_for_the_registry(
    instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = Path(instance.root_directory)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    out = tmp_path / "reports"
    assert coverage_report.main(["--out", str(out)]) == 0
    report = json.loads((out / "coverage.json").read_text())
    assert [section["entity"] for section in report["entities"]] == [
        "patients",
        "encounters",
        "users",
        "files",
        "filters",
    ]
    users = report["entities"][2]["partitions"]
    assert [row["partition"] for row in users] == [f"shard-{n:02d}" for n in range(16)]
    # patients: the sistemas partitions are dynamic and none is registered here: the instance's own
    assert [row["partition"] for row in report["entities"][0]["partitions"]] == ["BOG", "CALI", "CLN01", "HSJ"]
    assert (out / "coverage.html").stat().st_size > 0


def test_no_dagster_home_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert coverage_report.main(["--out", "unused"]) == 2
    assert "DAGSTER_HOME" in capsys.readouterr().err


def test_the_page_is_escaped_and_self_contained(instance: DagsterInstance) -> None:
    report = coverage_report.build_report(instance, [("patients", ["HSJ"]), ("<script>x</script>", [])])
    page = coverage_report.render_html(report)
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


# --- the page in a real browser -----------------------------------------------------------------


@pytest.mark.integration
def test_the_html_renders_in_headless_chromium(instance: DagsterInstance, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        unavailable("Debian's chromium (apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package (pip install -e '.[dev]')")
    report = coverage_report.build_report(instance, ENTITIES)
    _, html_path = coverage_report.write_report(report, tmp_path / "reports")
    requested: list[str] = []
    screenshot = tmp_path / "coverage.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(html_path.as_uri())
            assert page.title() == "Migration coverage"
            partition_rows = page.locator("table.entity[data-entity='patients'] tr.partition")
            assert partition_rows.count() == 5
            for index in range(partition_rows.count()):
                assert partition_rows.nth(index).is_visible()
            assert partition_rows.nth(1).locator("td.warn").inner_text() == "warn"
            assert partition_rows.nth(1).locator("td.failed").inner_text() == "failed"
            assert page.locator("table#totals tr").count() == 1 + 2 + 1  # head, two entities, all
            bars = page.locator("svg rect.bar")
            assert bars.count() >= 2  # patients: migrated and quarantined; encounters: none yet
            box = bars.first.bounding_box()
            assert bars.first.is_visible() and box is not None and box["width"] > 100
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert requested == [html_path.as_uri()]  # nothing from the network, nothing besides the page
    assert screenshot.stat().st_size > 10_000


FORKS_WHILE_GRPC_WORKS = """
import os, sys
import migration_assets  # as Dagster loads the code location: first
print(os.environ.get("GRPC_ENABLE_FORK_SUPPORT"), "grpc" in sys.modules)
from concurrent.futures import ThreadPoolExecutor
from google.cloud import firestore

client = firestore.Client(project="fork-handlers")
def call(n):
    document = client.collection("c").document(str(n))
    document.set({"n": n})
    return document.get().to_dict()
with ThreadPoolExecutor(4) as pool:
    for n in range(300):
        busy = pool.submit(call, n)
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
        busy.result()
"""


@pytest.mark.integration
def test_a_fork_beside_grpc_calls_runs_none_of_grpcs_fork_handlers(firestore_emulator: str) -> None:
    """The report forks its reader in processes that may have called Firestore; gRPC's fork() handlers (on by
    default) wait there for gRPC's threads and once waited for ever (a suite run hung). Loading the code
    location turns them off before gRPC is imported, and gRPC then says nothing of them while calls are in
    flight (with them on, it said it skipped them for 68 of 300 such forks)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    done = subprocess.run(
        [sys.executable, "-c", FORKS_WHILE_GRPC_WORKS],
        env={**env, "FIRESTORE_EMULATOR_HOST": firestore_emulator},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["false", "False"]
    assert "fork" not in done.stderr, done.stderr[-2000:]
