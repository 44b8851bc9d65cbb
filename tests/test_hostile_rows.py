"""Hostile legacy values through the real worker (issue 6): MariaDB → clinic-migrate → PostgreSQL.

Over fifty rows, each made of one hostile value: U+0000 in every text column, values that outgrow their
column only after the rules, 4-byte emoji, combining marks, RTL and zero-width characters, control
characters, SQL and shell injection text, full-width digits in dates, impossible and zero dates,
extreme ids. The partition's run must succeed, and each row must end exactly where §6 puts it: in the
target with the values of the reference rules (worker/rules.py), or in the quarantine with its reason.
A few expectations are also spelled out by hand, so the test does not only compare the code with itself.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, date, datetime
from typing import Any

import pytest
from sqlalchemy import insert, select, text

from worker import rules, schema

from .conftest import WORKER_COMMAND

pytestmark = pytest.mark.integration
SISTEMA = "HOSTIL"
TODAY = date.today()
WHEN = datetime(2024, 5, 6, 7, 8, 9)

BASE_PATIENT: dict[str, Any] = {
    "sistema": SISTEMA, "documento": "CC-1", "tipo_documento": "CC", "nombres": "Ana", "apellidos": "Gómez",
    "fecha_nacimiento": "1980-02-29", "sexo": "F", "email": "ana@example.org", "telefono": "+57 300 1",
    "profesional_id": 7, "creado_en": WHEN, "actualizado_en": WHEN, "eliminado": 0,
}  # fmt: skip
# (column, hostile value); each row gets a unique document unless the case is about the document itself
PATIENT_CASES: list[tuple[str, Any]] = [
    ("nombres", "An\x00a"), ("apellidos", "\x00"), ("documento", "12\x0034"), ("tipo_documento", "C\x00C"),
    ("email", "a\x00b@example.org"), ("telefono", "\x00+57 1"), ("fecha_nacimiento", "1980-02-29\x00"),
    ("sexo", "\x00"), ("nombres", "😀👩‍👩‍👧 Ana"), ("apellidos", "e\u0301\u0301\u0301"),
    ("nombres", "\u202eanA\u202c"), ("apellidos", "שלום עליכם"), ("nombres", "zero\u200bwidth\u200d"),
    ("nombres", "\x01\x1b[31mred\x1b[0m"), ("apellidos", "tab\tand\nnewline\r"), ("nombres", "\x85\xa0\u3000"),
    ("nombres", "'); DROP TABLE pacientes;--"), ("apellidos", "$(touch /tmp/pwned) `id`"),
    ("email", "'; DELETE FROM x; --@example.org"), ("documento", "'; DROP TABLE x;--"),
    ("fecha_nacimiento", "１９８０-０２-２９"), ("fecha_nacimiento", "1980-02-30"), ("fecha_nacimiento", "31/04/2001"),
    ("fecha_nacimiento", "0000-00-00"), ("fecha_nacimiento", "2999-01-01"), ("fecha_nacimiento", "1899-12-31"),
    ("fecha_nacimiento", "29/02/1981"), ("fecha_nacimiento", "1980-02-29\n"), ("telefono", "１２３ 456"),
    ("documento", "１２３"), ("documento", "---"), ("nombres", None), ("email", "İ" * 127 + "@x.co"),
    ("email", "a" * 250 + "@x.co"), ("nombres", "x" * 120), ("nombres", "x" * 119 + "\x00"),
    ("nombres", " " * 30 + "y" * 60 + " " * 30), ("documento", "A" * 32), ("sexo", "m"), ("sexo", "Ｍ"),
    ("profesional_id", 2**31 - 1), ("profesional_id", -(2**31)), ("tipo_documento", "ｃｃ"),
    ("actualizado_en", "0000-00-00 00:00:00"), ("email", "ANA@EXAMPLE.ORG\n"),
]  # fmt: skip
BASE_ENCOUNTER: dict[str, Any] = {
    "sistema": SISTEMA, "profesional_id": 7, "fecha": WHEN, "tipo": "consulta", "diagnostico": "J45.9",
    "notas": "ok", "estado": "cerrada", "actualizado_en": WHEN, "eliminado": 0,
}  # fmt: skip
ENCOUNTER_CASES: list[tuple[str, Any]] = [
    ("notas", "línea\x00 1"), ("notas", "\x00" * 5), ("notas", "😀" * 2000), ("notas", "'); DROP TABLE atenciones;--"),
    ("diagnostico", "j45.9\x00"), ("diagnostico", "Ｊ４５"), ("diagnostico", "\u3000J45"), ("diagnostico", "J45."),
    ("tipo", "CONSULTA\x00"), ("estado", "\u202eabierta"), ("fecha", "0000-00-00 00:00:00"),
    ("fecha", "2020-00-10 00:00:00"), ("fecha", None), ("paciente_id", 999_999), ("paciente_id", 2**31 - 1),
]  # fmt: skip
EXTREME_ID = 2**31 - 1


def test_hostile_rows_are_migrated_or_quarantined_exactly_as_section_6_says(
    mariadb_url: str, postgres_url: str
) -> None:
    legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
    schema.legacy_metadata.create_all(legacy)
    patients = [
        {**BASE_PATIENT, "documento": f"DOC{i}", column: value} for i, (column, value) in enumerate(PATIENT_CASES)
    ]
    patients.append({**BASE_PATIENT, "documento": "EXTREME", "id": EXTREME_ID})
    with legacy.begin() as conn:
        conn.execute(insert(schema.sistemas), [{"codigo": SISTEMA, "nombre": "hostil", "activo": 1}])
        for row in patients:  # one by one: the ids are the legacy ids the assertions look for
            row["id"] = conn.execute(insert(schema.pacientes).values(row)).inserted_primary_key[0]
        anchor = patients[0]["id"]
        encounters = [{**BASE_ENCOUNTER, "paciente_id": anchor, column: value} for column, value in ENCOUNTER_CASES]
        for row in encounters:
            row["id"] = conn.execute(insert(schema.atenciones).values(row)).inserted_primary_key[0]
    assert len(PATIENT_CASES) + len(ENCOUNTER_CASES) >= 50

    secrets = json.dumps({"legacy_db_url": mariadb_url, "target_db_url": postgres_url})
    for entity in ("patients", "encounters"):
        argv = [WORKER_COMMAND, "migrate", "--entity", entity, "--sistema", SISTEMA, "--usuario", "t", "--run-id", "h1"]
        done = subprocess.run(argv, input=secrets, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    # Read back exactly what the legacy DB holds (the driver's view of each value) and apply §6 to it.
    with legacy.connect() as conn:
        source = {r["id"]: dict(r) for r in conn.execute(select(schema.pacientes)).mappings()}
        source_encounters = {r["id"]: dict(r) for r in conn.execute(select(schema.atenciones)).mappings()}
    with target.connect() as conn:
        stored = {r["legacy_id"]: dict(r) for r in conn.execute(select(schema.patients)).mappings()}
        stored_encounters = {r["legacy_id"]: dict(r) for r in conn.execute(select(schema.encounters)).mappings()}
        quarantined = {
            (r.entity, r.legacy_id): (r.reason, r.detail)
            for r in conn.execute(text("SELECT entity, legacy_id, reason, detail FROM migration.quarantine"))
        }

    held: dict[str, int] = {}
    for legacy_id in sorted(source):
        try:
            expected = rules.transform_patient(source[legacy_id], today=TODAY)
        except rules.Quarantined as refused:
            assert quarantined[("patients", legacy_id)][0] == refused.reason, legacy_id
            assert legacy_id not in stored
            continue
        if expected["national_id"] in held:
            assert quarantined[("patients", legacy_id)][0] == rules.DUPLICATE_DOCUMENT
            continue
        held[expected["national_id"]] = legacy_id
        row = stored[legacy_id]
        for field, value in expected.items():
            assert row[field] == value, (legacy_id, field)
        assert row["content_hash"] == rules.content_hash(expected), legacy_id
    assert len(stored) + sum(1 for entity, _ in quarantined if entity == "patients") == len(source)

    for legacy_id, row in source_encounters.items():
        patient = stored.get(row["paciente_id"])
        try:
            expected = rules.transform_encounter(row, patient_id=patient["id"] if patient else None)
        except rules.Quarantined as refused:
            assert quarantined[("encounters", legacy_id)][0] == refused.reason, legacy_id
            assert legacy_id not in stored_encounters
            continue
        got = stored_encounters[legacy_id]
        for field, value in expected.items():
            assert got[field] == value, (legacy_id, field)
        assert got["content_hash"] == rules.encounter_hash(expected, row["paciente_id"]), legacy_id

    # Spelled out by hand (§6), besides the reference functions:
    by_value = {value: patients[i]["id"] for i, (_, value) in enumerate(PATIENT_CASES) if isinstance(value, str)}
    assert stored[by_value["An\x00a"]]["given_name"] == "Ana"  # U+0000 removed
    assert stored[by_value["😀👩‍👩‍👧 Ana"]]["given_name"] == "😀👩‍👩‍👧 Ana"  # 4-byte characters kept
    assert stored[by_value["'); DROP TABLE pacientes;--"]]["given_name"] == "'); DROP TABLE pacientes;--"
    assert stored[by_value["İ" * 127 + "@x.co"]]["email"] is None  # too long only once lower-cased
    assert quarantined[("patients", by_value["１９８０-０２-２９"])][0] == rules.INVALID_BIRTH_DATE
    assert stored[by_value["x" * 119 + "\x00"]]["given_name"] == "x" * 119  # a full column, U+0000 removed
    assert stored[EXTREME_ID]["national_id"] == "EXTREME"
    assert stored_encounters[encounters[0]["id"]]["notes"] == "línea 1"
    assert quarantined[("encounters", encounters[-2]["id"])][0] == rules.ORPHAN_PATIENT  # no such patient
    assert stored_encounters[encounters[-1]["id"]]["patient_id"] == stored[EXTREME_ID]["id"]  # the extreme id
    assert all(value not in detail for (_, _), (_, detail) in quarantined.items() for value in ("DROP", "pwned"))
    assert stored[by_value["'); DROP TABLE pacientes;--"]]["migrated_at"] <= datetime.now(UTC)
