"""The ``expectations`` suites (DESIGN §7): on rows written straight into a real PostgreSQL target and
documents written straight into the Firestore emulator, good data passes every expectation and one
bad record fails exactly the expectation it breaks, with an unexpected count of 1 and no value in the
metadata."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, insert

from checks import expectations as ex
from resources.firestore import FirestoreResource
from worker import app_rules, rules, schema

TODAY = date(2026, 1, 15)
NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


def _hash(*parts: Any) -> str:
    return rules.content_hash({"parts": [str(part) for part in parts]})


# --- the suites themselves -------------------------------------------------------------------


@pytest.fixture(scope="module")
def suites() -> dict[str, list[Any]]:
    return ex.suites(TODAY)


def test_one_suite_per_entity_reading_only_columns_the_target_has(suites: dict[str, list[Any]]) -> None:
    assert set(suites) == set(ex.ENTITIES) == {"patients", "encounters", "users", "files", "filters"}
    for entity in ex.CLINICAL_ENTITIES:
        assert set(ex.columns_of(suites[entity])) <= set(schema.TARGETS[entity].c.keys())
    for entity in ex.APP_ENTITIES:
        known = {*app_rules.APP_ENTITIES[entity].fields, *app_rules.BOOKKEEPING, ex.DOCUMENT_ID}
        assert set(ex.columns_of(suites[entity])) <= known
    assert "password_hash" not in ex.columns_of(suites["users"])  # a secret is never even read
    names = [ex.expectation_name(e.configuration) for suite in suites.values() for e in suite]
    assert "expect_column_values_to_be_in_set(sex)" in names
    for suite in suites.values():  # names identify an expectation within its suite
        own = [ex.expectation_name(e.configuration) for e in suite]
        assert len(own) == len(set(own))


def test_value_sets_are_exactly_what_the_rules_produce() -> None:
    assert {rules.normalize_sex(code) for code in ("m", "F", "x", "?", None)} == set(ex.SEXES)
    kinds = {rules.normalize_encounter_kind(kind) for kind in (*rules.ENCOUNTER_KINDS, "CONTROL", "visita")}
    assert kinds == set(ex.ENCOUNTER_KINDS)
    statuses = {rules.normalize_encounter_status(status) for status in (*rules.ENCOUNTER_STATUSES, None)}
    assert statuses == set(ex.ENCOUNTER_STATUSES)
    assert {rules.normalize_document_type(code) for code in ex.DOCUMENT_TYPES} == set(ex.DOCUMENT_TYPES)


@pytest.mark.parametrize("raw", ["J459", "j45.9", "A00", "Z99.12AB", " c 34 1 "])
def test_the_stored_icd10_form_matches_what_the_rules_store(raw: str) -> None:
    stored = rules.normalize_icd10(raw)
    assert stored is not None and re.search(ex.ICD10_STORED, stored)


@pytest.mark.parametrize("bad", ["J459", "J45.", "j45.9", "J45.9\n", "J45.99999"])
def test_the_stored_icd10_form_refuses_what_the_rules_never_store(bad: str) -> None:
    assert not re.search(ex.ICD10_STORED, bad)


def test_whole_value_patterns_refuse_a_trailing_newline() -> None:
    digest = _hash("x")
    assert re.search(ex.SHA256_HEX, digest)
    assert not re.search(ex.SHA256_HEX, digest + "\n")
    assert not re.search(ex.SHA256_HEX, digest.upper())
    assert re.search(ex.NATIONAL_ID, rules.normalize_national_id("12.345-6 ab"))
    assert re.search(ex.PHONE, rules.normalize_phone("+57 (300) 123") or "")
    assert re.search(ex.UUID_CANONICAL, app_rules.normalize_file_id(uuid.uuid4().hex))


@pytest.mark.parametrize(("entity", "key"), [("patients", "hsj"), ("patients", "HSJ'--"), ("users", "shard-16")])
def test_a_bad_partition_key_is_refused_without_being_echoed(entity: str, key: str) -> None:
    with pytest.raises(ValueError) as raised:
        ex.run_suite(entity, key, database_url="postgresql+psycopg://nobody@127.0.0.1:1/x", firestore=object())
    assert key not in str(raised.value)


def test_an_unknown_entity_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown entity"):
        ex.run_suite("sistemas", "HSJ", database_url="sqlite://")


# --- clinical: PostgreSQL ----------------------------------------------------------------------


def _patient(sistema: str, legacy_id: int, **changes: Any) -> dict[str, Any]:
    row = {
        "sistema": sistema,
        "legacy_id": legacy_id,
        "national_id": f"CC{legacy_id:06d}",
        "document_type": "CC",
        "given_name": "Ana",
        "family_name": "Pérez",
        "birth_date": date(1980, 5, 17),
        "sex": "female",
        "email": f"ana{legacy_id}@example.org",
        "phone": "+573001234567",
        "practitioner_id": 12,
        "source_updated_at": NOW,
        "content_hash": _hash("patient", sistema, legacy_id),
        "run_id": "run-1",
        "migrated_at": NOW,
    }
    return {**row, **changes}


def _encounter(sistema: str, legacy_id: int, patient_id: int, **changes: Any) -> dict[str, Any]:
    row = {
        "sistema": sistema,
        "legacy_id": legacy_id,
        "patient_id": patient_id,
        "practitioner_id": 12,
        "occurred_at": NOW,
        "kind": "consultation",
        "icd10": "J45.9",
        "notes": "control",
        "status": "closed",
        "source_updated_at": NOW,
        "content_hash": _hash("encounter", sistema, legacy_id),
        "run_id": "run-1",
        "migrated_at": NOW,
    }
    return {**row, **changes}


def _insert(engine: Engine, table: Any, rows: list[dict[str, Any]]) -> list[int]:
    with engine.begin() as conn:
        return [conn.execute(insert(table).returning(table.c.id), row).scalar_one() for row in rows]


@pytest.fixture
def target(postgres_url: str) -> Iterator[tuple[str, Engine]]:
    engine = schema.make_engine(postgres_url)
    schema.create_schemas(engine, schema.target_metadata)
    patient_ids = _insert(
        engine,
        schema.patients,
        [
            _patient("HSJ", 1),
            _patient("HSJ", 2, sex="male", document_type=None, email=None, phone=None, birth_date=None),
            _patient("HSJ", 3, sex="unknown", birth_date=TODAY),
            # other sistemas are outside the partition, however bad
            _patient("CLN01", 1, sex="zzz"),
        ],
    )
    _insert(
        engine,
        schema.encounters,
        [
            _encounter("HSJ", 10, patient_ids[0]),
            _encounter("HSJ", 11, patient_ids[1], icd10=None, kind="other", status="unknown"),
            _encounter("HSJ", 12, patient_ids[2], icd10="A00"),
            _encounter("CLN01", 10, patient_ids[3], icd10="J459"),
        ],
    )
    yield postgres_url, engine
    engine.dispose()


def _no_value_in(metadata: dict[str, Any], *values: str) -> None:
    text = json.dumps(metadata, default=str)
    for value in values:
        assert value not in text


@pytest.mark.integration
def test_good_clinical_rows_pass_every_expectation(target: tuple[str, Engine], suites: dict[str, list[Any]]) -> None:
    url, _ = target
    for entity in ("patients", "encounters"):
        result = ex.run_suite(entity, "HSJ", database_url=url, today=TODAY)
        assert result.passed, result.failed
        assert result.rows == 3
        assert result.metadata["rows_validated"] == 3
        assert result.metadata["evaluated_expectations"] == len(suites[entity])
        assert result.metadata["failed_expectations"] == {}
        assert result.severity == "WARN"


@pytest.mark.integration
def test_one_bad_patient_fails_exactly_its_expectation(target: tuple[str, Engine]) -> None:
    url, engine = target
    _insert(engine, schema.patients, [_patient("HSJ", 4, sex="zzz")])
    result = ex.run_suite("patients", "HSJ", database_url=url, today=TODAY)
    assert not result.passed
    assert result.rows == 4
    assert dict(result.failed) == {"expect_column_values_to_be_in_set(sex)": 1}
    assert result.metadata["failed_expectations"] == {"expect_column_values_to_be_in_set(sex)": 1}
    _no_value_in(result.metadata, "zzz", "CC000004", "ana4@example.org")


@pytest.mark.integration
def test_a_future_birth_date_and_a_shouting_email_are_caught(target: tuple[str, Engine]) -> None:
    url, engine = target
    _insert(
        engine,
        schema.patients,
        [_patient("HSJ", 5, birth_date=date(2026, 1, 16)), _patient("HSJ", 6, email="Ana6@Example.org")],
    )
    result = ex.run_suite("patients", "HSJ", database_url=url, today=TODAY)
    assert dict(result.failed) == {
        "expect_column_values_to_be_between(birth_date)": 1,
        "expect_column_values_to_not_match_regex(email)": 1,
    }
    _no_value_in(result.metadata, "2026-01-16", "Ana6@Example.org")


@pytest.mark.integration
def test_one_malformed_icd10_fails_exactly_its_expectation(target: tuple[str, Engine]) -> None:
    url, engine = target
    (patient_id,) = _insert(engine, schema.patients, [_patient("HSJ", 7)])
    _insert(engine, schema.encounters, [_encounter("HSJ", 13, patient_id, icd10="J459")])
    result = ex.run_suite("encounters", "HSJ", database_url=url, today=TODAY)
    assert dict(result.failed) == {"expect_column_values_to_match_regex(icd10)": 1}
    assert result.rows == 4
    _no_value_in(result.metadata, "J459")


@pytest.mark.integration
def test_an_empty_partition_passes_with_no_rows(target: tuple[str, Engine]) -> None:
    url, _ = target
    result = ex.run_suite("encounters", "NOPE", database_url=url, today=TODAY)
    assert result.passed and result.rows == 0


@pytest.mark.integration
def test_an_unreachable_target_is_an_error_without_its_url() -> None:
    url = "postgresql+psycopg://someone:s3cret@127.0.0.1:1/nowhere"
    with pytest.raises(ex.ExpectationsError) as raised:
        ex.run_suite("patients", "HSJ", database_url=url, today=TODAY)
    assert "s3cret" not in str(raised.value) and raised.value.__cause__ is None


# --- app: the Firestore emulator ---------------------------------------------------------------


def _bookkeeping(shard: str, legacy_id: int) -> dict[str, Any]:
    return {"shard": shard, "content_hash": _hash("app", legacy_id), "run_id": "run-1", "migrated_at": NOW}


def _user(legacy_id: int, **changes: Any) -> dict[str, Any]:
    shard = app_rules.shard_key(app_rules.shard_of(legacy_id))
    document = {
        "legacy_id": legacy_id,
        "username": f"user{legacy_id}",
        "email": f"user{legacy_id}@example.org",
        "first_name": "Ana",
        "last_name": None,
        "is_active": True,
        "is_staff": False,
        "is_superuser": False,
        "date_joined": NOW,
        "last_login": None,
        "password_hash": "pbkdf2_sha256$1$salt$hash",
        **_bookkeeping(shard, legacy_id),
    }
    return {**document, **changes}


def _file(legacy_id: int, user_id: int, **changes: Any) -> dict[str, Any]:
    file_id = str(uuid.UUID(int=legacy_id))
    document = {
        "legacy_id": legacy_id,
        "user_id": user_id,
        "file_id": file_id,
        "file_name": "list.csv",
        "size_bytes": 120,
        "sha256": _hash("blob", legacy_id),
        "uploaded_at": NOW,
        "system_tags": ["csv"],
        "user_tags": [],
        "metadata": {"rows": 3},
        "blob_url": f"file:///blobs/files/{user_id}/{file_id}",
        **_bookkeeping(app_rules.shard_key(app_rules.shard_of(user_id)), legacy_id),
    }
    return {**document, **changes}


def _filter(legacy_id: int, user_id: int, file_id: int | None, **changes: Any) -> dict[str, Any]:
    document = {
        "legacy_id": legacy_id,
        "user_id": user_id,
        "file_id": file_id,
        "name": "mine",
        "definition": {"column": "a", "op": "eq"},
        "created_at": NOW,
        "updated_at": NOW,
        **_bookkeeping(app_rules.shard_key(app_rules.shard_of(user_id)), legacy_id),
    }
    return {**document, **changes}


USERS = (3, 19, 35)  # all in shard-03


@pytest.fixture
def firestore(firestore_emulator: str, firestore_project: str) -> Any:
    client = FirestoreResource(project=firestore_project, emulator_host=firestore_emulator).client()
    batch = client.batch()
    for legacy_id in USERS:
        batch.set(client.document(f"users/{legacy_id}"), _user(legacy_id))
    for legacy_id, user_id in ((100, 3), (101, 19), (102, 35)):
        batch.set(client.document(f"files/{legacy_id}"), _file(legacy_id, user_id))
    for legacy_id, user_id, file_id in ((200, 3, 100), (201, 19, None), (202, 35, 102)):
        batch.set(client.document(f"filters/{legacy_id}"), _filter(legacy_id, user_id, file_id))
    batch.set(client.document("users/4"), _user(4, username=None))  # another shard: not validated
    batch.commit()
    return client


@pytest.mark.integration
def test_good_documents_pass_every_expectation_page_by_page(firestore: Any, suites: dict[str, list[Any]]) -> None:
    for entity in ("users", "files", "filters"):
        result = ex.run_suite(entity, "shard-03", firestore=firestore, page_size=2)
        assert result.passed, (entity, result.failed)
        assert (result.rows, result.pages) == (3, 2)
        assert result.metadata["evaluated_expectations"] == len(suites[entity])
    empty = ex.run_suite("users", "shard-05", firestore=firestore)
    assert empty.passed and (empty.rows, empty.pages) == (0, 0)


@pytest.mark.integration
def test_a_legacy_id_repeated_on_another_page_is_caught(firestore: Any) -> None:
    # pages by document id: [19, 3] [35, 51]; 51 claims legacy id 19, which is on the first page
    firestore.document("users/51").set({**_user(51), "legacy_id": 19})
    result = ex.run_suite("users", "shard-03", firestore=firestore, page_size=2)
    assert (result.rows, result.pages) == (4, 2)
    assert dict(result.failed) == {"expect_column_pair_values_to_be_equal(legacy_id,document_id)": 1}


@pytest.mark.integration
def test_one_bad_file_fails_exactly_its_expectations(firestore: Any) -> None:
    shouting = _hash("blob", 103).upper()
    firestore.document("files/103").set(_file(103, 51, sha256=shouting))
    firestore.document("files/104").set(_file(104, 67, size_bytes=-1))
    result = ex.run_suite("files", "shard-03", firestore=firestore, page_size=2)
    assert result.rows == 5
    assert dict(result.failed) == {
        "expect_column_values_to_match_regex(sha256)": 1,
        "expect_column_values_to_be_between(size_bytes)": 1,
    }
    _no_value_in(result.metadata, shouting, "-1")


@pytest.mark.integration
def test_a_document_missing_a_field_fails_not_null(firestore: Any) -> None:
    document = _filter(203, 51, None)
    del document["definition"]
    firestore.document("filters/203").set(document)
    result = ex.run_suite("filters", "shard-03", firestore=firestore)
    assert dict(result.failed) == {"expect_column_values_to_not_be_null(definition)": 1}
