"""The ``expectations`` check (DESIGN §7, WARN): a Great Expectations 1.x suite per entity, run on one
target partition.

The suites are declared as data in :func:`suites` (entity → list of GX expectation objects), derived
from the §6 contract and built from the rule constants of ``worker.rules`` / ``worker.app_rules``.
:func:`run_suite` validates one partition and returns a :class:`SuiteResult` whose metadata holds
counts and expectation names only — never a value: GX runs with ``partial_unexpected_count = 0``, so it
does not even collect unexpected values, and only ``element_count`` / ``unexpected_count`` are read
from its results.

- clinical (``clinical.patients`` / ``clinical.encounters``): validated *in the database* through GX's
  SQL datasource, on a query asset restricted to ``sistema = <partition>``; the partition is never
  loaded into memory, GX sends aggregate queries.
- app (Firestore ``users`` / ``files`` / ``filters``): the shard's documents are streamed in pages
  (``PAGE_SIZE``) with only the fields the suite reads (never ``password_hash``), each page validated
  with GX's pandas datasource, the counts added up; memory is bounded by the page. Uniqueness of
  ``legacy_id`` across pages follows from the stream itself: documents are keyed by id, and every
  document's ``legacy_id`` must equal its document id (``expect_column_pair_values_to_be_equal``), so
  no two documents can carry the same ``legacy_id``.

Great Expectations is imported lazily (inside the functions): on this project's 2-core machines its
import takes 4.5-13 s (load-dependent), against 0.15-0.2 s for one validation of a small clinical
partition, ~1.6 s for a 100,000-row one on PostgreSQL (~3 s on the demo's SQLite) and ~0.06 s per
5,000-document page; the Dagster definitions must not pay the import at load time. On Firestore the
stream is the cost (~1 ms per document through ``resources.firestore.stream_collection``: 20,000
documents in ~17 s, the validation of their four pages ~0.3 s of it).

A partition key is validated (``worker.params``) before it goes into a query. GX's SQL query asset
takes its query as text and compiles it again with ``literal_binds`` (a bound parameter cannot reach
the database through it), so the key is rendered by SQLAlchemy's literal renderer for the target's
dialect, after validation against ``^[A-Z0-9_]{2,16}$``. (GX's column-value partitioner would bind
the key, but it lists every distinct value of the column first: a scan of the whole table per check.)
"""

import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, select
from sqlalchemy.engine import make_url

from worker import app_rules, params, rules, schema

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

SEVERITY = "WARN"  # DESIGN §7: a failed expectation warns, it does not block
PAGE_SIZE = 5000  # Firestore documents per validated page
CLINICAL_ENTITIES: tuple[str, ...] = tuple(schema.TARGETS)
APP_ENTITIES: tuple[str, ...] = tuple(app_rules.APP_ENTITIES)
ENTITIES: tuple[str, ...] = CLINICAL_ENTITIES + APP_ENTITIES
DOCUMENT_ID = "document_id"  # the Firestore document id, as an integer, beside the document's fields
# Counts only: GX neither collects nor returns unexpected values, rows or queries.
RESULT_FORMAT: dict[str, Any] = {
    "result_format": "BASIC",
    "partial_unexpected_count": 0,
    "include_unexpected_rows": False,
    "return_unexpected_index_query": False,
}

# --- the contract's value sets and shapes, from the rules (§6) ----------------------------------
# The defaults ("unknown", "other") are what the rules make of a value they do not know.
SEXES = sorted({*rules.SEX_CODES.values(), rules.normalize_sex(None)})
ENCOUNTER_KINDS = sorted({*rules.ENCOUNTER_KINDS.values(), rules.normalize_encounter_kind(None)})
ENCOUNTER_STATUSES = sorted({*rules.ENCOUNTER_STATUSES.values(), rules.normalize_encounter_status(None)})
DOCUMENT_TYPES = sorted(rules.DOCUMENT_TYPES)
FLAGS = [True, False]


def whole(pattern: str) -> str:
    r"""``pattern`` matched against the whole value: ``\A`` and ``\Z`` mean the same in Python (pandas,
    SQLite's REGEXP) and in PostgreSQL's regular expressions, unlike ``$``, which Python lets match
    before a final newline."""
    return rf"\A(?:{pattern})\Z"


SHA256_HEX = whole(r"[0-9a-f]{64}")  # content_hash and files' sha256: hexdigest(), lower case
NATIONAL_ID = whole(rf"[0-9A-Z]{{1,{rules.PATIENT_WIDTHS['national_id']}}}")
ICD10_STORED = whole(r"[A-Z][0-9]{2}(?:\.[0-9A-Z]{1,4})?")  # rules.normalize_icd10's output: dotted
EMAIL = whole(rules.EMAIL_PATTERN.pattern)
PHONE = whole(r"\+?[0-9]+")  # rules.normalize_phone: ASCII digits, a leading '+'
UUID_CANONICAL = whole(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
UPPER_CASE = r"[A-Z]"  # e-mails are stored lower-cased (both paths)


def _gx() -> Any:
    """``great_expectations``, imported on first use, quietly (no analytics, no progress bars)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    return gx


def suites(today: date | None = None) -> dict[str, list["Expectation"]]:
    """One suite per entity: entity → GX expectations. ``today`` bounds birth dates (default: today, UTC)."""
    gx = _gx()
    E = gx.expectations
    today = today or datetime.now(UTC).date()

    def not_null(*columns: str) -> "list[Expectation]":
        return [E.ExpectColumnValuesToNotBeNull(column=column) for column in columns]

    def bookkeeping(*columns: str) -> "list[Expectation]":
        """Every record's bookkeeping is there and its hash has the shape of a SHA-256."""
        return [*not_null(*columns), E.ExpectColumnValuesToMatchRegex(column="content_hash", regex=SHA256_HEX)]

    def keyed_by_legacy_id() -> "list[Expectation]":
        return [
            E.ExpectColumnValuesToBeUnique(column="legacy_id"),
            E.ExpectColumnValuesToBeBetween(column="legacy_id", min_value=1),
        ]

    def document_keyed() -> "list[Expectation]":
        """A Firestore document's id is its legacy id: hence legacy ids are unique across pages."""
        return [*keyed_by_legacy_id(), E.ExpectColumnPairValuesToBeEqual(column_A="legacy_id", column_B=DOCUMENT_ID)]

    clinical_bookkeeping = ("sistema", "legacy_id", "content_hash", "run_id", "migrated_at")
    app_bookkeeping = ("legacy_id", *app_rules.BOOKKEEPING)
    return {
        "patients": [
            *bookkeeping(*clinical_bookkeeping, "national_id", "sex"),
            *keyed_by_legacy_id(),
            E.ExpectColumnValuesToBeUnique(column="national_id"),
            E.ExpectColumnValuesToMatchRegex(column="national_id", regex=NATIONAL_ID),
            E.ExpectColumnValuesToBeInSet(column="document_type", value_set=DOCUMENT_TYPES),
            E.ExpectColumnValuesToBeInSet(column="sex", value_set=SEXES),
            E.ExpectColumnValuesToBeBetween(column="birth_date", min_value=rules.EARLIEST_BIRTH_DATE, max_value=today),
            E.ExpectColumnValuesToMatchRegex(column="email", regex=EMAIL),
            E.ExpectColumnValuesToNotMatchRegex(column="email", regex=UPPER_CASE),
            E.ExpectColumnValueLengthsToBeBetween(column="email", max_value=rules.EMAIL_MAX_LENGTH),
            E.ExpectColumnValuesToMatchRegex(column="phone", regex=PHONE),
        ],
        "encounters": [
            *bookkeeping(*clinical_bookkeeping, "patient_id", "occurred_at", "kind", "status"),
            *keyed_by_legacy_id(),
            E.ExpectColumnValuesToBeInSet(column="kind", value_set=ENCOUNTER_KINDS),
            E.ExpectColumnValuesToBeInSet(column="status", value_set=ENCOUNTER_STATUSES),
            E.ExpectColumnValuesToMatchRegex(column="icd10", regex=ICD10_STORED),
        ],
        "users": [
            *bookkeeping(*app_bookkeeping, "username", "is_active", "is_staff", "is_superuser"),
            *document_keyed(),
            *(
                E.ExpectColumnValuesToBeInSet(column=flag, value_set=FLAGS)
                for flag in ("is_active", "is_staff", "is_superuser")
            ),
            E.ExpectColumnValuesToNotMatchRegex(column="email", regex=UPPER_CASE),
        ],
        "files": [
            *bookkeeping(*app_bookkeeping, "user_id", "file_id", "size_bytes", "sha256", "blob_url"),
            *document_keyed(),
            E.ExpectColumnValuesToMatchRegex(column="file_id", regex=UUID_CANONICAL),
            E.ExpectColumnValuesToMatchRegex(column="sha256", regex=SHA256_HEX),
            E.ExpectColumnValuesToBeBetween(column="size_bytes", min_value=0),
        ],
        "filters": [
            *bookkeeping(*app_bookkeeping, "user_id", "definition"),
            *document_keyed(),
            E.ExpectColumnValuesToBeBetween(column="file_id", min_value=1),
        ],
    }


def expectation_name(configuration: Any) -> str:
    """A stable, value-free name for an expectation (its ``configuration``, or a result's
    ``expectation_config``): the GX type and its column(s), e.g. ``expect_column_values_to_be_in_set(sex)``."""
    kwargs = configuration.kwargs
    columns = [str(kwargs[key]) for key in ("column", "column_A", "column_B") if kwargs.get(key) is not None]
    return configuration.type + (f"({','.join(columns)})" if columns else "")


def columns_of(suite: Sequence[Any]) -> list[str]:
    """The columns a suite reads, in first-use order: all a validation needs to fetch."""
    found: dict[str, None] = {}
    for expectation in suite:
        for key in ("column", "column_A", "column_B"):
            value = getattr(expectation, key, None)
            if value is not None:
                found[str(value)] = None
    return list(found)


# --- results -------------------------------------------------------------------------------------


@dataclass
class _Tally:
    unexpected: int = 0
    failed: bool = False
    uncounted: bool = False  # GX raised, or failed the expectation without an unexpected count


@dataclass(frozen=True)
class SuiteResult:
    """What one suite says about one partition: counts and expectation names, never a value."""

    entity: str
    partition_key: str
    rows: int  # rows or documents validated
    evaluated: tuple[str, ...]  # expectation names, in suite order
    failed: Mapping[str, int | None]  # failed expectation → its unexpected count (None: it raised)
    pages: int = 1
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def severity(self) -> str:
        return SEVERITY

    @property
    def metadata(self) -> dict[str, Any]:
        """Check metadata: plain values (the dict becomes JSON metadata in Dagster)."""
        return {
            "entity": self.entity,
            "rows_validated": self.rows,
            "evaluated_expectations": len(self.evaluated),
            "failed_expectations": dict(self.failed),
            "failed_expectation_count": len(self.failed),
            "pages": self.pages,
            "duration_s": round(self.seconds, 3),
        }


class ExpectationsError(RuntimeError):
    """Great Expectations could not validate a partition; the message names the entity, the
    partition and the error's type, never a value, a query or a URL."""


def _tally(results: Any, into: dict[str, _Tally]) -> int:
    """Add one validation's results into ``into``; return the rows it saw (the largest element count).

    Only ``element_count`` and ``unexpected_count`` are read: nothing else of a result leaves GX."""
    rows = 0
    for result in results.results:
        tally = into.setdefault(expectation_name(result.expectation_config), _Tally())
        info = result.exception_info or {}
        raised = bool(info.get("raised_exception")) or any(
            isinstance(value, Mapping) and value.get("raised_exception") for value in info.values()
        )
        counts = result.result or {}
        unexpected = counts.get("unexpected_count")
        rows = max(rows, int(counts.get("element_count") or 0))
        if raised or not result.success:
            tally.failed = True
        if raised or (unexpected is None and not result.success):
            tally.uncounted = True
        elif unexpected is not None:
            tally.unexpected += int(unexpected)
    return rows


def _result(
    entity: str, key: str, suite: Sequence[Any], tallies: Mapping[str, _Tally], rows: int, pages: int, started: float
) -> SuiteResult:
    names = tuple(dict.fromkeys(expectation_name(expectation.configuration) for expectation in suite))
    failed = {
        name: (None if tallies[name].uncounted else tallies[name].unexpected)
        for name in names
        if name in tallies and tallies[name].failed
    }
    return SuiteResult(entity, key, rows, names, failed, pages, time.perf_counter() - started)


# --- running a suite ------------------------------------------------------------------------------


def _partition_problem(entity: str, partition_key: str) -> str | None:
    if entity in CLINICAL_ENTITIES:
        return params.sistema_problem(partition_key)
    return params.shard_problem(partition_key)


def clinical_query(entity: str, partition_key: str, database_url: str, columns: Sequence[str]) -> str:
    """The SELECT of one clinical partition's ``columns``, for GX's query asset (see the module doc)."""
    problem = params.sistema_problem(partition_key)
    if problem is not None:
        raise ValueError(problem)
    dialect = make_url(database_url).get_dialect()()
    table = schema.TARGETS[entity]
    if dialect.name == "sqlite":  # the demo's target: one file, no schemas (as schema.make_engine maps it)
        table = table.to_metadata(MetaData(), schema=None)
    statement = select(*(table.c[column] for column in columns)).where(table.c.sistema == partition_key)
    return str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def _context(gx: Any) -> Any:
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _validate_sql(gx: Any, entity: str, partition_key: str, database_url: str, suite: list[Any]) -> SuiteResult:
    started = time.perf_counter()
    query = clinical_query(entity, partition_key, database_url, columns_of(suite))
    context = _context(gx)
    datasource = context.data_sources.add_sql(name="target", connection_string=database_url)
    try:
        asset = datasource.add_query_asset(name=f"{entity}_partition", query=query)
        batch = asset.add_batch_definition_whole_table("partition").get_batch()
        results = batch.validate(gx.ExpectationSuite(name=entity, expectations=suite), result_format=RESULT_FORMAT)
        tallies: dict[str, _Tally] = {}
        rows = _tally(results, tallies)
    finally:
        datasource.get_engine().dispose()
    return _result(entity, partition_key, suite, tallies, rows, 1, started)


def _document_id(value: str) -> int | None:
    return int(value) if value.isascii() and value.isdigit() else None


def app_pages(
    client: Any, entity: str, shard: str, columns: Sequence[str], page_size: int = PAGE_SIZE
) -> Iterator["pd.DataFrame"]:
    """The shard's documents as frames of at most ``page_size`` rows, with only ``columns`` (a missing
    field is null); ``DOCUMENT_ID`` is the document id as an integer (None when it is not one)."""
    import pandas as pd

    from resources.firestore import stream_collection

    fields = [column for column in columns if column != DOCUMENT_ID]
    collection = app_rules.APP_ENTITIES[entity].collection
    rows: list[dict[str, Any]] = []
    for document in stream_collection(client, collection, shard, fields, page_size=page_size):
        row = {name: document.data.get(name) for name in fields}
        row[DOCUMENT_ID] = _document_id(document.id)
        rows.append(row)
        if len(rows) >= page_size:
            yield pd.DataFrame.from_records(rows, columns=[*fields, DOCUMENT_ID])
            rows = []
    if rows:
        yield pd.DataFrame.from_records(rows, columns=[*fields, DOCUMENT_ID])


def _validate_pages(gx: Any, entity: str, shard: str, pages: Iterator["pd.DataFrame"], suite: list[Any]) -> SuiteResult:
    started = time.perf_counter()
    context = _context(gx)
    definition = (
        context.data_sources.add_pandas(name="firestore")
        .add_dataframe_asset(name=entity)
        .add_batch_definition_whole_dataframe("page")
    )
    expectations = gx.ExpectationSuite(name=entity, expectations=suite)
    tallies: dict[str, _Tally] = {}
    rows = count = 0
    for frame in pages:
        count += 1
        rows += len(frame)
        batch = definition.get_batch(batch_parameters={"dataframe": frame})
        _tally(batch.validate(expectations, result_format=RESULT_FORMAT), tallies)
    return _result(entity, shard, suite, tallies, rows, count, started)


def run_suite(
    entity: str,
    partition_key: str,
    *,
    database_url: str | None = None,
    firestore: Any = None,
    page_size: int = PAGE_SIZE,
    today: date | None = None,
) -> SuiteResult:
    """Validate one target partition with the entity's suite.

    Clinical entities need ``database_url`` (the clinical target's SQLAlchemy URL, e.g.
    ``DatabaseResource.url``); app entities need ``firestore`` (a ``google.cloud.firestore.Client``).
    Raises ``ValueError`` for an unknown entity, a bad partition key or a missing target, and
    :class:`ExpectationsError` when GX itself fails; a failed expectation is a result, not an error.
    """
    if entity not in ENTITIES:
        raise ValueError(f"unknown entity; expected one of {', '.join(ENTITIES)}")
    problem = _partition_problem(entity, partition_key)
    if problem is not None:
        raise ValueError(problem)
    if page_size < 1:
        raise ValueError("page_size must be positive")
    clinical = entity in CLINICAL_ENTITIES
    if clinical and not database_url:
        raise ValueError("a clinical entity needs database_url")
    if not clinical and firestore is None:
        raise ValueError("an app entity needs a firestore client")
    gx = _gx()
    suite = suites(today)[entity]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if clinical:
                return _validate_sql(gx, entity, partition_key, str(database_url), suite)
            frames = app_pages(firestore, entity, partition_key, columns_of(suite), page_size)
            return _validate_pages(gx, entity, partition_key, frames, suite)
    except Exception as error:  # GX's messages may quote queries or URLs: only the type goes out
        raise ExpectationsError(
            f"expectations of {entity} {partition_key} could not run ({type(error).__name__})"
        ) from None
