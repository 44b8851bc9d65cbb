"""``clinic-migrate verify``: the clinical coverage and integrity checks, computed on the legacy host.

A sistema is migrated by the real worker (Dagster → sshd → worker → MariaDB → PostgreSQL), then
verified clean, then tampered with one way at a time — target, source, quarantine — each tampering
undone before the next: exactly the expected finding, with the tampered record's legacy id, and the
other check untouched. The same outcomes come back through the worker's Pipes when an asset check
runs it over SSH. Expected numbers come from the generator's tally, not from the rules under test.
"""

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import date
from typing import Any

import numpy as np
import polars as pl
import pytest
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetSelection,
    Definitions,
    define_asset_job,
    materialize,
)
from sqlalchemy import Engine, insert, select, text

from checks import factories
from demo.databases import MARIADB_ADMIN, POSTGRES_ADMIN
from demo.legacy_data import generate
from demo.sshd import SSHServer
from migration_assets import registry
from migration_assets.clinical.assets import encounters, patients
from resources.errors import Category, MigrationError
from resources.policy import MigrationPolicy
from resources.ssh import SSHResource
from resources.worker import raise_for_exit
from worker import batch, rules, schema
from worker.engine import Migration
from worker.params import RunParameters
from worker.source import legacy_datetime, legacy_datetimes
from worker.verify import Report
from worker.verify_clinical import ClaimedDocuments, MigrationSettings, migration_settings, verify_partition

from .conftest import WORKER_COMMAND, _fresh_database
from .test_clinical import Clinical

pytestmark = pytest.mark.integration
MAPPING = {"pract_source": 101, "pract_target": 900}  # HSJ's practitioners are 101–110


# --- a migrated sistema, shared by the tamperings (each undone) ----------------------------------


@pytest.fixture(scope="module")
def migrated(sshd: SSHServer) -> Iterator[Clinical]:
    """HSJ's patients and encounters migrated by the worker over SSH, with a practitioner mapping."""
    legacy_urls = _fresh_database(MARIADB_ADMIN, "legacy")
    target_urls = _fresh_database(POSTGRES_ADMIN, "clinical")
    clinical = Clinical(sshd, next(legacy_urls), next(target_urls), patients_per_sistema=150, encounters=3)
    result = clinical.materialize("HSJ", **MAPPING)
    assert result.success
    yield clinical
    for urls in (legacy_urls, target_urls):
        next(urls, None)  # drops the database


def verify(clinical: Clinical, entity: str, sistema: str = "HSJ", **kwargs: Any) -> Report:
    return verify_partition(entity, sistema, clinical.legacy, clinical.target, clinical.target, **kwargs)


MIN_COVERAGE = 0.5  # the generator quarantines ~10 % of the rows on purpose: below the default 95 %


def outcomes(report: Report) -> dict[str, tuple[bool, str, dict[str, Any]]]:
    made = report.outcomes(["coverage", "integrity"], MIN_COVERAGE)
    return {o.check: (o.passed, o.severity, o.metadata) for o in made}


def assert_clean(report: Report) -> None:
    found = outcomes(report)
    assert found["coverage"][:2] == (True, "ERROR") and found["integrity"][:2] == (True, "ERROR"), found


@pytest.mark.parametrize("entity", ["patients", "encounters"])
def test_a_clean_partition_passes_with_the_generators_counts(migrated: Clinical, entity: str) -> None:
    report = verify(migrated, entity)
    expected = migrated.tally.expected("HSJ", entity)
    assert (report.eligible, report.migrated, report.stored) == (
        expected["eligible"],
        expected["migrated"],
        expected["migrated"],
    )
    assert dict(report.quarantined_by_reason) == expected["quarantined"]
    assert report.missing.count == 0 and report.integrity_failures == 0
    found = outcomes(report)
    assert found["coverage"][2]["coverage_pct"] == round(100 * expected["migrated"] / expected["eligible"], 3)
    assert report.outcomes(["coverage"], min_coverage=0.99)[0][1:3] == (False, "WARN")


def test_the_settings_are_those_of_the_latest_finished_real_run(migrated: Clinical) -> None:
    settings = migration_settings(migrated.target, "patients", "HSJ")
    assert settings.mapping == rules.PractitionerMapping(101, 900) and settings.today == date.today()
    # Without the mapping the run used, every migrated patient of practitioner 101 differs, and only they.
    with migrated.target.connect() as conn:
        mapped = list(
            conn.execute(
                text("SELECT legacy_id FROM clinical.patients WHERE practitioner_id = 900 ORDER BY legacy_id")
            ).scalars()
        )
    report = verify(migrated, "patients", settings=MigrationSettings(date.today()))
    assert mapped and report.mismatched.count == len(mapped) and report.mismatched.sample == mapped[:20]
    assert report.integrity_failures == len(mapped) and report.missing.count == 0
    # With another day, birth dates after it are INVALID_BIRTH_DATE: stored, so unexpected.
    earlier = MigrationSettings(date(1990, 1, 1), settings.mapping)
    with migrated.target.connect() as conn:
        later_born = conn.execute(
            text("SELECT count(*) FROM clinical.patients WHERE sistema = 'HSJ' AND birth_date > '1990-01-01'")
        ).scalar()
    assert later_born and verify(migrated, "patients", settings=earlier).unexpected.count == later_born
    # A later dry run with another mapping changes nothing: it is not a finished real run's.
    dry = migrated.materialize("HSJ", (patients,), dry_run=True, pract_source=102, pract_target=901)
    assert dry.success
    assert migration_settings(migrated.target, "patients", "HSJ").mapping == rules.PractitionerMapping(101, 900)
    assert_clean(verify(migrated, "patients"))


def test_a_sistema_never_migrated_misses_every_eligible_record(migrated: Clinical) -> None:
    report = verify(migrated, "patients", "CLN01")
    expected = migrated.tally.expected("CLN01", "patients")
    assert report.missing.count == expected["eligible"] and report.migrated == 0
    assert report.outcomes(["coverage"])[0][1:3] == (False, "ERROR")
    with migrated.legacy.connect() as conn:
        first = conn.execute(
            text("SELECT id FROM pacientes WHERE sistema = 'CLN01' AND eliminado = 0 ORDER BY id LIMIT 20")
        ).scalars()
        assert report.missing.sample == list(first)


# --- tamperings ----------------------------------------------------------------------------------

Undo = Callable[[], None]
TABLES = {"patients": "clinical.patients", "encounters": "clinical.encounters"}
SOURCES = {"patients": "pacientes", "encounters": "atenciones"}


def _one(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).one()


def _run(engine: Engine, sql: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql), params)


def change_target_field(c: Clinical, entity: str) -> tuple[int, Undo]:
    """A stored field changed; its stored content_hash left as it was."""
    column = "given_name" if entity == "patients" else "notes"
    table = TABLES[entity]
    legacy_id, before = _one(
        c.target, f"SELECT legacy_id, {column} FROM {table} WHERE sistema = 'HSJ' AND {column} IS NOT NULL "
        "ORDER BY legacy_id OFFSET 7 LIMIT 1",
    )  # fmt: skip
    update = f"UPDATE {table} SET {column} = :v WHERE sistema = 'HSJ' AND legacy_id = :i"
    _run(c.target, update, v=before + "x", i=legacy_id)
    return legacy_id, lambda: _run(c.target, update, v=before, i=legacy_id)


def delete_target_row(c: Clinical, entity: str) -> tuple[int, Undo]:
    table = schema.TARGETS[entity]
    with c.target.begin() as conn:
        row = dict(
            conn.execute(select(table).where(table.c.sistema == "HSJ").order_by(table.c.legacy_id).offset(11).limit(1))
            .mappings()
            .one()
        )
        conn.execute(table.delete().where(table.c.id == row["id"]))

    def undo() -> None:
        with c.target.begin() as conn:
            conn.execute(insert(table).values(**row))

    return row["legacy_id"], undo


def add_target_row(c: Clinical, entity: str) -> tuple[int, Undo]:
    """A stored record no eligible legacy row accounts for."""
    table = TABLES[entity]
    extra = _one(c.target, f"SELECT max(legacy_id) + 1000 FROM {table}")[0]
    columns = [col.name for col in schema.TARGETS[entity].columns if col.name != "id"]
    picked = ", ".join(
        ":extra" if n == "legacy_id" else "national_id || 'X'" if n == "national_id" else n for n in columns
    )
    _run(
        c.target,
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT {picked} FROM {table} "
        "WHERE sistema = 'HSJ' ORDER BY legacy_id LIMIT 1",
        extra=extra,
    )
    return extra, lambda: _run(c.target, f"DELETE FROM {table} WHERE legacy_id = :extra", extra=extra)


def point_encounter_nowhere(c: Clinical, entity: str) -> tuple[int, Undo]:
    """An encounter whose patient_id names no patient of the target."""
    legacy_id, before = _one(
        c.target, "SELECT legacy_id, patient_id FROM clinical.encounters WHERE sistema = 'HSJ' ORDER BY legacy_id "
        "OFFSET 3 LIMIT 1",
    )  # fmt: skip
    nowhere = _one(c.target, "SELECT max(id) + 1000 FROM clinical.patients")[0]
    update = "UPDATE clinical.encounters SET patient_id = :p WHERE sistema = 'HSJ' AND legacy_id = :i"
    _run(c.target, update, p=nowhere, i=legacy_id)
    return legacy_id, lambda: _run(c.target, update, p=before, i=legacy_id)


def update_source_row(c: Clinical, entity: str) -> tuple[int, Undo]:
    """A migrated legacy row changed after the migration (still eligible, still passing §6)."""
    table, column = SOURCES[entity], "apellidos" if entity == "patients" else "notas"
    migrated_id = _one(
        c.target, f"SELECT legacy_id FROM {TABLES[entity]} WHERE sistema = 'HSJ' ORDER BY legacy_id OFFSET 5 LIMIT 1"
    )[0]
    before, stamp = _one(c.legacy, f"SELECT {column}, actualizado_en FROM {table} WHERE id = :i", i=migrated_id)
    _run(
        c.legacy, f"UPDATE {table} SET {column} = CONCAT(COALESCE({column}, ''), ' Ruiz') WHERE id = :i", i=migrated_id
    )
    restore = f"UPDATE {table} SET {column} = :v, actualizado_en = :s WHERE id = :i"
    return migrated_id, lambda: _run(c.legacy, restore, v=before, s=stamp, i=migrated_id)


def delete_quarantine_row(c: Clinical, entity: str) -> tuple[int, Undo]:
    q = schema.quarantine
    with c.target.begin() as conn:
        row = dict(
            conn.execute(
                select(q).where(q.c.entity == entity, q.c.partition_key == "HSJ").order_by(q.c.legacy_id).limit(1)
            )
            .mappings()
            .one()
        )
        conn.execute(q.delete().where(q.c.id == row["id"]))

    def undo() -> None:
        with c.target.begin() as conn:
            conn.execute(insert(q).values(**row))

    return row["legacy_id"], undo


# (tampering, entity, the check that fails, its severity, the finding that names the record)
TAMPERINGS = [
    (change_target_field, "patients", "integrity", "ERROR", "mismatched"),
    (change_target_field, "encounters", "integrity", "ERROR", "mismatched"),
    (delete_target_row, "patients", "coverage", "ERROR", "missing"),
    (delete_target_row, "encounters", "coverage", "ERROR", "missing"),
    (add_target_row, "patients", "integrity", "ERROR", "unexpected"),
    (add_target_row, "encounters", "integrity", "ERROR", "unexpected"),
    (point_encounter_nowhere, "encounters", "integrity", "ERROR", "dangling_patient"),
    (update_source_row, "patients", "integrity", "ERROR", "mismatched"),
    (update_source_row, "encounters", "integrity", "ERROR", "mismatched"),
    (delete_quarantine_row, "patients", "coverage", "ERROR", "missing"),
    (delete_quarantine_row, "encounters", "coverage", "ERROR", "missing"),
]


def assert_only(report: Report, check: str, severity: str, finding: str, legacy_id: int) -> None:
    """``check`` fails with exactly one ``finding``, naming ``legacy_id``; nothing else is found."""
    found = outcomes(report)
    passed, got_severity, metadata = found[check]
    assert (passed, got_severity) == (False, severity), found
    assert metadata[finding] == 1 and metadata[f"{finding}_sample_ids"] == [legacy_id], metadata
    other = "integrity" if check == "coverage" else "coverage"
    assert found[other][:2] == (True, "ERROR"), found[other]
    if check == "integrity":
        assert metadata["failures"] == 1
    else:
        assert found["integrity"][2]["failures"] == 0


@pytest.mark.parametrize(
    ("tamper", "entity", "check", "severity", "finding"),
    TAMPERINGS,
    ids=[f"{t.__name__}-{e}" for t, e, *_ in TAMPERINGS],
)
def test_each_tampering_is_found_exactly(
    migrated: Clinical, tamper: Callable[[Clinical, str], tuple[int, Undo]], entity: str, check: str, severity: str,
    finding: str,
) -> None:  # fmt: skip
    assert_clean(verify(migrated, entity))
    legacy_id, undo = tamper(migrated, entity)
    try:
        assert_only(verify(migrated, entity), check, severity, finding, legacy_id)
    finally:
        undo()
    assert_clean(verify(migrated, entity))


# The target's unique constraints, as worker/schema.py creates them: dropped to store a record twice.
UNIQUE = {
    "patients": {
        "uq_patients_legacy": "UNIQUE (sistema, legacy_id)",
        "uq_patients_national_id": "UNIQUE (sistema, national_id) DEFERRABLE INITIALLY DEFERRED",
    },
    "encounters": {"uq_encounters_legacy": "UNIQUE (sistema, legacy_id)"},
}


@pytest.mark.parametrize("entity", ["patients", "encounters"])
def test_a_record_stored_twice_is_read_twice_across_page_breaks(migrated: Clinical, entity: str) -> None:
    """Verification reads the target by legacy id alone only while PostgreSQL holds (sistema,
    legacy_id) unique: with the constraint dropped and a record stored twice, every page size — a
    page break between the two copies included — reads both, and integrity names the record."""
    from worker.verify_clinical import target_frames

    table, constraints = TABLES[entity], UNIQUE[entity]
    assert schema.unique_within(migrated.target, schema.TARGETS[entity], ("sistema", "legacy_id"))
    legacy_id = _one(
        migrated.target, f"SELECT legacy_id FROM {table} WHERE sistema = 'HSJ' ORDER BY legacy_id OFFSET 9 LIMIT 1"
    )[0]
    columns = ", ".join(col.name for col in schema.TARGETS[entity].columns if col.name != "id")
    for name in constraints:
        _run(migrated.target, f"ALTER TABLE {table} DROP CONSTRAINT {name}")
    _run(
        migrated.target,
        f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table} WHERE sistema = 'HSJ' AND legacy_id = :i",
        i=legacy_id,
    )
    try:
        assert not schema.unique_within(migrated.target, schema.TARGETS[entity], ("sistema", "legacy_id"))
        for page in (1, 2, 3, 10):
            keys = pl.concat(target_frames(entity, "HSJ", migrated.target, page=page))["key"]
            assert keys.to_list().count(legacy_id) == 2, page
            assert keys.is_sorted() and keys.n_unique() == keys.len() - 1, page
        assert_only(verify(migrated, entity), "integrity", "ERROR", "duplicates", legacy_id)
    finally:
        _run(
            migrated.target,
            f"DELETE FROM {table} WHERE id = (SELECT max(id) FROM {table} WHERE sistema = 'HSJ' AND legacy_id = :i)",
            i=legacy_id,
        )
        for name, definition in constraints.items():
            _run(migrated.target, f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
    assert schema.unique_within(migrated.target, schema.TARGETS[entity], ("sistema", "legacy_id"))
    assert_clean(verify(migrated, entity))


def test_uniqueness_is_read_from_the_catalog(postgres_url: str) -> None:
    """:func:`worker.schema.unique_within`: a valid unique index on some of the columns holds them
    unique; a partial one, a plain one or one on an expression does not."""
    engine = schema.make_engine(postgres_url)
    table = schema.TARGETS["patients"]
    try:
        schema.create_schemas(engine, schema.target_metadata)
        with engine.begin() as conn:
            for name in UNIQUE["patients"]:
                conn.execute(text(f"ALTER TABLE clinical.patients DROP CONSTRAINT {name}"))
        cases = [
            ("CREATE INDEX ix_plain ON clinical.patients (sistema, legacy_id)", False),
            ("CREATE UNIQUE INDEX ix_partial ON clinical.patients (sistema, legacy_id) WHERE sex = 'F'", False),
            ("CREATE UNIQUE INDEX ix_expression ON clinical.patients (sistema, (legacy_id + 1))", False),
            ("CREATE UNIQUE INDEX ix_wider ON clinical.patients (sistema, legacy_id, email)", False),
            ("CREATE UNIQUE INDEX ix_alone ON clinical.patients (legacy_id)", True),
        ]
        for ddl, unique in cases:
            with engine.begin() as conn:
                conn.execute(text(ddl))
            assert schema.unique_within(engine, table, ("sistema", "legacy_id")) is unique, ddl
        assert not schema.unique_within(schema.make_engine("sqlite://"), table, ("sistema", "legacy_id"))
    finally:
        engine.dispose()


def test_a_patient_deleted_in_the_target_orphans_its_encounters(migrated: Clinical) -> None:
    """The encounters' source side looks its patients up in the target, as the migration does: those
    of a patient that is gone are no longer expected, so the stored ones are unexpected and dangling."""
    patient = _one(
        migrated.target,
        "SELECT p.legacy_id FROM clinical.patients p JOIN clinical.encounters e ON e.patient_id = p.id "
        "WHERE p.sistema = 'HSJ' ORDER BY p.legacy_id LIMIT 1",
    )[0]
    with migrated.target.connect() as conn:
        theirs = list(
            conn.execute(
                text(
                    "SELECT e.legacy_id FROM clinical.encounters e JOIN clinical.patients p ON p.id = e.patient_id "
                    "WHERE p.legacy_id = :p AND p.sistema = 'HSJ' ORDER BY e.legacy_id"
                ),
                {"p": patient},
            ).scalars()
        )
    _, undo = _delete_patient(migrated, patient)
    try:
        report = verify(migrated, "encounters")
        assert report.unexpected.sample == theirs and report.problems["dangling:patient"].sample == theirs
        assert report.mismatched.count == 0 and report.missing.count == 0
    finally:
        undo()
    assert_clean(verify(migrated, "encounters"))


def _delete_patient(c: Clinical, legacy_id: int) -> tuple[int, Undo]:
    table = schema.patients
    with c.target.begin() as conn:
        row = dict(conn.execute(select(table).where(table.c.legacy_id == legacy_id)).mappings().one())
        conn.execute(table.delete().where(table.c.id == row["id"]))

    def undo() -> None:
        with c.target.begin() as conn:
            conn.execute(insert(table).values(**row))

    return legacy_id, undo


# --- through Dagster, sshd and Pipes, as the checks run it --------------------------------------


def verification_checks(entity: str) -> Any:
    """Both verification checks of ``entity`` as the definitions make them (checks/factories.py)."""
    return factories.verification_checks(registry.entity(entity))


def resources_for(clinical: Clinical) -> dict[str, Any]:
    return {**clinical.resources(), "policy": MigrationPolicy(min_coverage=MIN_COVERAGE)}


def evaluations(result: Any) -> dict[str, tuple[bool, str, dict[str, Any]]]:
    found = {}
    for evaluation in result.get_asset_check_evaluations():
        metadata = {k: v.value for k, v in evaluation.metadata.items()}
        found[evaluation.check_name] = (evaluation.passed, evaluation.severity.value, metadata)
    return found


def checks_alone(clinical: Clinical, definitions: list[Any], selection: AssetSelection) -> Any:
    """Checks run alone for HSJ, as the UI launches them: a job of checks, the partition as a tag."""
    job = define_asset_job("checks_alone", selection=selection)
    defs = Definitions(
        assets=definitions[:2], asset_checks=definitions[2:], jobs=[job], resources=resources_for(clinical)
    )
    return defs.resolve_job_def("checks_alone").execute_in_process(
        instance=clinical.instance, tags={"dagster/partition": "HSJ"}, raise_on_error=False
    )


@pytest.fixture
def fresh(sshd: SSHServer, mariadb_url: str, postgres_url: str) -> Clinical:
    return Clinical(sshd, mariadb_url, postgres_url, patients_per_sistema=80, encounters=2)


def test_the_checks_run_the_worker_over_ssh_and_pipes_in_the_assets_run_and_alone(fresh: Clinical) -> None:
    patient_checks, encounter_checks = verification_checks("patients"), verification_checks("encounters")
    everything = [patients, encounters, patient_checks, encounter_checks]
    run_config = {"ops": {a: {"config": {"usuario": "ana", **MAPPING}} for a in ("patients", "encounters")}}
    # In the run that migrates the partition: the checks see what the assets wrote.
    result = materialize(
        everything, partition_key="HSJ", resources=resources_for(fresh), instance=fresh.instance, run_config=run_config
    )
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert sorted((str(e.asset_key.path[-1]), e.check_name, e.passed) for e in checks) == [
        ("encounters", "coverage", True), ("encounters", "integrity", True),
        ("patients", "coverage", True), ("patients", "integrity", True),
    ]  # fmt: skip
    # The materialization carries the partition as it now stands (the asset page plots it).
    coverage = next(e for e in checks if e.asset_key == patients.key and e.check_name == "coverage")
    [made] = result.asset_materializations_for_node("patients")
    dashboard = {k: v.value for k, v in made.metadata.items()}
    assert dashboard["dagster/row_count"] == dashboard["partition_migrated"] == coverage.metadata["migrated"].value
    assert dashboard["partition_eligible"] == coverage.metadata["eligible"].value
    assert dashboard["partition_missing"] == 0 and dashboard["coverage_pct"] == coverage.metadata["coverage_pct"].value
    # Alone, after a tampering: the same outcomes as the comparison computed here, metadata and all.
    legacy_id, undo = change_target_field(fresh, "patients")
    try:
        alone = checks_alone(fresh, everything, AssetSelection.checks(patient_checks))
        failure = next(e for e in alone.all_events if e.event_type_value == "STEP_FAILURE")
        assert "blocking asset check failed" in str(failure.step_failure_data.error)  # integrity blocks
        assert not alone.asset_materializations_for_node("patients")
        here = outcomes(verify(fresh, "patients"))
        assert evaluations(alone) == here
        assert here["integrity"][2]["mismatched_sample_ids"] == [legacy_id]
        # One check alone: only it runs (the worker is asked for it alone).
        coverage = AssetSelection.checks(AssetCheckKey(AssetKey("patients"), "coverage"))
        subset = checks_alone(fresh, everything, coverage)
        assert subset.success and evaluations(subset) == {"coverage": here["coverage"]}
    finally:
        undo()


def test_a_bad_sistema_is_refused_in_one_short_line(sshd: SSHServer, mariadb_url: str, postgres_url: str) -> None:
    secrets = json.dumps({"legacy_db_url": mariadb_url, "target_db_url": postgres_url})
    argv = [WORKER_COMMAND, "verify", "--entity", "patients", "--sistema", "hsj;id", "--checks", "coverage"]
    done = subprocess.run(argv, input=secrets, capture_output=True, text=True, timeout=60, check=False)
    line = "VALIDATION_ERROR: sistema must match ^[A-Z0-9_]{2,16}$"
    assert (done.returncode, done.stdout, done.stderr.splitlines()) == (2, "", [line])
    # Over SSH, as the resource runs it: the same line, which the resource reads as the failure's category.
    ssh = SSHResource(**sshd.resource_kwargs())
    with ssh.connect() as client:
        process = ssh.start(client, argv, secrets.encode())
        lines = list(process.lines(time.monotonic() + 60))
        code = process.wait()
    stderr = [text for stream, text in lines if stream == "stderr"]
    assert (code, stderr, [text for stream, text in lines if stream == "stdout"]) == (2, [line], [])
    with pytest.raises(MigrationError) as raised:
        raise_for_exit(code, stderr)
    assert raised.value.category == Category.VALIDATION_ERROR and "sistema must match" in str(raised.value)


# --- the parts, alone ------------------------------------------------------------------------------


def test_claimed_documents_decide_duplicates_as_the_lowest_id_wins() -> None:
    """Across and within pages, against a plain set; only rows that pass the other rules claim."""
    rng = np.random.default_rng(5)
    documents = [f"D{n}" for n in rng.integers(0, 3000, size=20_000)]
    reasons = [None if r > 0.1 else "MISSING_NAME" for r in rng.random(20_000)]
    frame = pl.DataFrame(
        {
            "legacy_id": range(20_000),
            "national_id": documents,
            batch.REASON: reasons,
            batch.DETAIL: [None if r is None else "x" for r in reasons],
            batch.HASH: ["h" if r is None else None for r in reasons],
        },
        schema_overrides={batch.REASON: pl.String, batch.DETAIL: pl.String, batch.HASH: pl.String},
    )
    claims = ClaimedDocuments()
    decided = pl.concat([claims.decide(frame.slice(start, 777)) for start in range(0, frame.height, 777)])
    seen: set[str] = set()
    want = []
    for document, reason in zip(documents, reasons, strict=True):
        if reason is not None:
            want.append(reason)
        elif document in seen:
            want.append(rules.DUPLICATE_DOCUMENT)
        else:
            seen.add(document)
            want.append(None)
    assert decided[batch.REASON].to_list() == want
    lost = decided.filter(pl.col(batch.REASON) == rules.DUPLICATE_DOCUMENT)
    assert lost[batch.HASH].null_count() == lost.height and len(claims) == len(seen)
    assert claims.nbytes == 16 * len(seen)


def test_claimed_documents_tell_apart_hashes_whose_first_halves_collide() -> None:
    claims = ClaimedDocuments()
    high = np.array([5, 5, 5, 9], dtype=np.uint64)
    claims.add(high[:2], np.array([1, 2], dtype=np.uint64))
    claims.add(high[2:], np.array([3, 4], dtype=np.uint64))
    queries = np.array([5, 5, 5, 5, 9, 9, 7], dtype=np.uint64), np.array([1, 2, 3, 4, 4, 1, 1], dtype=np.uint64)
    assert claims.contains(*queries).tolist() == [True, True, True, False, True, False, False]


def test_the_fast_datetime_path_reads_exactly_what_the_general_one_does() -> None:
    values = [
        "2024-01-01 10:00:00", " 2024-01-01 10:00:00 ", "0000-00-00 00:00:00", None, "2024-01-01T10:00:00.5",
        "2024-02-30 10:00:00", "2024-01-01", "junk", "2024-01-01 10:00:00.123456", "0001-00-05 00:00:00",
        "2024-1-1 1:2:3", "", "0000-00-00", "2024-01-01 10:00:00\n", "9999-12-31 23:59:59",
    ]  # fmt: skip
    rng = np.random.default_rng(3)
    for size in (1, 2, 5, 40):
        for _ in range(30):
            picks = rng.choice(len(values), size=size)
            page = pl.DataFrame(
                {"a": [values[i] for i in picks], "b": [values[i] for i in picks[::-1]]},
                schema={"a": pl.String, "b": pl.String},
            )
            general = page.with_columns(legacy_datetime(pl.col(n)).alias(n) for n in ("a", "b"))
            assert legacy_datetimes(page, ("a", "b")).equals(general), page


def test_verification_reads_sqlite_as_in_the_demo(tmp_path: Any) -> None:
    legacy = schema.make_engine(f"sqlite:///{tmp_path}/legacy.db")
    target = schema.make_engine(f"sqlite:///{tmp_path}/clinical.db")
    tally = generate(legacy, patients_per_sistema=60, encounters_per_patient=2, sistemas=("HSJ",), seed=3)
    for entity in ("patients", "encounters"):  # before anything is migrated (no target tables yet)
        report = verify_partition(entity, "HSJ", legacy, target, target)
        assert report.missing.count == report.eligible == tally.expected("HSJ", entity)["eligible"] > 0
    for entity in ("patients", "encounters"):
        params = RunParameters(entity=entity, sistema="HSJ", usuario="ana", run_id=f"sqlite-{entity}")  # type: ignore[arg-type]
        Migration(params, legacy, target).run()
    for entity in ("patients", "encounters"):
        report = verify_partition(entity, "HSJ", legacy, target, target)
        assert_clean(report)
        assert report.eligible == tally.expected("HSJ", entity)["eligible"]
    with target.begin() as conn:
        changed = conn.execute(text("SELECT min(legacy_id) FROM patients")).scalar()
        conn.execute(text("UPDATE patients SET source_updated_at = NULL WHERE legacy_id = :i"), {"i": changed})
    assert verify_partition("patients", "HSJ", legacy, target, target).mismatched.sample == [changed]
