"""Generate a messy legacy clinical DB (SQLite or MariaDB), deterministic by seed, at any scale.

Every row is built to have one *fate* — migrated, soft-deleted, or one quarantine reason of §6 —
and the generator returns the tally of fates it built. That tally is the test oracle: it is
written down while generating, independently of the transform rules it checks. Valid rows are
messy too (separators in documents, stray spaces, mixed case, junk document types, bad e-mails,
'0000-00-00' dates), but never in a way §6 quarantines.

    python -m demo.legacy_data --url sqlite:///legacy.db --patients 2000 --seed 7
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert

from worker import rules, schema

MIGRATED, DELETED = "MIGRATED", "DELETED"
DEFAULT_SISTEMAS = ("HSJ", "CLN01", "SUR_2")
GIVEN = ["Ana", "maría josé", "JUAN", "Luis  Fernando", "Sofía", "Ñusta", "Camila", "josé", "Valentina", "Andrés"]
FAMILY = ["Gómez", "pérez  ruiz", "RODRÍGUEZ", "López", "Muñoz", "Díaz", "García Márquez", "Zuluaga"]
NOTES = [
    "Paciente estable.",
    "Control en 3 meses\nTA 120/80",
    "Dolor torácico — descartar IAM ❤️",
    "Sin hallazgos\t",
    "",
]
PATIENT_CASES = (
    rules.MISSING_DOCUMENT,
    rules.DUPLICATE_DOCUMENT,
    rules.MISSING_NAME,
    rules.INVALID_BIRTH_DATE,
    DELETED,
)
ENCOUNTER_CASES = (rules.ORPHAN_PATIENT, rules.MISSING_DATE, rules.INVALID_ICD10, DELETED)


@dataclass
class Tally:
    """What the generator built, per sistema and entity: fate → count."""

    fates: dict[str, dict[str, Counter[str]]] = field(default_factory=dict)

    def add(self, sistema: str, entity: str, fate: str) -> None:
        self.fates.setdefault(sistema, {}).setdefault(entity, Counter())[fate] += 1

    def expected(self, sistema: str, entity: str) -> dict[str, Any]:
        fates = self.fates[sistema][entity]
        quarantined = {k: v for k, v in fates.items() if k not in (MIGRATED, DELETED)}
        return {
            "eligible": sum(fates.values()) - fates[DELETED],
            "migrated": fates[MIGRATED],
            "deleted": fates[DELETED],
            "quarantined": dict(sorted(quarantined.items())),
        }

    def as_dict(self) -> dict[str, Any]:
        return {s: {e: self.expected(s, e) for e in ents} for s, ents in self.fates.items()}


class Generator:
    def __init__(self, seed: int, now: datetime) -> None:
        self.rng = random.Random(seed)
        self.now = now
        self.recent_documents: deque[str] = deque(maxlen=500)  # bounded: memory does not grow with N

    def pick(self, options: list[Any] | tuple[Any, ...]) -> Any:
        return options[self.rng.randrange(len(options))]

    def messy(self, text: str) -> str:
        r = self.rng.random()
        return f"  {text} " if r < 0.2 else text.upper() if r < 0.3 else text

    def timestamp(self) -> datetime:
        return self.now - timedelta(seconds=self.rng.randrange(1, 2 * 365 * 86400))

    def document(self, serial: int) -> str:
        digits = f"{10_000_000 + serial * 7919 % 90_000_000}{serial}"
        style = self.rng.randrange(5)
        if style == 0:
            return ".".join(digits[i : i + 3] for i in range(0, len(digits), 3))
        if style == 1:
            return f" {digits[:4]}-{digits[4:]} "
        if style == 2:
            return f"pa{digits}"
        return digits

    def birth_date(self) -> str | None:
        day = datetime(1930, 1, 1) + timedelta(days=self.rng.randrange(0, 90 * 365))
        return self.pick(
            [day.strftime("%Y-%m-%d"), day.strftime("%d/%m/%Y"), "0000-00-00", "", None, day.strftime("%Y-%m-%d")]
        )

    def patient(self, pid: int, sistema: str, fate: str, practitioners: list[int]) -> dict[str, Any]:
        document = self.document(pid)
        row = {
            "id": pid,
            "sistema": sistema,
            "documento": document,
            "tipo_documento": self.pick(["CC", "cc", "TI", "CE", "PA", "RC", "XX", None, " cc "]),
            "nombres": self.messy(self.pick(GIVEN)),
            "apellidos": self.messy(self.pick(FAMILY)),
            "fecha_nacimiento": self.birth_date(),
            "sexo": self.pick(["M", "F", "X", "m", "f", "", None, "?"]),
            "email": self.pick([f" User{pid}@Example.COM ", f"user{pid}@mail.co", "not-an-email", "", None, "a b@c.d"]),
            "telefono": self.pick([f"(+57) 300-{pid % 1000:03d} {pid % 10000:04d}", f"310{pid:07d}", "", None, "n/a"]),
            "profesional_id": self.pick([*practitioners, None]),
            "creado_en": self.timestamp(),
            "actualizado_en": self.pick([self.timestamp(), self.timestamp(), None]),
            "eliminado": 0,
        }
        if fate == rules.MISSING_DOCUMENT:
            row["documento"] = self.pick([None, "", " .-. ", "   "])
        elif fate == rules.DUPLICATE_DOCUMENT:
            original = self.pick(list(self.recent_documents))
            row["documento"] = self.pick([original.lower(), f" {original} ", original.replace(".", "")])
        elif fate == rules.MISSING_NAME:
            row["nombres"], row["apellidos"] = self.pick([(None, None), ("", "  "), ("   ", None)])
        elif fate == rules.INVALID_BIRTH_DATE:
            row["fecha_nacimiento"] = self.pick(
                ["31/02/2001", "2999-01-01", "ayer", "1850-05-05", "2001-13-01", "12-05-1990"]
            )
        elif fate == DELETED:
            row["eliminado"] = 1
        if fate == MIGRATED:
            self.recent_documents.append(document)
        return row

    def encounter(
        self, eid: int, sistema: str, patient_id: int | None, fate: str, practitioners: list[int]
    ) -> dict[str, Any]:
        row = {
            "id": eid,
            "sistema": sistema,
            "paciente_id": patient_id,
            "profesional_id": self.pick([*practitioners, None]),
            "fecha": self.timestamp(),
            "tipo": self.pick(["consulta", "CONTROL", " Urgencia ", "procedimiento", "junk", None]),
            "diagnostico": self.pick(["J45.9", "j459", " E11 ", "I10", "z00.00", None, "", "A09X"]),
            "notas": self.pick(NOTES) + (f" #{eid}" if self.rng.random() < 0.5 else ""),
            "estado": self.pick(["cerrada", "ABIERTA", "anulada", "???", None]),
            "actualizado_en": self.pick([self.timestamp(), None]),
            "eliminado": 0,
        }
        if fate == rules.MISSING_DATE:
            row["fecha"] = self.pick([None, "0000-00-00 00:00:00"])
        elif fate == rules.INVALID_ICD10:
            row["diagnostico"] = self.pick(["J4", "123", "JJ45", "J45.99999", "J45-9", "."])
        elif fate == DELETED:
            row["eliminado"] = 1
        return row


def _fate(rng: random.Random, pending: list[str], cases: tuple[str, ...], weights: tuple[float, ...]) -> str:
    """Each case is placed once first (``pending``), so every one appears at any scale."""
    if pending:
        return pending.pop(0)
    draw = rng.random()
    for case, weight in zip(cases, weights, strict=True):
        if draw < weight:
            return case
        draw -= weight
    return MIGRATED


def _flush(engine: Engine, patient_rows: list[dict[str, Any]], encounter_rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        for table, rows in ((schema.pacientes, patient_rows), (schema.atenciones, encounter_rows)):
            if rows:
                conn.execute(insert(table), rows)
                rows.clear()


def generate(
    engine: Engine,
    *,
    patients_per_sistema: int,
    encounters_per_patient: int = 5,
    sistemas: tuple[str, ...] = DEFAULT_SISTEMAS,
    seed: int = 42,
    now: datetime = datetime(2026, 1, 1, 12, 0, 0),
    chunk_size: int = 5000,
) -> Tally:
    """Create the legacy tables (dropping old ones) and fill them; return what was built."""
    schema.legacy_metadata.drop_all(engine)
    schema.legacy_metadata.create_all(engine)
    gen = Generator(seed, now)
    tally = Tally()
    with engine.begin() as conn:
        conn.execute(
            insert(schema.sistemas),
            [{"codigo": s, "nombre": f"Sistema {s}", "activo": 1} for s in sistemas]
            + [{"codigo": "OLD", "nombre": "Retired system", "activo": 0}],
        )
        conn.execute(
            insert(schema.profesionales),
            [
                {"id": n * 100 + k, "sistema": s, "nombre": f"Dr. {k}", "registro": f"RM-{n}{k}"}
                for n, s in enumerate(sistemas, start=1)
                for k in range(1, 11)
            ],
        )
    patient_weights = (0.02, 0.02, 0.02, 0.02, 0.04)
    encounter_weights = (0.02, 0.02, 0.02, 0.03)
    pid = eid = 0
    for n, sistema in enumerate(sistemas, start=1):
        practitioners = [n * 100 + k for k in range(1, 11)]
        gen.recent_documents.clear()
        pending_patients = [MIGRATED, *PATIENT_CASES]  # the first is the original of a duplicate
        pending_encounters = list(ENCOUNTER_CASES)
        patient_rows: list[dict[str, Any]] = []
        encounter_rows: list[dict[str, Any]] = []
        for _ in range(patients_per_sistema):
            pid += 1
            fate = _fate(gen.rng, pending_patients, PATIENT_CASES, patient_weights)
            if fate == rules.DUPLICATE_DOCUMENT and not gen.recent_documents:
                fate = MIGRATED
            tally.add(sistema, "patients", fate)
            patient_rows.append(gen.patient(pid, sistema, fate, practitioners))
            for _ in range(gen.rng.randrange(0, 2 * encounters_per_patient + 1)):
                eid += 1
                patient_id: int | None = pid
                if fate == MIGRATED:
                    own = _fate(gen.rng, pending_encounters, ENCOUNTER_CASES, encounter_weights)
                    if own == rules.ORPHAN_PATIENT:  # no such patient, none, or one of another sistema
                        patient_id = gen.pick([10**9 + eid, None, 1 if n > 1 else 10**9 + eid])
                else:  # its patient is not migrated: an orphan, unless not eligible at all
                    own = DELETED if gen.rng.random() < encounter_weights[-1] else rules.ORPHAN_PATIENT
                tally.add(sistema, "encounters", own)
                encounter_rows.append(gen.encounter(eid, sistema, patient_id, own, practitioners))
            if len(encounter_rows) >= chunk_size or len(patient_rows) >= chunk_size:
                _flush(engine, patient_rows, encounter_rows)
        _flush(engine, patient_rows, encounter_rows)
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="SQLAlchemy URL of the legacy DB to (re)create")
    parser.add_argument("--patients", type=int, default=2000, help="patients per sistema")
    parser.add_argument("--encounters-per-patient", type=int, default=5)
    parser.add_argument("--sistemas", default=",".join(DEFAULT_SISTEMAS))
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    tally = generate(
        schema.make_engine(args.url),
        patients_per_sistema=args.patients,
        encounters_per_patient=args.encounters_per_patient,
        sistemas=tuple(args.sistemas.split(",")),
        seed=args.seed,
    )
    print(json.dumps(tally.as_dict(), indent=2))


if __name__ == "__main__":
    main()
