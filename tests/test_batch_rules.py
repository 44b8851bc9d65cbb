"""The batch (polars) rules against the scalar reference: byte-equal output on a randomized legacy set.

worker/rules.py is the reference; worker/batch.py must give, for every row, the same target values,
the same quarantine reason and detail, and the same content-hash bytes. The generator covers every
rule branch and hostile values (U+0000, Python-only whitespace, full-width digits, case mappings that
change length, values at and past their column widths, zero and odd dates).
"""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from worker import batch, rules
from worker.rules import PractitionerMapping

TODAY = date(2026, 11, 21)
ROWS = 20_000
HOSTILE = [
    "", " ", "\x00", "a\x00b", "\t\n\x0b\x0c\r", "\x1c\x1d\x1e\x1f", "\x85\xa0\u1680\u2000\u2028\u3000", "\u200b",
    "\u200d", "\ufeff", "\u202e", "\x01", "\x1b[31m", "😀", "👩‍👩‍👧", "é", "é", "שלום", "مرحبا", "ΟΔΟΣ",
    "İstanbul", "straße", "ǅ", "ﬃ", "１２３", "Ｊ４５", "'); DROP TABLE pacientes;--", "$(touch /tmp/pwned)", "`id`",
    '"quoted"', "back\\slash", "\u2028line", "ı", "K", "Ω",
]  # fmt: skip
WORDS = ["ana", "María José", "JUAN", "  luis   fernando ", "Ñusta", "o'brien", "zoë", "李", "cc", "TI", "ce"]


class Hostile:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def pick(self, options: list[Any]) -> Any:
        return options[self.rng.randrange(len(options))]

    def text(self, width: int = 40) -> str | None:
        r = self.rng.random()
        if r < 0.1:
            return None
        if r < 0.15:  # at and past a column width
            return "x" * self.pick([width - 1, width, width + 1, 2 * width])
        parts = [self.pick(HOSTILE + WORDS + WORDS) for _ in range(self.rng.randrange(1, 4))]
        return self.pick(["", " ", "  ", "\t"]).join(parts)

    def code(self, codes: list[str]) -> str | None:
        base = self.pick([*codes, *[c.upper() for c in codes], "junk", ""])
        return self.pick([base, f" {base} ", base + "\x00", base + "\n", None, self.text(8)])

    def birth_date(self) -> str | None:
        day = date(1890, 1, 1) + timedelta(days=self.rng.randrange(0, 140 * 365))
        return self.pick(
            [
                day.isoformat(), day.strftime("%d/%m/%Y"), "0000-00-00", "", None, " 1980-02-29 ", "1980-02-30",
                "31/04/2001", "0000-01-01", "１９８０-０２-２９", "1980-2-1", "2999-01-01", "1980-02-29\n",
                "12-05-1990", "29/02/1981", "\x001980-01-01", self.text(20), TODAY.isoformat(),
                (TODAY + timedelta(days=1)).isoformat(), "1900-01-01", "1899-12-31",
            ]
        )  # fmt: skip

    def moment(self) -> datetime | None:
        if self.rng.random() < 0.15:
            return None
        year = self.pick([999, 1000, 1970, 2020, 2025, 9999])
        return datetime(year, 1 + self.rng.randrange(12), 1 + self.rng.randrange(28), self.rng.randrange(24),
                        self.rng.randrange(60), self.rng.randrange(60), self.pick([0, 1, 123456, 999999]))  # fmt: skip

    def email(self) -> str | None:
        user = self.pick(["ana", "Ana.Maria", "İ" * 130, "x" * 240, "a b", "", "ñ", "x" * 250, "İ" * 126])
        domain = self.pick(["mail.com", "MAIL.CO", "x", "a.b", "münchen.de", ""])
        return self.pick([f"{user}@{domain}", f" {user}@{domain} ", f"{user}@@{domain}", user, None, self.text(255)])

    def phone(self) -> str | None:
        return self.pick(["(+57) 300-123 4567", "+ 1 555", "310١٢٣", "１２３", "n/a", "", None, "--+--57", self.text()])

    def patient(self, pid: int) -> dict[str, Any]:
        return {
            "id": pid,
            "sistema": self.pick(["HSJ", "CLN01"]),
            "documento": self.pick(["1.020.304", " ab-12 3 ", "", None, " .-. ", "１２３", "x\x00y", self.text(32)]),
            "tipo_documento": self.code(["cc", "ti", "ce", "pa", "rc"]),
            "nombres": self.text(120),
            "apellidos": self.pick([self.text(120), None, ""]),
            "fecha_nacimiento": self.birth_date(),
            "sexo": self.pick(["M", "f", " x ", "", None, "?", "m\x00", "Ｍ"]),
            "email": self.email(),
            "telefono": self.phone(),
            "profesional_id": self.pick([None, 12, 101, 2**31 - 1, -5]),
            "actualizado_en": self.moment(),
        }

    def encounter(self, eid: int) -> dict[str, Any]:
        return {
            "id": eid,
            "sistema": self.pick(["HSJ", "HSJ", "HSJ", "S" * 17]),  # past its width: INVALID_VALUE
            "paciente_id": self.pick([None, 1, 2, 3, 4, 999, -1, 2**31 - 1]),
            "profesional_id": self.pick([None, 12, 101]),
            "fecha": self.moment(),
            "tipo": self.code(["consulta", "control", "urgencia", "procedimiento"]),
            "diagnostico": self.pick(
                [
                    "J45.9",
                    "j459",
                    " E11 ",
                    "I10",
                    "z00.00",
                    None,
                    "",
                    "A09X",
                    "J4",
                    "123",
                    "J45.99999",
                    "J 45 9",
                    "J45\n",
                    "Ｊ４５",
                    "j45.9\x00",
                    "\u3000J45",
                    "J45.",
                    ".",
                    self.text(10),
                ]
            ),
            "notas": self.pick([None, "", self.text(), "línea 1\n\tlínea 2 ❤️", "a\x00b" * 3]),
            "estado": self.code(["cerrada", "abierta", "anulada"]),
            "actualizado_en": self.moment(),
        }


PATIENT_SCHEMA = {
    "id": pl.Int64, "sistema": pl.String, "documento": pl.String, "tipo_documento": pl.String,
    "nombres": pl.String, "apellidos": pl.String, "fecha_nacimiento": pl.String, "sexo": pl.String,
    "email": pl.String, "telefono": pl.String, "profesional_id": pl.Int64, "actualizado_en": pl.Datetime("us"),
}  # fmt: skip
ENCOUNTER_SCHEMA = {
    "id": pl.Int64, "sistema": pl.String, "paciente_id": pl.Int64, "profesional_id": pl.Int64,
    "fecha": pl.Datetime("us"), "tipo": pl.String, "diagnostico": pl.String, "notas": pl.String,
    "estado": pl.String, "actualizado_en": pl.Datetime("us"),
}  # fmt: skip


def scalar(call: Any) -> tuple[dict[str, Any] | None, str | None, str | None]:
    try:
        return call(), None, None
    except rules.Quarantined as problem:
        return None, problem.reason, problem.detail


def compare(frame: pl.DataFrame, expected: list[tuple[dict[str, Any] | None, str | None, str | None, str | None]]):
    got = frame.to_dicts()
    assert len(got) == len(expected)
    mismatches = []
    for row, (record, reason, detail, digest) in zip(got, expected, strict=True):
        if (row[batch.REASON], row[batch.DETAIL]) != (reason, detail):
            mismatches.append(("reason", row["legacy_id"], row[batch.REASON], reason, detail))
            continue
        if record is None:
            continue
        fields = {k: row[k] for k in record}
        if fields != record or row[batch.HASH] != digest:
            diff = {k: (fields[k], record[k]) for k in record if fields[k] != record[k]}
            mismatches.append(("record", row["legacy_id"], diff, row[batch.HASH] == digest))
    assert mismatches == [], mismatches[:10]


@pytest.mark.parametrize("mapping", [None, PractitionerMapping(101, 900)])
def test_patients_batch_equals_the_reference(mapping: PractitionerMapping | None) -> None:
    gen = Hostile(7)
    source = [gen.patient(pid) for pid in range(1, ROWS + 1)]
    expected = []
    for row in source:
        record, reason, detail = scalar(lambda row=row: rules.transform_patient(row, today=TODAY, mapping=mapping))
        expected.append((record, reason, detail, rules.content_hash(record) if record else None))
    reasons = {reason for _, reason, _, _ in expected}
    assert reasons >= {None, *rules.PATIENT_REASONS} - {rules.DUPLICATE_DOCUMENT}, "every branch must be covered"
    frame = batch.transform_patients(pl.DataFrame(source, schema=PATIENT_SCHEMA), today=TODAY, mapping=mapping)
    compare(frame, expected)


def test_encounters_batch_equals_the_reference() -> None:
    gen = Hostile(8)
    source = [gen.encounter(eid) for eid in range(1, ROWS + 1)]
    migrated = {1: 501, 2: 502, 3: 503, 2**31 - 1: 777}  # legacy id → target id
    expected = []
    for row in source:
        record, reason, detail = scalar(
            lambda row=row: rules.transform_encounter(row, patient_id=migrated.get(row["paciente_id"]))
        )
        digest = rules.encounter_hash(record, row["paciente_id"]) if record else None
        expected.append((record, reason, detail, digest))
    assert {reason for _, reason, _, _ in expected} >= {None, *rules.ENCOUNTER_REASONS}
    ids = pl.DataFrame({"legacy_id": list(migrated), "id": list(migrated.values())})
    frame = batch.transform_encounters(pl.DataFrame(source, schema=ENCOUNTER_SCHEMA), ids)
    compare(frame, expected)


def test_canonical_form_is_byte_equal_for_every_type() -> None:
    rows = [
        {"s": 'a"b\\c\n\x01\u2028é😀', "i": -(2**63), "b": True, "d": date(1900, 1, 1), "t": datetime(999, 1, 2)},
        {"s": None, "i": None, "b": False, "d": None, "t": None},
    ]
    frame = pl.DataFrame(rows, schema={"s": pl.String, "i": pl.Int64, "b": pl.Boolean, "d": pl.Date, "t": pl.Datetime})
    assert batch.canonical_forms(frame, ["s", "i", "b", "d", "t"]).to_list() == [rules.canonical_form(r) for r in rows]
