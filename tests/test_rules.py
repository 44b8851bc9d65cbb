"""Every §6 rule for patients and encounters, each quarantine reason, each mapping (pure logic)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from worker import rules
from worker.rules import PractitionerMapping, Quarantined

TODAY = date(2026, 11, 21)


def reason(call: Any) -> str:
    with pytest.raises(Quarantined) as caught:
        call()
    return caught.value.reason


def patient_row(**overrides: Any) -> dict[str, Any]:
    return {
        "id": 7,
        "sistema": "HSJ",
        "documento": "1.020.304",
        "tipo_documento": "cc",
        "nombres": "  ana   maría ",
        "apellidos": "Gómez",
        "fecha_nacimiento": "1980-02-29",
        "sexo": "f",
        "email": " Ana@Mail.COM ",
        "telefono": "(+57) 300-123 4567",
        "profesional_id": 12,
        "actualizado_en": datetime(2025, 1, 2, 3, 4, 5),
        **overrides,
    }


def encounter_row(**overrides: Any) -> dict[str, Any]:
    return {
        "id": 9,
        "sistema": "HSJ",
        "paciente_id": 7,
        "profesional_id": 12,
        "fecha": datetime(2025, 5, 6, 7, 8, 9),
        "tipo": " Urgencia ",
        "diagnostico": " j459 ",
        "notas": "  línea 1\n\tlínea 2 ❤️  ",
        "estado": "CERRADA",
        "actualizado_en": None,
        **overrides,
    }


@pytest.mark.parametrize(
    ("documento", "expected"),
    [("1.020.304", "1020304"), (" ab-12 3 ", "AB123"), ("pa99887766", "PA99887766"), ("x/y_z", "XYZ")],
)
def test_national_id_strips_separators_and_upper_cases(documento: str, expected: str) -> None:
    assert rules.normalize_national_id(documento) == expected


@pytest.mark.parametrize("documento", [None, "", "   ", " .-. ", "--"])
def test_empty_document_is_missing_document(documento: str | None) -> None:
    assert reason(lambda: rules.normalize_national_id(documento)) == rules.MISSING_DOCUMENT


@pytest.mark.parametrize(
    ("value", "expected"),
    [("CC", "CC"), (" ti ", "TI"), ("ce", "CE"), ("PA", "PA"), ("rc", "RC"), ("XX", None), ("", None), (None, None)],
)
def test_document_type_is_one_of_five_or_null(value: str | None, expected: str | None) -> None:
    assert rules.normalize_document_type(value) == expected


def test_names_are_trimmed_and_collapsed_case_kept() -> None:
    record = rules.transform_patient(patient_row(), today=TODAY)
    assert (record["given_name"], record["family_name"]) == ("ana maría", "Gómez")


@pytest.mark.parametrize(("nombres", "apellidos"), [(None, None), ("", "  "), ("   ", None)])
def test_both_names_empty_is_missing_name(nombres: str | None, apellidos: str | None) -> None:
    row = patient_row(nombres=nombres, apellidos=apellidos)
    assert reason(lambda: rules.transform_patient(row, today=TODAY)) == rules.MISSING_NAME


def test_one_name_is_enough() -> None:
    record = rules.transform_patient(patient_row(nombres=None), today=TODAY)
    assert (record["given_name"], record["family_name"]) == (None, "Gómez")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0000-00-00", None),
        ("1980-02-29", date(1980, 2, 29)),
        ("29/02/1980", date(1980, 2, 29)),
        ("1900-01-01", date(1900, 1, 1)),
        (TODAY.isoformat(), TODAY),
    ],
)
def test_birth_date_formats(value: str | None, expected: date | None) -> None:
    assert rules.parse_birth_date(value, TODAY) == expected


@pytest.mark.parametrize(
    "value",
    [
        "31/02/2001",
        "2001-13-01",
        "ayer",
        "1899-12-31",
        (TODAY + timedelta(days=1)).isoformat(),
        "12-05-1990",
        "1990/05/12",
        "1990-5-1",
    ],
)
def test_unreal_birth_date_is_invalid(value: str) -> None:
    assert reason(lambda: rules.parse_birth_date(value, TODAY)) == rules.INVALID_BIRTH_DATE


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("M", "male"),
        ("f", "female"),
        ("x", "other"),
        (" m ", "male"),
        ("", "unknown"),
        (None, "unknown"),
        ("?", "unknown"),
    ],
)
def test_sex(value: str | None, expected: str) -> None:
    assert rules.normalize_sex(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (" Ana@Mail.COM ", "ana@mail.com"),
        ("not-an-email", None),
        ("a b@c.d", None),
        ("a@b", None),
        ("", None),
        (None, None),
    ],
)
def test_email_lower_or_null(value: str | None, expected: str | None) -> None:
    assert rules.normalize_email(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("(+57) 300-123 4567", "+573001234567"),
        ("310 555 0000", "3105550000"),
        ("n/a", None),
        ("", None),
        ("+", None),
        (None, None),
    ],
)
def test_phone_keeps_digits_and_leading_plus(value: str | None, expected: str | None) -> None:
    assert rules.normalize_phone(value) == expected


def test_practitioner_mapping_only_moves_the_source() -> None:
    mapping = PractitionerMapping(source=12, target=900)
    assert rules.map_practitioner(12, mapping) == 900
    assert rules.map_practitioner(13, mapping) == 13
    assert rules.map_practitioner(None, mapping) is None
    assert rules.map_practitioner(12, None) == 12
    assert rules.transform_patient(patient_row(), today=TODAY, mapping=mapping)["practitioner_id"] == 900
    assert rules.transform_encounter(encounter_row(), patient_id=1, mapping=mapping)["practitioner_id"] == 900


def test_patient_record() -> None:
    assert rules.transform_patient(patient_row(), today=TODAY) == {
        "sistema": "HSJ",
        "legacy_id": 7,
        "national_id": "1020304",
        "document_type": "CC",
        "given_name": "ana maría",
        "family_name": "Gómez",
        "birth_date": date(1980, 2, 29),
        "sex": "female",
        "email": "ana@mail.com",
        "phone": "+573001234567",
        "practitioner_id": 12,
        "source_updated_at": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    }


def test_patient_reasons_follow_the_contract_order() -> None:
    row = patient_row(documento="", nombres=None, apellidos=None, fecha_nacimiento="ayer")
    assert reason(lambda: rules.transform_patient(row, today=TODAY)) == rules.MISSING_DOCUMENT
    row["documento"] = "1"
    assert reason(lambda: rules.transform_patient(row, today=TODAY)) == rules.MISSING_NAME
    row["nombres"] = "Ana"
    assert reason(lambda: rules.transform_patient(row, today=TODAY)) == rules.INVALID_BIRTH_DATE


def test_lowest_legacy_id_keeps_a_document() -> None:
    owners, losers = rules.first_claim_wins({5: "A", 3: "A", 9: "B", 4: "C"}, held={"B": 2, "C": 8})
    assert owners == {"A": 3, "B": 2, "C": 4}
    assert losers == {5, 9}


@pytest.mark.parametrize(
    ("value", "expected"),
    [("consulta", "consultation"), ("CONTROL", "follow_up"), (" Urgencia ", "emergency"),
     ("procedimiento", "procedure"), ("junk", "other"), (None, "other")],
)  # fmt: skip
def test_encounter_kind(value: str | None, expected: str) -> None:
    assert rules.normalize_encounter_kind(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("cerrada", "closed"), ("ABIERTA", "open"), ("anulada", "cancelled"), ("???", "unknown"), (None, "unknown")],
)
def test_encounter_status(value: str | None, expected: str) -> None:
    assert rules.normalize_encounter_status(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("J45.9", "J45.9"), ("j459", "J45.9"), (" E11 ", "E11"), ("z00.00", "Z00.00"), ("A09X", "A09.X"),
     ("J 45 9", "J45.9"), (None, None), ("", None), ("  ", None)],
)  # fmt: skip
def test_icd10_is_upper_and_dotted(value: str | None, expected: str | None) -> None:
    assert rules.normalize_icd10(value) == expected


@pytest.mark.parametrize("value", ["J4", "123", "JJ45", "J45.99999", "J45-9", ".", "J45.", "J459.1"])
def test_malformed_icd10_is_invalid(value: str) -> None:
    assert reason(lambda: rules.normalize_icd10(value)) == rules.INVALID_ICD10


@pytest.mark.parametrize("fecha", [None, "0000-00-00 00:00:00", "", "garbage"])
def test_missing_or_zero_date_is_missing_date(fecha: Any) -> None:
    assert reason(lambda: rules.transform_encounter(encounter_row(fecha=fecha), patient_id=1)) == rules.MISSING_DATE


def test_encounter_without_migrated_patient_is_orphan() -> None:
    row = encounter_row(fecha=None, diagnostico="bad")  # orphan is decided first
    assert reason(lambda: rules.transform_encounter(row, patient_id=None)) == rules.ORPHAN_PATIENT


def test_encounter_reasons_follow_the_contract_order() -> None:
    row = encounter_row(fecha=None, diagnostico="bad")
    assert reason(lambda: rules.transform_encounter(row, patient_id=1)) == rules.MISSING_DATE
    row["fecha"] = "2024-01-01 10:00:00"
    assert reason(lambda: rules.transform_encounter(row, patient_id=1)) == rules.INVALID_ICD10


def test_encounter_record_keeps_notes_byte_for_byte() -> None:
    record = rules.transform_encounter(encounter_row(), patient_id=41)
    assert record == {
        "sistema": "HSJ",
        "legacy_id": 9,
        "patient_id": 41,
        "practitioner_id": 12,
        "occurred_at": datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC),
        "kind": "emergency",
        "icd10": "J45.9",
        "notes": "  línea 1\n\tlínea 2 ❤️  ",
        "status": "closed",
        "source_updated_at": None,
    }


def test_quarantine_detail_never_carries_the_value() -> None:
    with pytest.raises(Quarantined) as caught:
        rules.parse_birth_date("31/02/2001", TODAY)
    assert "31/02/2001" not in caught.value.detail


# --- content hash ---------------------------------------------------------------------------


def test_hash_ignores_key_order_but_not_types_or_nulls() -> None:
    base = {"a": 1, "b": "x"}
    assert rules.content_hash(base) == rules.content_hash({"b": "x", "a": 1})
    assert rules.content_hash({"a": 1}) != rules.content_hash({"a": "1"})
    assert rules.content_hash({"a": None}) != rules.content_hash({"a": ""})
    assert rules.content_hash({"a": None}) != rules.content_hash({"a": "null"})
    assert rules.content_hash({"a": True}) != rules.content_hash({"a": 1})
    assert rules.content_hash({"d": date(2020, 1, 2)}) != rules.content_hash({"d": "2020-01-02"})


def test_hash_separators_cannot_be_forged_by_data() -> None:
    assert rules.content_hash({"a": "x", "b": "y"}) != rules.content_hash({"a": 'x"],["b","str","y', "b": None})
    assert rules.content_hash({"a": "x\x1fy"}) != rules.content_hash({"a": "x", "y": None})


def test_hash_reads_datetimes_in_utc() -> None:
    naive = datetime(2025, 1, 1, 12, 0)
    aware = datetime(2025, 1, 1, 7, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert rules.content_hash({"t": naive}) == rules.content_hash({"t": aware})
    assert rules.canonical_form({"t": naive}) == '[["t","datetime","2025-01-01T12:00:00.000000Z"]]'


@pytest.mark.parametrize(("value", "expected"), [("+57 300", "+57300"), ("57+300", "57300"), (" (+1) 2", "+12")])
def test_only_a_plus_before_the_digits_is_kept(value: str, expected: str) -> None:
    assert rules.normalize_phone(value) == expected
