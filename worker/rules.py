"""The data contract of DESIGN §6 as pure functions.

One function per rule. The worker uses them to migrate and the checks use them to recompute
what the target must hold, so a rule changes in exactly one place. Nothing here touches a
database, the clock (``today`` is a parameter) or a logger.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

# Quarantine reason codes (DESIGN §6).
MISSING_DOCUMENT = "MISSING_DOCUMENT"
DUPLICATE_DOCUMENT = "DUPLICATE_DOCUMENT"
MISSING_NAME = "MISSING_NAME"
INVALID_BIRTH_DATE = "INVALID_BIRTH_DATE"
ORPHAN_PATIENT = "ORPHAN_PATIENT"
MISSING_DATE = "MISSING_DATE"
INVALID_ICD10 = "INVALID_ICD10"
INVALID_VALUE = "INVALID_VALUE"

PATIENT_REASONS = (MISSING_DOCUMENT, DUPLICATE_DOCUMENT, MISSING_NAME, INVALID_BIRTH_DATE, INVALID_VALUE)
ENCOUNTER_REASONS = (ORPHAN_PATIENT, MISSING_DATE, INVALID_ICD10, INVALID_VALUE)

# Widths of the target's text columns (characters). schema.py builds the columns from these, so
# the rule that refuses a value too long for its column and the column itself cannot disagree.
PATIENT_WIDTHS = {
    "sistema": 16,
    "national_id": 32,
    "document_type": 2,
    "given_name": 120,
    "family_name": 120,
    "sex": 8,
    "email": 255,
    "phone": 40,
}
ENCOUNTER_WIDTHS = {"sistema": 16, "kind": 16, "icd10": 8, "status": 16}
EMAIL_MAX_LENGTH = 254  # RFC 5321's limit on a forward path, counted after lower-casing
INT64 = (-(2**63), 2**63 - 1)

DOCUMENT_TYPES = frozenset({"CC", "TI", "CE", "PA", "RC"})
EARLIEST_BIRTH_DATE = date(1900, 1, 1)
# Patterns are matched whole (re.fullmatch): ``$`` alone would also accept a trailing newline.
EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
ICD10_PATTERN = re.compile(r"([A-Z][0-9]{2})(?:\.?([0-9A-Z]{1,4}))?")
# ASCII digits only: '２０２０-０１-０１' (full-width) is not the legacy format, whatever int() makes of it.
BIRTH_DATE_FORMATS = {r"[0-9]{4}-[0-9]{2}-[0-9]{2}": "%Y-%m-%d", r"[0-9]{2}/[0-9]{2}/[0-9]{4}": "%d/%m/%Y"}
SEX_CODES = {"M": "male", "F": "female", "X": "other"}
ENCOUNTER_KINDS = {
    "consulta": "consultation",
    "control": "follow_up",
    "urgencia": "emergency",
    "procedimiento": "procedure",
}
ENCOUNTER_STATUSES = {"cerrada": "closed", "abierta": "open", "anulada": "cancelled"}


class Quarantined(Exception):
    """A source record breaks the contract: it is quarantined with ``reason``, never dropped.

    ``detail`` says what was wrong in words only; it never carries the offending value, because
    quarantine details are shown in metadata and alerts and source values may be patient data.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class PractitionerMapping:
    """A run's ``pract_source → pract_target`` pair: one legacy practitioner re-assigned."""

    source: int
    target: int


# --- strings ---------------------------------------------------------------------------------


def remove_nul(value: str | None) -> str | None:
    """Drop U+0000 from a string: neither PostgreSQL nor Firestore can hold it (§6)."""
    return None if value is None else str(value).replace("\x00", "")


def clean_text(value: str | None) -> str | None:
    """Trim and collapse inner whitespace, U+0000 removed; an empty result is NULL (§6 default)."""
    if value is None:
        return None
    collapsed = " ".join(remove_nul(value).split())  # type: ignore[union-attr]
    return collapsed or None


def normalize_national_id(documento: str | None) -> str:
    """Upper-case the document without separators; an empty one cannot identify a patient."""
    national_id = re.sub(r"[^0-9A-Za-z]", "", documento or "").upper()
    if not national_id:
        raise Quarantined(MISSING_DOCUMENT, "document is empty after removing separators")
    return national_id


def normalize_document_type(tipo_documento: str | None) -> str | None:
    """Keep only the five known document types; junk becomes NULL rather than a bad code."""
    code = (clean_text(tipo_documento) or "").upper()
    return code if code in DOCUMENT_TYPES else None


def require_name(given_name: str | None, family_name: str | None) -> None:
    """A patient with neither given nor family name cannot be identified by a person."""
    if given_name is None and family_name is None:
        raise Quarantined(MISSING_NAME, "both given and family names are empty")


def parse_birth_date(fecha_nacimiento: str | None, today: date) -> date | None:
    """Legacy birth dates are text; unknown stays NULL, anything unreal is quarantined."""
    text = (remove_nul(fecha_nacimiento) or "").strip()
    if text in ("", "0000-00-00"):
        return None
    parsed: date | None = None
    for shape, pattern in BIRTH_DATE_FORMATS.items():
        if re.fullmatch(shape, text):
            try:
                parsed = datetime.strptime(text, pattern).date()
            except ValueError:
                parsed = None
    if parsed is None:
        raise Quarantined(INVALID_BIRTH_DATE, "birth date is not a real date in a known format")
    if not EARLIEST_BIRTH_DATE <= parsed <= today:
        raise Quarantined(INVALID_BIRTH_DATE, "birth date is before 1900 or in the future")
    return parsed


def normalize_sex(sexo: str | None) -> str:
    """Map the one-letter legacy code, any case; everything else is 'unknown', not an error."""
    return SEX_CODES.get((sexo or "").strip().upper(), "unknown")


def normalize_email(email: str | None) -> str | None:
    """Lower-case a plausible address; an implausible one, or one that lower-casing made longer than
    254 characters ('İ' becomes two), is dropped (NULL), not quarantined."""
    candidate = (clean_text(email) or "").lower()
    if len(candidate) > EMAIL_MAX_LENGTH or not EMAIL_PATTERN.fullmatch(candidate):
        return None
    return candidate


def normalize_phone(telefono: str | None) -> str | None:
    """Keep the ASCII digits and a '+' typed before them, so numbers compare equal however written."""
    text = telefono or ""
    digits = re.sub(r"[^0-9]", "", text)
    if not digits:
        return None
    leading_plus = "+" in text[: re.search(r"[0-9]", text).start()]  # type: ignore[union-attr]
    return ("+" if leading_plus else "") + digits


def map_practitioner(profesional_id: int | None, mapping: PractitionerMapping | None) -> int | None:
    """Re-assign the run's source practitioner to its target; other ids pass through."""
    if mapping is not None and profesional_id == mapping.source:
        return mapping.target
    return profesional_id


# --- dates -----------------------------------------------------------------------------------


def coerce_datetime(value: Any) -> datetime | None:
    """Read a legacy DATETIME as UTC; zero dates ('0000-00-00 …') and junk are NULL.

    Drivers hand back ``datetime`` for real values and the raw text for MariaDB's zero date;
    SQLite hands back text. Legacy DATETIMEs carry no zone and are taken as UTC.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        text = str(value).strip()
        if not text or text.startswith("0000-00-00"):
            return None
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def require_occurred_at(fecha: Any) -> datetime:
    """An encounter without a real date cannot be placed on a patient's timeline."""
    occurred_at = coerce_datetime(fecha)
    if occurred_at is None:
        raise Quarantined(MISSING_DATE, "encounter date is NULL or zero")
    return occurred_at


# --- encounters ------------------------------------------------------------------------------


def normalize_encounter_kind(tipo: str | None) -> str:
    """Translate the legacy Spanish encounter type, any case; junk is 'other'."""
    return ENCOUNTER_KINDS.get((clean_text(tipo) or "").lower(), "other")


def normalize_encounter_status(estado: str | None) -> str:
    """Translate the legacy Spanish status, any case; junk is 'unknown'."""
    return ENCOUNTER_STATUSES.get((clean_text(estado) or "").lower(), "unknown")


def normalize_icd10(diagnostico: str | None) -> str | None:
    """Store ICD-10 codes upper-case and dotted (J459 → J45.9); malformed codes are quarantined."""
    code = re.sub(r"\s", "", remove_nul(diagnostico) or "").upper()
    if not code:
        return None
    match = ICD10_PATTERN.fullmatch(code)
    if match is None:
        raise Quarantined(INVALID_ICD10, "diagnosis is not a well-formed ICD-10 code")
    category, subcode = match.groups()
    return f"{category}.{subcode}" if subcode else category


def require_fits(record: Mapping[str, Any], widths: Mapping[str, int]) -> None:
    """A value its target cannot hold quarantines the record (INVALID_VALUE): text longer than its
    column after the rules, an integer outside int64. ``detail`` names the field, never the value."""
    for name, value in record.items():
        if isinstance(value, str) and name in widths and len(value) > widths[name]:
            raise Quarantined(INVALID_VALUE, f"{name} is longer than {widths[name]} characters")
        if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
            raise Quarantined(INVALID_VALUE, f"{name} is outside the 64-bit integer range")


def require_patient(patient_id: int | None) -> int:
    """An encounter must hang off a patient that was migrated in the same sistema."""
    if patient_id is None:
        raise Quarantined(ORPHAN_PATIENT, "patient is not migrated in this sistema")
    return patient_id


# --- whole records ---------------------------------------------------------------------------


def transform_patient(
    row: Mapping[str, Any], *, today: date, mapping: PractitionerMapping | None = None
) -> dict[str, Any]:
    """Map one eligible ``pacientes`` row to its ``clinical.patients`` fields (no duplicates check).

    The per-row rules run in §6 order; DUPLICATE_DOCUMENT needs the other rows of the sistema
    and is decided by :func:`first_claim_wins` over the rows that pass these.
    """
    national_id = normalize_national_id(row["documento"])
    given_name = clean_text(row["nombres"])
    family_name = clean_text(row["apellidos"])
    require_name(given_name, family_name)
    record = {
        "sistema": row["sistema"],
        "legacy_id": int(row["id"]),
        "national_id": national_id,
        "document_type": normalize_document_type(row["tipo_documento"]),
        "given_name": given_name,
        "family_name": family_name,
        "birth_date": parse_birth_date(row["fecha_nacimiento"], today),
        "sex": normalize_sex(row["sexo"]),
        "email": normalize_email(row["email"]),
        "phone": normalize_phone(row["telefono"]),
        "practitioner_id": map_practitioner(row["profesional_id"], mapping),
        "source_updated_at": coerce_datetime(row["actualizado_en"]),
    }
    require_fits(record, PATIENT_WIDTHS)
    return record


def transform_encounter(
    row: Mapping[str, Any],
    *,
    patient_id: int | None,
    mapping: PractitionerMapping | None = None,
) -> dict[str, Any]:
    """Map one eligible ``atenciones`` row; ``patient_id`` is the migrated patient's target id."""
    target_patient = require_patient(patient_id)
    occurred_at = require_occurred_at(row["fecha"])
    icd10 = normalize_icd10(row["diagnostico"])
    record = {
        "sistema": row["sistema"],
        "legacy_id": int(row["id"]),
        "patient_id": target_patient,
        "practitioner_id": map_practitioner(row["profesional_id"], mapping),
        "occurred_at": occurred_at,
        "kind": normalize_encounter_kind(row["tipo"]),
        "icd10": icd10,
        "notes": remove_nul(row["notas"]),
        "status": normalize_encounter_status(row["estado"]),
        "source_updated_at": coerce_datetime(row["actualizado_en"]),
    }
    require_fits(record, ENCOUNTER_WIDTHS)
    return record


def first_claim_wins(claims: Mapping[int, str], held: Mapping[str, int]) -> tuple[dict[str, int], set[int]]:
    """Decide DUPLICATE_DOCUMENT: per national id, the lowest legacy id is the one migrated.

    ``claims`` maps the legacy ids of this batch that passed the per-row rules to their national
    id; ``held`` maps national ids to the legacy id currently holding them in the target (rows
    outside this batch). Returns the owner of every claimed national id and the batch ids that
    lose (duplicates).
    """
    owners: dict[str, int] = {}
    for legacy_id, national_id in claims.items():
        owners[national_id] = min(owners.get(national_id, legacy_id), legacy_id)
    for national_id, legacy_id in held.items():
        if national_id in owners:
            owners[national_id] = min(owners[national_id], legacy_id)
    losers = {legacy_id for legacy_id, national_id in claims.items() if owners[national_id] != legacy_id}
    return owners, losers


# --- content hash ----------------------------------------------------------------------------


# The canonical form's JSON settings, as prebuilt encoders (json.dumps builds one per call).
_FORM_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_VALUE_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True, default=str)


def _typed(value: Any) -> list[Any]:
    kind = type(value)  # the common exact types first (one look-up each), then the general cases
    if kind is str:
        return ["str", value]
    if value is None:
        return ["null"]
    if kind is int:
        return ["int", str(value)]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", str(value)]
    if isinstance(value, float):
        return ["float", repr(value)]
    if isinstance(value, datetime):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if type(aware) is datetime and aware.year >= 1000:  # isoformat is strftime's text here, faster
            return ["datetime", aware.isoformat(timespec="microseconds")[:-6] + "Z"]
        return ["datetime", aware.strftime("%Y-%m-%dT%H:%M:%S.%fZ")]
    if isinstance(value, date):
        return ["date", value.isoformat()]
    if isinstance(value, str):
        return ["str", value]
    if isinstance(value, (dict, list, tuple)):
        return ["json", _VALUE_JSON.encode(value)]
    raise TypeError(f"content_hash cannot serialize a {type(value).__name__}")


def canonical_form(fields: Mapping[str, Any]) -> str:
    """Typed, key-sorted serialization: JSON escaping makes every separator unambiguous."""
    return _FORM_JSON.encode([[key, *_typed(fields[key])] for key in sorted(fields)])


def content_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical form of a target record: the same function on both sides."""
    return hashlib.sha256(canonical_form(fields).encode("utf-8")).hexdigest()


def encounter_hash(record: Mapping[str, Any], patient_legacy_id: int) -> str:
    """An encounter's content hash. Its patient enters as the patient's *legacy* id, never the
    target's surrogate ``patient_id``: the same source gives the same hash on any target, whatever
    its sequences did (a second target, a resumed run with sequence gaps)."""
    fields = {name: value for name, value in record.items() if name != "patient_id"}
    return content_hash({**fields, "patient_legacy_id": patient_legacy_id})
