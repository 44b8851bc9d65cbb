"""The §6 rules and the content hash, a batch at a time (polars): the fast path of worker/rules.py.

worker/rules.py stays the reference: every function here computes, for a whole batch, exactly what
the rule of the same name there computes for one row — the same values, the same quarantine reason
and detail, the same content-hash bytes — and tests/test_batch_rules.py holds them to it on a
randomized legacy set with every rule branch and hostile values. Change a rule there first.

No database and no Dagster here: the worker calls these on the batches it reads, the integrity
check on the batches it verifies.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import date
from typing import Any

import polars as pl
import polars_hash as plh

from worker import rules

# The characters Python's str.split()/str.strip()/re's \s treat as whitespace (Rust's \s differs:
# it leaves out U+001C–U+001F).
# Spelled out (scanning all of Unicode at import costs ~0.1 s of every run's start-up);
# tests/test_worker_speed_guards.py holds it to str.isspace() over every code point.
_PY_SPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_SPACE_CLASS = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in _PY_SPACE) + "]"
_NOT_SPACE_OR_AT = "[^@" + _SPACE_CLASS[1:-1] + "]"
# JSON string escaping exactly as json.dumps(ensure_ascii=False) does it.
_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_JSON_ESCAPES |= {chr(c): f"\\u{c:04x}" for c in range(0x20) if chr(c) not in _JSON_ESCAPES}

REASON = "_reason"
DETAIL = "_detail"
HASH = "content_hash"


# --- strings ---------------------------------------------------------------------------------


def remove_nul(expr: pl.Expr) -> pl.Expr:
    return expr.str.replace_all("\x00", "", literal=True)


def strip_py(expr: pl.Expr) -> pl.Expr:
    """str.strip(): leading and trailing Python whitespace."""
    return expr.str.strip_chars(_PY_SPACE)


def clean_text(expr: pl.Expr) -> pl.Expr:
    """rules.clean_text: U+0000 removed, whitespace runs collapsed, trimmed; empty → NULL."""
    collapsed = strip_py(remove_nul(expr).str.replace_all(_SPACE_CLASS + "+", " "))
    return pl.when(collapsed == "").then(None).otherwise(collapsed)


def _first_problem(*checks: tuple[pl.Expr, str, str]) -> tuple[pl.Expr, pl.Expr]:
    """The reason and detail of the first failing check, in order (NULL when none fails)."""
    reason: Any = pl.lit(None, dtype=pl.String)
    detail: Any = pl.lit(None, dtype=pl.String)
    for failing, code, text in reversed(checks):
        reason = pl.when(failing).then(pl.lit(code)).otherwise(reason)
        detail = pl.when(failing).then(pl.lit(text)).otherwise(detail)
    return reason, detail


def _fits(widths: Mapping[str, int], order: list[str], ints: list[str]) -> list[tuple[pl.Expr, str, str]]:
    """rules.require_fits, field by field in record order."""
    checks = []
    for name in order:
        if name in widths:
            checks.append(
                (
                    pl.col(name).str.len_chars() > widths[name],
                    rules.INVALID_VALUE,
                    f"{name} is longer than {widths[name]} characters",
                )
            )
        elif name in ints:
            low, high = rules.INT64
            checks.append(
                (
                    (pl.col(name) < low) | (pl.col(name) > high),
                    rules.INVALID_VALUE,
                    f"{name} is outside the 64-bit integer range",
                )
            )
    return [(failing.fill_null(False), code, text) for failing, code, text in checks]


def _utc(expr: pl.Expr) -> pl.Expr:
    """rules.coerce_datetime of a naive DATETIME column (zero dates read as NULL): taken as UTC."""
    return expr.dt.replace_time_zone("UTC")


# --- patients --------------------------------------------------------------------------------

PATIENT_FIELDS = [
    "sistema", "legacy_id", "national_id", "document_type", "given_name", "family_name", "birth_date", "sex",
    "email", "phone", "practitioner_id", "source_updated_at",
]  # fmt: skip
ENCOUNTER_FIELDS = [
    "sistema", "legacy_id", "patient_id", "practitioner_id", "occurred_at", "kind", "icd10", "notes", "status",
    "source_updated_at",
]  # fmt: skip
# The fields an encounter's content hash covers: its patient enters as the patient's legacy id (§6).
ENCOUNTER_HASH_FIELDS = [f for f in ENCOUNTER_FIELDS if f != "patient_id"] + ["patient_legacy_id"]


def _birth_date(raw: pl.Expr, today: date) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """rules.parse_birth_date: (value, not-a-real-date, out-of-range). One expression, for a single
    use; :func:`transform_patients` computes the same in stages (each step once per batch)."""
    text = strip_py(remove_nul(raw).fill_null(""))
    parsed = _parsed_birth_date(text)
    unknown, unreal, out_of_range = _birth_date_checks(text, parsed, today)
    return pl.when(unknown | unreal | out_of_range).then(None).otherwise(parsed), unreal, out_of_range


def _parsed_birth_date(text: pl.Expr) -> pl.Expr:
    """The date ``text`` (NUL-free, stripped) spells in one of the two known formats, else NULL."""
    iso = text.str.contains(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
    dmy = text.str.contains(r"^[0-9]{2}/[0-9]{2}/[0-9]{4}$")
    parsed = (
        pl.when(iso)
        .then(text.str.strptime(pl.Date, "%Y-%m-%d", strict=False))
        .when(dmy)
        .then(text.str.strptime(pl.Date, "%d/%m/%Y", strict=False))
    )
    return pl.when(parsed.dt.year() >= 1).then(parsed)  # Python's date has no year 0


def _birth_date_checks(text: pl.Expr, parsed: pl.Expr, today: date) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """(unknown, not-a-real-date, out-of-range) of a birth date's text and its parsed value."""
    unknown = (text == "") | (text == "0000-00-00")
    unreal = ~unknown & parsed.is_null()
    out_of_range = ~unknown & ~unreal & ((parsed < rules.EARLIEST_BIRTH_DATE) | (parsed > today))
    return unknown, unreal, out_of_range


def _practitioner(expr: pl.Expr, mapping: rules.PractitionerMapping | None) -> pl.Expr:
    if mapping is None:
        return expr.cast(pl.Int64)
    return pl.when(expr == mapping.source).then(pl.lit(mapping.target, pl.Int64)).otherwise(expr.cast(pl.Int64))


def _collapsed(expr: pl.Expr) -> pl.Expr:
    """The first step of :func:`clean_text`: U+0000 removed, whitespace runs collapsed, trimmed."""
    return strip_py(remove_nul(expr).str.replace_all(_SPACE_CLASS + "+", " "))


def _empty_to_null(expr: pl.Expr) -> pl.Expr:
    """The second step of :func:`clean_text`: empty → NULL."""
    return pl.when(expr == "").then(None).otherwise(expr)


def transform_patients(
    rows: pl.DataFrame, *, today: date, mapping: rules.PractitionerMapping | None = None
) -> pl.DataFrame:
    """rules.transform_patient for every row: the target fields, then ``_reason``/``_detail`` (NULL
    for a row that passes) and the content hash of the rows that pass. DUPLICATE_DOCUMENT is not
    decided here (it needs the target), as in the reference.

    Computed in stages of intermediate columns (``_…``), so that every step — a regex, a date
    parse — runs once per batch, however many rules read its result."""
    stages, reason, detail = _patient_plan(today, mapping)
    planned = rows.lazy()
    for stage in stages[:-1]:
        planned = planned.with_columns(stage)
    out = planned.select(stages[-1])
    out = out.with_columns(reason.alias(REASON), detail.alias(DETAIL)).drop("_unreal", "_out_of_range", "_no_name")
    return with_hashes(out.collect(), PATIENT_FIELDS)


@functools.lru_cache(maxsize=8)
def _patient_plan(
    today: date, mapping: rules.PractitionerMapping | None
) -> tuple[tuple[tuple[pl.Expr, ...], ...], pl.Expr, pl.Expr]:
    """The expressions of :func:`transform_patients`, built once per (day, mapping): building them
    costs more than applying them to a page of a few thousand rows. Stages of ``with_columns``, the
    final ``select``, then the reason and detail."""
    c = pl.col
    # Stage 1: the cleaned texts.
    stage1 = [
        _collapsed(c("nombres")).alias("_given"),
        _collapsed(c("apellidos")).alias("_family"),
        _collapsed(c("email")).alias("_email"),
        _collapsed(c("tipo_documento")).alias("_doctype"),
        strip_py(remove_nul(c("fecha_nacimiento")).fill_null("")).alias("_bd_text"),
    ]
    # Stage 2: NULL for empty texts; the birth date parsed.
    stage2 = [
        _empty_to_null(c("_given")).alias("_given"),
        _empty_to_null(c("_family")).alias("_family"),
        _empty_to_null(c("_email")).fill_null("").str.to_lowercase().alias("_email"),
        _empty_to_null(c("_doctype")).fill_null("").str.to_uppercase().alias("_doctype"),
        _parsed_birth_date(c("_bd_text")).alias("_bd"),
    ]
    unknown, unreal, out_of_range = _birth_date_checks(c("_bd_text"), c("_bd"), today)
    stage3 = [unreal.alias("_unreal"), out_of_range.alias("_out_of_range"), unknown.alias("_unknown")]
    national_id = c("documento").fill_null("").str.replace_all("[^0-9A-Za-z]", "").str.to_uppercase()
    given, family, email, document_type = c("_given"), c("_family"), c("_email"), c("_doctype")
    birth = pl.when(c("_unknown") | c("_unreal") | c("_out_of_range")).then(None).otherwise(c("_bd"))
    email_ok = (email.str.len_chars() <= rules.EMAIL_MAX_LENGTH) & email.str.contains(
        f"^{_NOT_SPACE_OR_AT}+@{_NOT_SPACE_OR_AT}+\\.{_NOT_SPACE_OR_AT}+$"
    )
    phone_text = c("telefono").fill_null("")
    digits = phone_text.str.replace_all("[^0-9]", "")
    plus = phone_text.str.extract(r"^([^0-9]*)", 1).str.contains("+", literal=True)
    sex = strip_py(c("sexo").fill_null("")).str.to_uppercase()
    selected = [
        c("sistema"),
        c("id").cast(pl.Int64).alias("legacy_id"),
        national_id.alias("national_id"),
        pl.when(document_type.is_in(sorted(rules.DOCUMENT_TYPES))).then(document_type).alias("document_type"),
        given.alias("given_name"),
        family.alias("family_name"),
        birth.alias("birth_date"),
        sex.replace_strict(rules.SEX_CODES, default="unknown", return_dtype=pl.String).alias("sex"),
        pl.when(email_ok).then(email).alias("email"),
        pl.when(digits != "").then(pl.when(plus).then("+" + digits).otherwise(digits)).alias("phone"),
        _practitioner(c("profesional_id"), mapping).alias("practitioner_id"),
        _utc(c("actualizado_en")).alias("source_updated_at"),
        c("_unreal"),
        c("_out_of_range"),
        (given.is_null() & family.is_null()).alias("_no_name"),
    ]
    reason, detail = _first_problem(
        (c("national_id") == "", rules.MISSING_DOCUMENT, "document is empty after removing separators"),
        (c("_no_name"), rules.MISSING_NAME, "both given and family names are empty"),
        (c("_unreal"), rules.INVALID_BIRTH_DATE, "birth date is not a real date in a known format"),
        (c("_out_of_range"), rules.INVALID_BIRTH_DATE, "birth date is before 1900 or in the future"),
        *_fits(rules.PATIENT_WIDTHS, PATIENT_FIELDS, ["legacy_id", "practitioner_id"]),
    )
    return (tuple(stage1), tuple(stage2), tuple(stage3), tuple(selected)), reason, detail


# --- encounters ------------------------------------------------------------------------------


def transform_encounters(
    rows: pl.DataFrame, patient_ids: pl.DataFrame, *, mapping: rules.PractitionerMapping | None = None
) -> pl.DataFrame:
    """rules.transform_encounter for every row. ``patient_ids`` maps ``legacy_id`` → ``id`` of the
    patients migrated in this sistema; the hash enters each encounter's patient by its legacy id
    (``patient_legacy_id``, kept as a column)."""
    linked = rows.lazy().join(
        patient_ids.lazy().select(
            pl.col("legacy_id").cast(pl.Int64).alias("_pl"), pl.col("id").cast(pl.Int64).alias("_pid")
        ),
        left_on=pl.col("paciente_id").cast(pl.Int64),
        right_on="_pl",
        how="left",
        maintain_order="left",
    )
    selected, reason, detail, hashed = _encounter_plan(mapping)
    out = linked.select(selected)
    out = out.with_columns(reason.alias(REASON), detail.alias(DETAIL)).drop("_bad_icd")
    return with_hashes(out.collect(), list(hashed))


@functools.lru_cache(maxsize=8)
def _encounter_plan(
    mapping: rules.PractitionerMapping | None,
) -> tuple[tuple[pl.Expr, ...], pl.Expr, pl.Expr, tuple[str, ...]]:
    """The expressions of :func:`transform_encounters`, built once per mapping: the ``select`` of a
    page joined to its patients, the reason, the detail, and the hashed fields."""
    icd = remove_nul(pl.col("diagnostico").fill_null("")).str.replace_all(_SPACE_CLASS, "").str.to_uppercase()
    icd_parts = icd.str.extract_groups(r"^([A-Z][0-9]{2})(?:\.?([0-9A-Z]{1,4}))?$")
    category, subcode = icd_parts.struct.field("1"), icd_parts.struct.field("2")
    icd10 = pl.when(subcode.is_not_null()).then(category + "." + subcode).otherwise(category)
    occurred = _utc(pl.col("fecha"))
    selected = [
        pl.col("sistema"),
        pl.col("id").cast(pl.Int64).alias("legacy_id"),
        pl.col("_pid").alias("patient_id"),
        _practitioner(pl.col("profesional_id"), mapping).alias("practitioner_id"),
        occurred.alias("occurred_at"),
        clean_text(pl.col("tipo"))
        .fill_null("")
        .str.to_lowercase()
        .replace_strict(rules.ENCOUNTER_KINDS, default="other", return_dtype=pl.String)
        .alias("kind"),
        pl.when(icd != "").then(icd10).alias("icd10"),
        remove_nul(pl.col("notas")).alias("notes"),
        clean_text(pl.col("estado"))
        .fill_null("")
        .str.to_lowercase()
        .replace_strict(rules.ENCOUNTER_STATUSES, default="unknown", return_dtype=pl.String)
        .alias("status"),
        _utc(pl.col("actualizado_en")).alias("source_updated_at"),
        pl.col("paciente_id").cast(pl.Int64).alias("patient_legacy_id"),
        ((icd != "") & category.is_null()).alias("_bad_icd"),
    ]
    reason, detail = _first_problem(
        (pl.col("patient_id").is_null(), rules.ORPHAN_PATIENT, "patient is not migrated in this sistema"),
        (pl.col("occurred_at").is_null(), rules.MISSING_DATE, "encounter date is NULL or zero"),
        (pl.col("_bad_icd"), rules.INVALID_ICD10, "diagnosis is not a well-formed ICD-10 code"),
        *_fits(rules.ENCOUNTER_WIDTHS, ENCOUNTER_FIELDS, ["legacy_id", "patient_id", "practitioner_id"]),
    )
    return tuple(selected), reason, detail, tuple(ENCOUNTER_HASH_FIELDS)


# --- content hash ----------------------------------------------------------------------------


def json_string(expr: pl.Expr) -> pl.Expr:
    """A string as json.dumps(ensure_ascii=False) writes it, quotes included."""
    escaped = expr.str.replace_many(list(_JSON_ESCAPES), list(_JSON_ESCAPES.values()))
    return pl.lit('"') + escaped + pl.lit('"')


def _typed_value(name: str, dtype: pl.DataType) -> pl.Expr:
    """rules._typed of one column without its name: the JSON of ``type, value`` (``"str","x"``),
    NULL where the column is NULL."""
    col = pl.col(name)
    if dtype == pl.String:
        return pl.concat_str([pl.lit('"str",'), json_string(col)])
    if dtype.is_integer():
        return pl.concat_str([pl.lit('"int","'), col.cast(pl.String), pl.lit('"')])
    if dtype == pl.Boolean:
        return pl.when(col).then(pl.lit('"bool",true')).when(~col).then(pl.lit('"bool",false'))
    if dtype == pl.Date:
        return pl.concat_str([pl.lit('"date","'), col.dt.to_string("%Y-%m-%d"), pl.lit('"')])
    if isinstance(dtype, pl.Datetime):
        utc = col.dt.convert_time_zone("UTC") if dtype.time_zone else col
        # strftime's %Y writes a year below 1000 without leading zeros ('999'): the reference does.
        year = utc.dt.year().cast(pl.String)
        return pl.concat_str([pl.lit('"datetime","'), year, utc.dt.to_string("-%m-%dT%H:%M:%S.%6fZ"), pl.lit('"')])
    if dtype == pl.Null:
        return pl.lit(None, dtype=pl.String)
    raise TypeError(f"content hash cannot serialize a {dtype} column ({name})")


def canonical_forms(frame: pl.DataFrame, fields: list[str]) -> pl.Series:
    """rules.canonical_form of every row over ``fields`` (keys sorted)."""
    form = _form(tuple((name, frame.schema[name]) for name in sorted(fields)))
    return frame.lazy().select(form).collect()[:, 0]


@functools.lru_cache(maxsize=16)
def _form(typed: tuple[tuple[str, pl.DataType], ...]) -> pl.Expr:
    """The canonical-form expression of columns of these names and types, built once: one
    ``concat_str`` of the constant parts (``[["name",`` … ``],["next",``) and each column's typed
    value, ``"null"`` where it is NULL (``[name, "null"]``)."""
    parts: list[pl.Expr] = []
    for i, (name, dtype) in enumerate(typed):
        parts.append(pl.lit(("[[" if i == 0 else "],[") + f'"{name}",'))
        parts.append(_typed_value(name, dtype).fill_null(pl.lit('"null"')))
    parts.append(pl.lit("]]" if typed else "[]"))
    return pl.concat_str(parts)


def hashes(frame: pl.DataFrame, fields: list[str]) -> pl.Series:
    """rules.content_hash of every row over ``fields``: SHA-256 of the UTF-8 canonical form, hex."""
    return canonical_forms(frame, fields).to_frame("form").select(plh.col("form").chash.sha2_256().alias(HASH))[HASH]


def with_hashes(frame: pl.DataFrame, fields: list[str]) -> pl.DataFrame:
    """The frame with its rows' content hashes (NULL for quarantined rows)."""
    passing = frame[REASON].is_null()
    digests = pl.Series(HASH, [None] * frame.height, dtype=pl.String)
    if passing.any():
        digests = digests.scatter(passing.arg_true(), hashes(frame.filter(passing), fields))
    return frame.with_columns(digests)
