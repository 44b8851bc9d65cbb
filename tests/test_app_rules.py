"""Every §6 rule for users, files and filters, each quarantine reason and its order (pure logic)."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from google.api_core.datetime_helpers import DatetimeWithNanoseconds

from worker import app_rules, rules
from worker.app_rules import Quarantined
from worker.firestore_size import MAX_DOCUMENT_BYTES, document_size

FILE_UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # sha256("test")
PASSWORD = "pbkdf2_sha256$870000$abc$ZGVmZw== "  # the trailing space is part of the hash


def caught(call: Callable[[], Any]) -> Quarantined:
    with pytest.raises(Quarantined) as raised:
        call()
    return raised.value


def user_row(**overrides: Any) -> dict[str, Any]:
    return {
        "id": 42,
        "password": PASSWORD,
        "last_login": "2025-03-04 05:06:07.123456",  # SQLite hands back text
        "is_superuser": 0,
        "username": "  ana.gomez ",
        "first_name": "  Ana   María ",
        "last_name": "",
        "email": "  Ana.Gomez@Example.COM ",
        "is_staff": True,
        "is_active": 1,
        "date_joined": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        **overrides,
    }


def file_row(**overrides: Any) -> dict[str, Any]:
    return {
        "id": 7,
        "user_id": 42,
        "file_id": uuid.UUID(FILE_UUID),
        "file_name": "  Ventas   Q1 ✓.csv ",
        "file_path": "uploads/42/ventas.csv",
        "uploaded_at": datetime(2025, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=-5))),
        "system_tags": ["csv"],
        "user_tags": ["ventas", "🚀"],
        "metadata": {"rows": 120, "columns": ["a", "b"], "delimiter": ","},
        "size_bytes": 4,
        "sha256": SHA,
        "updated_at": datetime(2025, 5, 7, tzinfo=UTC),
        **overrides,
    }


def filter_row(**overrides: Any) -> dict[str, Any]:
    return {
        "id": 3,
        "user_id": 42,
        "file_id": 7,
        "name": " Solo   CA ",
        "definition": {"column": "state", "op": "in", "values": ["CA", "NY"]},
        "created_at": datetime(2025, 1, 1, tzinfo=UTC),
        "updated_at": "2025-01-02 00:00:00",
        **overrides,
    }


def migrate_file(
    row: dict[str, Any], *, user_migrated: bool = True, exists: bool = True, content: bytes = b"test"
) -> dict[str, Any]:
    """The file rules in §6 order, the I/O parts given as values (as the files asset does)."""
    app_rules.require_user(user_migrated)
    app_rules.require_safe_path(row["file_path"])
    if not exists:
        raise Quarantined(app_rules.MISSING_BLOB, "file is missing")
    actual = hashlib.sha256(content).hexdigest()
    app_rules.require_checksum(row["sha256"], actual)
    app_rules.require_size(row["size_bytes"], len(content))
    key = app_rules.blob_key(row["user_id"], row["file_id"])
    return app_rules.file_document(row, size_bytes=len(content), sha256=actual, blob_url=f"gs://bucket/{key}")


def migrate_filter(row: dict[str, Any], *, user_migrated: bool = True, file_migrated: bool = True) -> dict[str, Any]:
    app_rules.require_user(user_migrated)
    app_rules.require_file(row["file_id"], file_migrated)
    return app_rules.filter_document(row)


# --- shards ---------------------------------------------------------------------------------


def test_shard_of_is_user_id_modulo_16_and_null_is_zero() -> None:
    assert [app_rules.shard_of(n) for n in (0, 1, 15, 16, 17, 33)] == [0, 1, 15, 0, 1, 1]
    assert app_rules.shard_of(None) == 0
    assert app_rules.shard_of(-1) == 15  # the SQL filter agrees (tested against real databases)


def test_shard_keys_round_trip() -> None:
    keys = [app_rules.shard_key(n) for n in range(app_rules.SHARDS)]
    assert keys[0] == "shard-00" and keys[7] == "shard-07" and keys[-1] == "shard-15"
    assert [app_rules.shard_number(k) for k in keys] == list(range(16))


@pytest.mark.parametrize(
    "key", ["shard-16", "shard-7", "shard-007", "shard-07\n", " shard-07", "SHARD-07", "shard-٠٧", "shard--1", ""]
)
def test_shard_number_refuses_anything_but_the_16_keys(key: str) -> None:
    with pytest.raises(ValueError) as raised:
        app_rules.shard_number(key)
    assert key not in str(raised.value) or not key


@pytest.mark.parametrize("number", [-1, 16, True])
def test_shard_key_refuses_numbers_outside_the_shards(number: int) -> None:
    with pytest.raises(ValueError):
        app_rules.shard_key(number)


# --- users ----------------------------------------------------------------------------------


def test_user_document() -> None:
    assert app_rules.transform_user(user_row()) == {
        "legacy_id": 42,
        "username": "ana.gomez",
        "email": "ana.gomez@example.com",
        "first_name": "Ana María",
        "last_name": None,
        "is_active": True,
        "is_staff": True,
        "is_superuser": False,
        "date_joined": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "last_login": datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC),
        "password_hash": PASSWORD,
    }


@pytest.mark.parametrize("username", ["", "   ", "\t\n", "\u3000", "\x00", " \x00 ", None])
def test_empty_username_is_invalid_username(username: str | None) -> None:
    problem = caught(lambda: app_rules.transform_user(user_row(username=username)))
    assert problem.reason == app_rules.INVALID_USERNAME


@pytest.mark.parametrize(
    ("email", "expected"),
    [
        ("", None),
        ("   ", None),
        (" A@B.CO ", "a@b.co"),
        ("not-an-email", "not-an-email"),  # not validated: §6 keeps what was typed
        ("Ｍ@x.io", "ｍ@x.io"),
        ("a\x00b@c.de", "ab@c.de"),
    ],
)
def test_email_is_lower_case_and_blank_is_null(email: str, expected: str | None) -> None:
    assert app_rules.transform_user(user_row(email=email))["email"] == expected


def test_password_hash_is_copied_exactly_but_nul() -> None:
    document = app_rules.transform_user(user_row(password=" pbkdf2\x00$x$ y "))
    assert document["password_hash"] == " pbkdf2$x$ y "


def test_user_flags_and_dates_as_sqlite_gives_them() -> None:
    document = app_rules.transform_user(
        user_row(is_active="0", is_staff=0, is_superuser="true", last_login=None, date_joined="2024-02-03T04:05:06")
    )
    assert (document["is_active"], document["is_staff"], document["is_superuser"]) == (False, False, True)
    assert document["last_login"] is None
    assert document["date_joined"] == datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC)


def test_user_names_keep_emoji_rtl_and_zero_width() -> None:
    document = app_rules.transform_user(user_row(first_name=" מרים\u200b  🦄 ", last_name="  عبد  الله "))
    assert document["first_name"] == "מרים\u200b 🦄"
    assert document["last_name"] == "عبد الله"


def test_quarantine_and_errors_never_carry_user_values() -> None:
    secret = "pbkdf2_sha256$1$salt$SECRETHASH"
    problem = caught(lambda: app_rules.transform_user(user_row(username=" ", password=secret, email="x@y.z")))
    assert secret not in str(problem) and "x@y.z" not in str(problem)


# --- files ----------------------------------------------------------------------------------


def test_file_document() -> None:
    document = migrate_file(file_row())
    assert document == {
        "legacy_id": 7,
        "user_id": 42,
        "file_id": FILE_UUID,
        "file_name": "Ventas Q1 ✓.csv",
        "size_bytes": 4,
        "sha256": SHA,
        "uploaded_at": datetime(2025, 5, 6, 12, 8, 9, tzinfo=UTC),
        "system_tags": ["csv"],
        "user_tags": ["ventas", "🚀"],
        "metadata": {"rows": 120, "columns": ["a", "b"], "delimiter": ","},
        "blob_url": f"gs://bucket/files/42/{FILE_UUID}",
    }


def test_size_and_sha_are_those_of_the_real_content() -> None:
    document = migrate_file(file_row(size_bytes=None, sha256=None), content=b"other bytes")
    assert document["size_bytes"] == 11
    assert document["sha256"] == hashlib.sha256(b"other bytes").hexdigest()


def test_file_of_a_user_not_migrated_is_orphan_user() -> None:
    assert caught(lambda: migrate_file(file_row(user_id=None), user_migrated=False)).reason == app_rules.ORPHAN_USER


@pytest.mark.parametrize(
    "path",
    [
        "../outside/secret.csv",
        "uploads/../../etc/passwd",
        "uploads/..",
        "..",
        "..\\outside\\secret.csv",
        "uploads\\..\\..\\x.csv",
        "/etc/passwd",
        "\\\\server\\share\\x.csv",
        "C:\\temp\\x.csv",
        "c:/temp/x.csv",
        "",
        None,
        "uploads/a\x00.csv",
        "uploads/./a.csv",  # an empty or '.' part: refused too, so no spelling of a path is ambiguous
        "uploads//a.csv",
    ],
)
def test_unsafe_paths_are_refused(path: str | None) -> None:
    problem = caught(lambda: app_rules.require_safe_path(path))
    assert problem.reason == app_rules.UNSAFE_PATH
    assert not path or path not in problem.detail


@pytest.mark.parametrize("path", ["uploads/42/a.csv", "a..b/..c.csv", "uploads/報告 2024.csv", "x"])
def test_safe_paths_pass_unchanged(path: str) -> None:
    assert app_rules.require_safe_path(path) == path


@pytest.mark.parametrize("recorded", [SHA, SHA.upper(), f" {SHA} ", None, "", " " * 64])
def test_checksum_matches_in_any_case_and_null_is_not_a_mismatch(recorded: str | None) -> None:
    app_rules.require_checksum(recorded, SHA)


def test_checksum_mismatch() -> None:
    problem = caught(lambda: app_rules.require_checksum("0" * 64, SHA))
    assert problem.reason == app_rules.CHECKSUM_MISMATCH and SHA not in problem.detail


def test_recorded_size_is_checked_only_when_recorded() -> None:
    app_rules.require_size(None, 10)
    app_rules.require_size(10, 10)
    assert caught(lambda: app_rules.require_size(11, 10)).reason == app_rules.CHECKSUM_MISMATCH


def test_blob_key_is_normalized() -> None:
    assert app_rules.blob_key(42, FILE_UUID.upper()) == f"files/42/{FILE_UUID}"
    assert app_rules.blob_key(42, "{" + FILE_UUID + "}") == f"files/42/{FILE_UUID}"
    problem = caught(lambda: app_rules.blob_key(42, "../../etc/passwd"))
    assert problem.reason == rules.INVALID_VALUE and "passwd" not in problem.detail


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"metadata": {"preview": [["a", "b"], ["1", "2"]]}}, "metadata"),
        ({"metadata": {"layout": {"blocks": [{"cells": [[1]]}]}}}, "metadata"),
        ({"metadata": {"source": {"__meta__": "x"}}}, "metadata"),
        ({"metadata": {"__x__": 1}}, "metadata"),
        ({"metadata": {"a": [{"": 1}]}}, "metadata"),
        ({"metadata": {"stats": {"n": 2**63}}}, "metadata"),
        ({"metadata": {"stats": [-(2**63) - 1]}}, "metadata"),
        ({"metadata": None}, "metadata"),
        ({"metadata": ["not", "a", "map"]}, "metadata"),
        ({"system_tags": ["csv", ["nested"]]}, "system_tags"),
        ({"user_tags": "csv"}, "user_tags"),
        ({"user_tags": ["\ud800"]}, "user_tags"),
        ({"metadata": {"a\x00": 1, "a": 2}}, "metadata"),
        ({"file_id": "not-a-uuid"}, "file_id"),
    ],
)
def test_values_firestore_refuses_are_invalid_value_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    problem = caught(lambda: migrate_file(file_row(**overrides)))
    assert problem.reason == rules.INVALID_VALUE
    assert problem.detail.startswith(field)


def test_firestore_limits_are_inclusive_at_their_bounds() -> None:
    document = migrate_file(file_row(metadata={"max": 2**63 - 1, "min": -(2**63), "__x": 1, "x__": 2, "_": 3}))
    assert document["metadata"]["max"] == 2**63 - 1


def test_nesting_deeper_than_firestore_allows_is_invalid_value() -> None:
    def nested(depth: int) -> dict[str, Any]:
        value: dict[str, Any] = {"leaf": 1}
        for _ in range(depth - 2):  # the metadata field is level 1 and 'leaf' the last level
            value = {"k": value}
        return value

    assert migrate_file(file_row(metadata=nested(app_rules.MAX_FIELD_DEPTH)))["metadata"]
    problem = caught(lambda: migrate_file(file_row(metadata=nested(app_rules.MAX_FIELD_DEPTH + 1))))
    assert problem.reason == rules.INVALID_VALUE and problem.detail.startswith("metadata")
    very_deep: Any = 1
    for _ in range(5000):  # never a RecursionError: a bad value never crashes a run
        very_deep = [very_deep, 0]
    assert caught(lambda: migrate_file(file_row(metadata={"d": very_deep}))).reason == rules.INVALID_VALUE


def test_document_over_1_mib_is_invalid_value_naming_its_largest_field() -> None:
    path = "files/7"
    huge = {"preview": "x" * MAX_DOCUMENT_BYTES}
    problem = caught(lambda: migrate_file(file_row(metadata=huge)))
    assert problem.reason == rules.INVALID_VALUE
    assert problem.detail == "document is larger than 1 MiB (largest field: metadata)"
    assert "xxxx" not in problem.detail
    # Exactly at the limit once the writer's bookkeeping is added: refused; one byte less: kept.
    base = migrate_file(file_row(metadata={"preview": ""}))
    written = {**base, "shard": "shard-10", "content_hash": "0" * 64, "run_id": "r" * 64, "migrated_at": datetime.now()}
    room = MAX_DOCUMENT_BYTES - document_size(path, written)
    assert migrate_file(file_row(metadata={"preview": "x" * room}))["metadata"]["preview"] == "x" * room
    problem = caught(lambda: migrate_file(file_row(metadata={"preview": "x" * (room + 1)})))
    assert problem.reason == rules.INVALID_VALUE


def test_firestore_value_problem_reports_the_first_field_in_sorted_order() -> None:
    document = {"zeta": [[1]], "alpha": {"__x__": 1}, "mid": 2**64}
    assert app_rules.firestore_value_problem(document, "x/1") == "alpha holds a reserved key of the form __name__"
    assert app_rules.firestore_value_problem({"b": [[1]]}, "x/1") == "b holds an array inside an array"
    assert app_rules.firestore_value_problem({"b": 2**64}, "x/1") == "b holds an integer outside the 64-bit range"
    assert app_rules.firestore_value_problem({"b": {"c": [[]]}, "a": 1}, "x/1") == "b holds an array inside an array"
    assert app_rules.firestore_value_problem({"b": [{"c": 1}, [2]], "a": None}, "x/1") is not None
    assert app_rules.firestore_value_problem({"b": [{"c": [1]}], "a": True, "f": 1.5}, "x/1") is None
    with pytest.raises(Quarantined):
        app_rules.require_firestore_value({"__name__": 1}, "x/1")


def test_nul_is_removed_deep_keys_included() -> None:
    value = {"a\x00b": ["x\x00", {"k\x00": "v\x00v"}], "n": 1, "t": True, "z": None}
    assert app_rules.strip_nul_deep(value) == {"ab": ["x", {"k": "vv"}], "n": 1, "t": True, "z": None}
    document = migrate_file(file_row(file_name="a\x00b.csv", user_tags=["t\x00"], metadata={"n\x00": "\x00"}))
    assert (document["file_name"], document["user_tags"], document["metadata"]) == ("ab.csv", ["t"], {"n": ""})


@pytest.mark.parametrize(
    ("row", "kwargs", "expected"),
    [
        (file_row(file_path="../x.csv"), {"user_migrated": False}, app_rules.ORPHAN_USER),
        (file_row(file_path="/etc/passwd"), {"exists": False}, app_rules.UNSAFE_PATH),
        (file_row(metadata={"a": [[1]]}), {"exists": False}, app_rules.MISSING_BLOB),
        (file_row(sha256="0" * 64, metadata={"__x__": 1}), {}, app_rules.CHECKSUM_MISMATCH),
        (file_row(metadata={"a": [[1]]}, user_tags=None), {}, rules.INVALID_VALUE),
    ],
)
def test_file_reasons_follow_the_contract_order(row: dict[str, Any], kwargs: dict[str, Any], expected: str) -> None:
    assert caught(lambda: migrate_file(row, **kwargs)).reason == expected
    assert app_rules.FILE_REASONS == (
        app_rules.ORPHAN_USER,
        app_rules.UNSAFE_PATH,
        app_rules.MISSING_BLOB,
        app_rules.CHECKSUM_MISMATCH,
        rules.INVALID_VALUE,
    )


# --- filters --------------------------------------------------------------------------------


def test_filter_document() -> None:
    assert migrate_filter(filter_row()) == {
        "legacy_id": 3,
        "user_id": 42,
        "file_id": 7,
        "name": "Solo CA",
        "definition": {"column": "state", "op": "in", "values": ["CA", "NY"]},
        "created_at": datetime(2025, 1, 1, tzinfo=UTC),
        "updated_at": datetime(2025, 1, 2, tzinfo=UTC),
    }


def test_filter_for_any_file_needs_no_file() -> None:
    assert migrate_filter(filter_row(file_id=None), file_migrated=False)["file_id"] is None


def test_filter_of_a_file_not_migrated_is_orphan_file() -> None:
    assert caught(lambda: migrate_filter(filter_row(), file_migrated=False)).reason == app_rules.ORPHAN_FILE


@pytest.mark.parametrize(
    ("row", "kwargs", "expected"),
    [
        (filter_row(definition={"a": [[1]]}), {"user_migrated": False, "file_migrated": False}, app_rules.ORPHAN_USER),
        (filter_row(definition={"__op__": "eq"}), {"file_migrated": False}, app_rules.ORPHAN_FILE),
        (filter_row(definition={"v": 2**70}), {}, rules.INVALID_VALUE),
        (filter_row(definition={"clauses": [[{"c": 1}]]}), {}, rules.INVALID_VALUE),
        (filter_row(definition=None), {}, rules.INVALID_VALUE),
    ],
)
def test_filter_reasons_follow_the_contract_order(row: dict[str, Any], kwargs: dict[str, Any], expected: str) -> None:
    problem = caught(lambda: migrate_filter(row, **kwargs))
    assert problem.reason == expected
    assert expected != rules.INVALID_VALUE or problem.detail.startswith("definition")
    assert app_rules.FILTER_REASONS == (app_rules.ORPHAN_USER, app_rules.ORPHAN_FILE, rules.INVALID_VALUE)


def test_filter_name_and_definition_lose_nul_keep_unicode() -> None:
    document = migrate_filter(filter_row(name=" \u202eRTL\x00 🔥 ", definition={"c\x00": "Zürich\x00"}))
    assert document["name"] == "\u202eRTL 🔥"
    assert document["definition"] == {"c": "Zürich"}


# --- entities and hashes --------------------------------------------------------------------


def test_entities_describe_their_sources() -> None:
    entities = app_rules.APP_ENTITIES
    assert [entities[e].table for e in ("users", "files", "filters")] == [
        "auth_user",
        "list_cutter_savedfile",
        "list_cutter_savedfilter",
    ]
    assert entities["users"].updated_at_column is None  # no updated_at in auth_user: full runs only
    assert entities["files"].reasons == app_rules.FILE_REASONS
    assert set(entities["files"].fields) == set(migrate_file(file_row()))
    assert set(entities["filters"].fields) == set(migrate_filter(filter_row()))
    assert set(entities["users"].fields) == set(app_rules.transform_user(user_row()))
    assert not set(app_rules.BOOKKEEPING) & {f for e in entities.values() for f in e.fields}


def test_hash_ignores_bookkeeping_blob_url_and_key_order() -> None:
    document = migrate_file(file_row())
    digest = app_rules.document_hash("files", document)
    written = {
        **dict(reversed(list(document.items()))),
        "blob_url": "file:///elsewhere/files/42/x",
        "shard": "shard-10",
        "content_hash": digest,
        "run_id": "run-1",
        "migrated_at": datetime.now(UTC),
    }
    assert app_rules.document_hash("files", written) == digest
    assert digest == rules.content_hash({k: v for k, v in document.items() if k != "blob_url"})


def test_hash_sees_every_contract_field() -> None:
    document = migrate_file(file_row())
    digest = app_rules.document_hash("files", document)
    for name, other in [("sha256", "0" * 64), ("metadata", {"rows": 121}), ("user_tags", []), ("user_id", 43)]:
        assert app_rules.document_hash("files", {**document, name: other}) != digest
    assert app_rules.document_hash("files", {**document, "extra": 1}) != digest
    firestore_copy = {**document, "uploaded_at": document["uploaded_at"].astimezone(timezone(timedelta(hours=3)))}
    assert app_rules.document_hash("files", firestore_copy) == digest
    with pytest.raises(ValueError):
        app_rules.document_hash("patients", document)


def test_same_source_same_hash() -> None:
    assert app_rules.document_hash("users", app_rules.transform_user(user_row())) == app_rules.document_hash(
        "users", app_rules.transform_user(user_row())
    )


GOLDEN = {
    "users": "3f82bf352ced4bf8ee13395a8e45b82594e58a55da7e945594033ab1a421f29d",
    "files": "8027becc650c2877bb75dc0cfa10245ac191906c5e13acd339c8619c6fde0e25",
    "filters": "73fc3422097e4aae2c91f39e1b939d90c2810036c4fc016dd52f9c89d27c0805",
}


def test_golden_vectors_pin_the_hash_bytes() -> None:
    """Any change to the rules or the canonical form changes these: bump them only on purpose."""
    documents = {
        "users": app_rules.transform_user(user_row()),
        "files": migrate_file(file_row()),
        "filters": migrate_filter(filter_row()),
    }
    assert {entity: app_rules.document_hash(entity, doc) for entity, doc in documents.items()} == GOLDEN


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "bool", "none", "float", "aware", "naive", "old", "date", "nanos"]
    if depth < 3:
        kinds += ["dict", "list", "tuple"]
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice(["a", " ", "ñ", "日", '"', "\\", "\n", "🚀", "é"]) for _ in range(rng.randint(0, 6)))
    if kind == "int":
        return rng.choice([0, -1, 7, 2**63 - 1, -(2**63), 2**70])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "float":
        return rng.choice([0.1, -2.5, 1e300, float("nan"), 3.0])
    moment = datetime(2025, 5, 6, 7, 8, 9, rng.choice([0, 123456]), tzinfo=timezone(timedelta(hours=-5)))
    if kind == "aware":
        return moment
    if kind == "naive":
        return moment.replace(tzinfo=None)
    if kind == "old":
        return datetime(rng.choice([1, 999, 1000, 1969]), 12, 31, 23, 59, 59, tzinfo=UTC)
    if kind == "date":
        return moment.date()
    if kind == "nanos":
        return DatetimeWithNanoseconds(2020, 1, 2, 3, 4, 5, nanosecond=123456789, tzinfo=UTC)
    items = [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    return {rng.choice(["b", "a", "ñ", "__x__", "z z"]): item for item in items}


def _plain_typed(value: Any) -> list[Any]:
    """rules._typed as first written (isinstance order, strftime, json.dumps): the reference its fast
    paths are held to."""
    if value is None:
        return ["null"]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", str(value)]
    if isinstance(value, float):
        return ["float", repr(value)]
    if isinstance(value, datetime):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return ["datetime", aware.strftime("%Y-%m-%dT%H:%M:%S.%fZ")]
    if isinstance(value, date):
        return ["date", value.isoformat()]
    if isinstance(value, str):
        return ["str", value]
    return ["json", json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)]


def test_the_canonical_form_is_the_plain_one_byte_for_byte() -> None:
    """rules.canonical_form looks the common types up first and reuses its JSON encoders: the same text as
    the plain serialization, whatever the values (and so the same document_hash)."""
    rng = random.Random(8)
    for _ in range(3000):
        document = {name: _random_value(rng) for name in rng.sample(["legacy_id", "b", "a", "ñ", "x", "shard"], 4)}
        plain = json.dumps([[k, *_plain_typed(document[k])] for k in sorted(document)], ensure_ascii=False,
                           separators=(",", ":"))  # fmt: skip
        assert rules.canonical_form(document) == plain, document
        fields = {name: value for name, value in document.items() if name not in ("shard", "blob_url")}
        assert app_rules.document_hash("files", document) == rules.content_hash(fields), document


def test_the_value_rule_and_the_size_rule_agree_with_firestore_size() -> None:
    """The one walk that finds problems also sizes the document: exactly firestore_size.document_size."""
    rng = random.Random(9)
    limit = MAX_DOCUMENT_BYTES
    for _ in range(300):
        size = rng.choice([limit // 2, limit - 200, limit - 60, limit - 40, limit + 10])
        document = {"legacy_id": 1, "name": "n" * (size - 100), "tags": ["a", "b"], "when": datetime.now(UTC)}
        exact = document_size("files/1", document)
        problem = app_rules.firestore_value_problem(document, "files/1")
        assert (problem is None) == (exact <= limit), (exact, problem)
        if problem is not None:
            assert problem == "document is larger than 1 MiB (largest field: name)"
