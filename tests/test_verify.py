"""The comparison behind coverage and integrity (worker/verify.py): a pure function, tested without Dagster."""

import tracemalloc
from collections.abc import Iterator

import polars as pl
import pytest

from worker import verify
from worker.verify import (
    CHECKS,
    HELD_SCHEMA,
    SAMPLE,
    SOURCE_SCHEMA,
    TARGET_SCHEMA,
    Expected,
    Held,
    Stored,
    compare,
    compare_frames,
)


def test_a_clean_partition_passes_both_checks() -> None:
    report = compare(
        [Expected(1, "a"), Expected(2, None, "MISSING_NAME"), Expected(3, "c")],
        [Stored(1, "a"), Stored(3, "c")],
        [Held(2, "MISSING_NAME")],
    )
    coverage, integrity = report.outcomes(CHECKS, min_coverage=0.5)
    assert coverage.passed and integrity.passed
    assert coverage.metadata["eligible"] == 3
    assert coverage.metadata["migrated"] == 2
    assert coverage.metadata["quarantined_by_reason"] == {"MISSING_NAME": 1}
    assert coverage.metadata["quarantined_MISSING_NAME"] == 1
    assert coverage.metadata["missing"] == 0
    assert integrity.metadata["failures"] == 0


def test_every_eligible_key_is_migrated_quarantined_or_missing() -> None:
    report = compare(
        [Expected(k, "h") for k in range(1, 11)],
        [Stored(k, "h") for k in (1, 2, 3, 4, 5, 6)],
        [Held(7, "X"), Held(8, "Y")],
    )
    assert (report.eligible, report.migrated, report.quarantined, report.missing.count) == (10, 6, 2, 2)
    assert report.missing.sample == [9, 10]
    passed, severity = report.coverage_outcome(0.5)
    assert (passed, severity) == (False, "ERROR")


def test_low_coverage_warns_and_nothing_missing_passes() -> None:
    report = compare([Expected(1, "a"), Expected(2, None, "R")], [Stored(1, "a")], [Held(2, "R")])
    assert report.coverage_outcome(0.95) == (False, "WARN")
    assert report.coverage_outcome(0.5) == (True, "ERROR")
    assert compare([], []).coverage_outcome() == (True, "ERROR")  # an empty partition is covered


def test_integrity_findings_each_with_their_ids() -> None:
    report = compare(
        [Expected(1, "a"), Expected(2, "b"), Expected(3, None, "ORPHAN_USER"), Expected(4, "d")],
        [
            Stored(1, "a"),
            Stored(2, "changed"),  # mismatched
            Stored(3, "c"),  # §6 quarantines it: unexpected
            Stored(4, None, ("dangling:patient",)),  # dangling, not also a mismatch
            Stored(5, "e"),  # no eligible source: unexpected
            Stored(5, "e"),  # and twice
        ],
        [Held(3, "ORPHAN_USER")],
    )
    meta = report.integrity_metadata()
    assert meta["mismatched_sample_ids"] == [2]
    assert meta["unexpected_sample_ids"] == [3, 5]
    assert meta["duplicates_sample_ids"] == [5]
    assert meta["dangling_patient_sample_ids"] == [4]
    assert meta["failures"] == 5
    assert not report.outcomes(["integrity"])[0].passed
    # a record stored although quarantined still counts as migrated for coverage: nothing was lost
    assert report.missing.count == 0


def test_a_hash_that_cannot_be_computed_without_a_reason_is_a_mismatch() -> None:
    report = compare([Expected(1, "a")], [Stored(1, None)])
    assert report.mismatched.sample == [1]


def test_blob_problems_are_reported_by_name() -> None:
    report = compare(
        [Expected(1, "a"), Expected(2, "b")], [Stored(1, "a", ("blob:changed",)), Stored(2, "b", ("blob:missing",))]
    )
    meta = report.integrity_metadata()
    assert (meta["blob_changed_sample_ids"], meta["blob_missing_sample_ids"]) == ([1], [2])
    assert report.mismatched.count == 0


def test_samples_are_capped_and_counts_are_not() -> None:
    report = compare([Expected(k, "x") for k in range(100)], [])
    assert report.missing.count == 100
    assert report.missing.sample == list(range(SAMPLE))


def test_streams_out_of_order_or_repeated_are_refused() -> None:
    with pytest.raises(ValueError, match="not in key order"):
        compare([Expected(2, "a"), Expected(1, "b")], [])
    with pytest.raises(ValueError, match="repeats a key"):
        compare([Expected(1, "a"), Expected(1, "a")], [])


def test_unknown_check_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown check"):
        compare([], []).outcomes(["speed"])


def _peak_bytes(n: int) -> int:
    def source() -> Iterator[Expected]:
        for key in range(n):
            yield Expected(key, "h")

    def target() -> Iterator[Stored]:
        for key in range(n):
            yield Stored(key, "h" if key % 1000 else "other")

    tracemalloc.start()
    try:
        report = compare(source(), target())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.mismatched.count == n // 1000
    return peak


def test_memory_is_flat_in_the_partition_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "WINDOW", 2_000)
    monkeypatch.setattr(verify, "CHUNK", 1_000)
    small, large = _peak_bytes(12_000), _peak_bytes(72_000)
    assert large < 1.3 * small, f"{small} bytes at 12k records, {large} at 72k: the comparison grows with them"


@pytest.mark.parametrize("window", [1, 2, 5, 50_000])
def test_frames_of_any_size_and_keys_split_across_frames(window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "WINDOW", window)

    def frames(rows: list[tuple], schema: dict, size: int) -> list[pl.DataFrame]:
        return [pl.DataFrame(rows[i : i + size], schema=schema, orient="row") for i in range(0, len(rows), size)]

    source = [(k, f"h{k}", None) for k in range(0, 30)]
    target = [(k, f"h{k}", []) for k in range(0, 30) if k != 7] + [(29, "h29", []), (31, "x", [])]
    target.sort(key=lambda row: row[0])
    held = [(3, "R")]
    whole = compare_frames(
        [pl.DataFrame(source, schema=SOURCE_SCHEMA, orient="row")],
        [pl.DataFrame(target, schema=TARGET_SCHEMA, orient="row")],
        [pl.DataFrame(held, schema=HELD_SCHEMA, orient="row")],
    )
    for size in (1, 2, 3, 7):
        split = compare_frames(
            frames(source, SOURCE_SCHEMA, size), frames(target, TARGET_SCHEMA, size + 1), frames(held, HELD_SCHEMA, 1)
        )
        assert split == whole
    assert whole.missing.sample == [7]
    assert whole.duplicates.sample == [29]
    assert whole.unexpected.sample == [31]
    assert whole.migrated == 29
