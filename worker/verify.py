"""The comparison behind the ``coverage`` and ``integrity`` checks (DESIGN §7): a pure function from
three streams of one partition, each in key order, to a report.

- the *source*: every eligible legacy record after §6 — the hash §6 gives it, or the reason §6
  quarantines it;
- the *target*: every stored record — the hash recomputed from the fields actually stored (never the
  stored ``content_hash``), and what is wrong with it that a hash cannot say (a reference to nothing,
  a blob missing or changed);
- the *quarantine*: the partition's quarantine rows.

Streams of frames (polars, compared a window of keys at a time) or of records one by one. No I/O
and no Dagster here (like DVT's combiner): the clinical side feeds it on the legacy host
(``clinic-migrate verify``), the app side in the Dagster process. The report carries counts and
legacy ids, never a value.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import polars as pl

SAMPLE = 20  # ids kept per finding
DEFAULT_MIN_COVERAGE = 0.95


class Expected(NamedTuple):
    """One eligible source record after §6: its hash, or (``digest`` None) the reason it is quarantined."""

    key: int
    digest: str | None
    reason: str | None = None


class Stored(NamedTuple):
    """One target record: the hash of its stored fields (None: it cannot be computed, e.g. its
    reference points to nothing) and its problems, e.g. ``("dangling:patient", "blob:changed")``."""

    key: int
    digest: str | None
    problems: tuple[str, ...] = ()


class Held(NamedTuple):
    """One quarantine row."""

    key: int
    reason: str


@dataclass
class Finding:
    """How many records have one problem, and the first ``SAMPLE`` of their legacy ids."""

    count: int = 0
    sample: list[int] = field(default_factory=list)

    def add_all(self, keys: pl.Series) -> None:
        """Count ``keys`` (in key order) and keep the first of them while the sample has room."""
        self.count += len(keys)
        if len(self.sample) < SAMPLE:
            self.sample.extend(int(k) for k in keys.head(SAMPLE - len(self.sample)))


class Accounting:
    """Coverage arithmetic over ``eligible``, ``migrated`` and ``quarantined_by_reason`` (DESIGN §7)."""

    eligible: int
    migrated: int
    quarantined_by_reason: Mapping[str, int]

    @property
    def quarantined(self) -> int:
        return sum(self.quarantined_by_reason.values())

    @property
    def coverage(self) -> float:
        return self.migrated / self.eligible if self.eligible else 1.0


@dataclass
class Report(Accounting):
    """What one partition's streams say. Coverage: every eligible key is ``migrated`` (stored),
    quarantined (by reason) or ``missing``. Integrity: ``mismatched``, stored with other content than
    §6 makes of the source; ``unexpected``, stored but not an eligible record that §6 migrates;
    ``duplicates``, stored more than once; ``problems``, the target's own findings by name
    (``dangling:patient``, ``blob:missing`` …)."""

    eligible: int = 0
    migrated: int = 0  # eligible and stored
    stored: int = 0  # distinct keys stored
    quarantined_by_reason: Counter[str] = field(default_factory=Counter)
    missing: Finding = field(default_factory=Finding)
    mismatched: Finding = field(default_factory=Finding)
    unexpected: Finding = field(default_factory=Finding)
    duplicates: Finding = field(default_factory=Finding)
    problems: dict[str, Finding] = field(default_factory=dict)

    @property
    def integrity_failures(self) -> int:
        findings = (self.mismatched, self.unexpected, self.duplicates, *self.problems.values())
        return sum(f.count for f in findings)

    def coverage_outcome(self, min_coverage: float = DEFAULT_MIN_COVERAGE) -> tuple[bool, str]:
        """(passed, severity): ERROR when a record is missing, WARN when coverage is below ``min_coverage``."""
        if self.missing.count:
            return False, "ERROR"
        if self.coverage < min_coverage:
            return False, "WARN"
        return True, "ERROR"

    def coverage_metadata(self, min_coverage: float = DEFAULT_MIN_COVERAGE) -> dict[str, Any]:
        reasons = dict(sorted(self.quarantined_by_reason.items()))
        return {
            "eligible": self.eligible,
            "migrated": self.migrated,
            "quarantined": self.quarantined,
            "missing": self.missing.count,
            "coverage_pct": round(100.0 * self.coverage, 3),
            "min_coverage_pct": round(100.0 * min_coverage, 3),
            "quarantined_by_reason": reasons,
            **{f"quarantined_{reason}": count for reason, count in reasons.items()},
            "missing_sample_ids": list(self.missing.sample),
        }

    def integrity_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"eligible": self.eligible, "stored": self.stored}
        for name in ("mismatched", "unexpected", "duplicates"):
            finding: Finding = getattr(self, name)
            out[name] = finding.count
            out[f"{name}_sample_ids"] = list(finding.sample)
        for name, finding in sorted(self.problems.items()):
            slug = name.replace(":", "_")
            out[slug] = finding.count
            out[f"{slug}_sample_ids"] = list(finding.sample)
        out["failures"] = self.integrity_failures
        return out

    def outcomes(self, checks: Iterable[str], min_coverage: float = DEFAULT_MIN_COVERAGE) -> list[Outcome]:
        """The results of the named checks (``coverage``, ``integrity``), for Pipes or Dagster alike."""
        made = []
        for check in checks:
            if check == "coverage":
                passed, severity = self.coverage_outcome(min_coverage)
                made.append(Outcome(check, passed, severity, self.coverage_metadata(min_coverage)))
            elif check == "integrity":
                made.append(Outcome(check, self.integrity_failures == 0, "ERROR", self.integrity_metadata()))
            else:
                raise ValueError(f"unknown check {check!r}")
        return made


class Outcome(NamedTuple):
    """One check's result: its name, whether it passed, its severity (ERROR or WARN), its metadata."""

    check: str
    passed: bool
    severity: str
    metadata: dict[str, Any]


CHECKS = ("coverage", "integrity")
SOURCE_SCHEMA = {"key": pl.Int64, "digest": pl.String, "reason": pl.String}
TARGET_SCHEMA = {"key": pl.Int64, "digest": pl.String, "problems": pl.List(pl.String)}
HELD_SCHEMA = {"key": pl.Int64, "reason": pl.String}
CHUNK = 20_000  # records per frame when :func:`compare` is given records one by one
WINDOW = 50_000  # records buffered per stream before a window is accounted for


class _Stream:
    """One stream of frames, each in key order and after the one before (checked), buffered until a
    window of keys is complete in every stream."""

    def __init__(self, frames: Iterable[pl.DataFrame], schema: dict[str, Any], name: str, unique: bool) -> None:
        self.frames = iter(frames)
        self.schema = schema
        self.name = name
        self.unique = unique
        self.buffer = pl.DataFrame(schema=schema)
        self.done = False
        self.last: int | None = None

    def pull(self) -> None:
        """Add the next non-empty frame to the buffer (or note that the stream has ended)."""
        for frame in self.frames:
            if frame.height == 0:
                continue
            keys = frame["key"]
            ordered = keys.is_sorted() and (self.last is None or keys[0] >= self.last)
            if not ordered:
                raise ValueError(f"the {self.name} stream is not in key order")
            if self.unique and (keys.n_unique() != frame.height or (self.last is not None and keys[0] == self.last)):
                raise ValueError(f"the {self.name} stream repeats a key")
            self.last = keys[-1]
            self.buffer = pl.concat([self.buffer, frame.select(list(self.schema)).cast(self.schema)])
            return
        self.done = True

    def take_below(self, frontier: int | None) -> pl.DataFrame:
        """The buffered rows with a key below ``frontier`` (all of them: None), removed from the buffer."""
        if frontier is None:
            taken, self.buffer = self.buffer, self.buffer.clear()
            return taken
        cut = int(self.buffer["key"].search_sorted(frontier, side="left"))  # type: ignore[arg-type]
        taken, self.buffer = self.buffer.head(cut), self.buffer.slice(cut)
        return taken


def compare_frames(
    source: Iterable[pl.DataFrame], target: Iterable[pl.DataFrame], quarantine: Iterable[pl.DataFrame] = ()
) -> Report:
    """The comparison of three streams of frames (``SOURCE_SCHEMA``, ``TARGET_SCHEMA``, ``HELD_SCHEMA``),
    each in ascending key order across its frames; a key may repeat only in the target. Keys are
    accounted for a window at a time — every key below the smallest last key buffered by a stream that
    has not ended — so memory is a window (``WINDOW`` records a stream) and the samples, whatever the
    partition's size."""
    report = Report()
    streams = [
        _Stream(source, SOURCE_SCHEMA, "source", unique=True),
        _Stream(target, TARGET_SCHEMA, "target", unique=False),
        _Stream(quarantine, HELD_SCHEMA, "quarantine", unique=True),
    ]
    while True:
        for stream in streams:  # windows of some size: a query plan has a fixed cost
            while not stream.done and stream.buffer.height < WINDOW:
                stream.pull()
        live = [s for s in streams if not s.done]
        frontier = min((s.buffer["key"][-1] for s in live), default=None)
        _account(report, *(s.take_below(frontier) for s in streams))
        if frontier is None:
            return report
        for stream in live:
            if stream.buffer.height and stream.buffer["key"][-1] == frontier:
                stream.pull()  # the frontier key may go on in its next frame


def _account(report: Report, source: pl.DataFrame, target: pl.DataFrame, held: pl.DataFrame) -> None:
    """Account for one window of keys, complete in all three streams (one query plan, run at once)."""
    if not (source.height or target.height):
        return
    stored_keys = target.lazy().select("key").unique().with_columns(pl.lit(True).alias("_stored"))
    covered = (
        source.lazy()
        .select("key")
        .join(stored_keys, on="key", how="left")
        .join(held.lazy().rename({"reason": "_held"}), on="key", how="left")
        .with_columns(pl.col("_stored").fill_null(False))
    )
    expected = source.lazy().select("key", pl.col("digest").alias("_expected"), pl.lit(True).alias("_eligible"))
    joined = target.lazy().join(expected, on="key", how="left")
    unexpected = pl.col("_eligible").is_null() | pl.col("_expected").is_null()
    computable = pl.col("digest").is_not_null() | (pl.col("problems").list.len().fill_null(0) == 0)
    differs = pl.col("digest").is_null() | (pl.col("digest") != pl.col("_expected"))
    per_key = joined.group_by("key").agg(
        pl.len().alias("n"),
        unexpected.any().alias("unexpected"),
        (~unexpected & computable & differs).any().alias("mismatched"),
    )
    missing, quarantined, stored, found, problems = pl.collect_all(
        [
            covered.filter(~pl.col("_stored") & pl.col("_held").is_null()).select(pl.col("key").sort()),
            covered.filter(~pl.col("_stored") & pl.col("_held").is_not_null()).group_by("_held").len(),
            covered.select(pl.col("_stored").sum()),
            per_key.select(
                pl.len().alias("stored"),
                _keys_where(pl.col("n") > 1).alias("duplicates"),
                _keys_where(pl.col("unexpected")).alias("unexpected"),
                _keys_where(~pl.col("unexpected") & pl.col("mismatched")).alias("mismatched"),
            ),
            joined.select("key", "problems").explode("problems").drop_nulls().unique().sort("problems", "key"),
        ]
    )
    report.eligible += source.height
    report.migrated += int(stored.item())
    report.quarantined_by_reason.update(dict(quarantined.iter_rows()))
    report.missing.add_all(missing["key"])
    report.stored += int(found["stored"].item())
    for name in ("duplicates", "unexpected", "mismatched"):
        getattr(report, name).add_all(found[name].item())
    for (name,), keys in problems.group_by("problems", maintain_order=True):
        report.problems.setdefault(str(name), Finding()).add_all(keys["key"])


def _keys_where(condition: pl.Expr) -> pl.Expr:
    return pl.col("key").filter(condition).sort().implode()


def _frames(items: Iterable[tuple[Any, ...]], schema: dict[str, Any]) -> Iterator[pl.DataFrame]:
    chunk: list[tuple[Any, ...]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == CHUNK:
            yield pl.DataFrame(chunk, schema=schema, orient="row")
            chunk = []
    yield pl.DataFrame(chunk, schema=schema, orient="row")


def expected_frames(source: Iterable[Expected]) -> Iterator[pl.DataFrame]:
    """Source records given one by one, as the frames :func:`compare_frames` reads."""
    return _frames(source, SOURCE_SCHEMA)


def stored_frames(target: Iterable[Stored]) -> Iterator[pl.DataFrame]:
    """Target records given one by one, as the frames :func:`compare_frames` reads."""
    return _frames(((key, digest, list(problems)) for key, digest, problems in target), TARGET_SCHEMA)


def compare(source: Iterable[Expected], target: Iterable[Stored], quarantine: Iterable[Held] = ()) -> Report:
    """:func:`compare_frames` of records given one by one (each stream in ascending key order)."""
    return compare_frames(expected_frames(source), stored_frames(target), _frames(quarantine, HELD_SCHEMA))
