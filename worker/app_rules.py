"""The app path's data contract (DESIGN §6: users, files, filters) as pure functions.

List Cutter's Django tables become Firestore documents. One function per rule; the ``users`` /
``files`` / ``filters`` assets use them to build documents and the checks use them to recompute
what Firestore must hold, so a rule changes in exactly one place. The string and hash helpers
are worker.rules' own (imported, never copied). Nothing here touches a database, a file, the
clock or a logger: the parts of a rule that need I/O (does the user exist in the target, does the
file exist, where does a symlink lead, what are the real bytes) are decided by the caller and
handed in as plain values.

Decisions where §6 is silent (the caller and the tests rely on them):

- ``first_name``, ``last_name``, ``file_name`` and a filter's ``name`` are trimmed and collapsed;
  empty becomes None (Django stores '' for "no name"), as in the clinical path.
- ``email`` is lower-cased and collapsed, '' → None, and *not* validated: §6 keeps the address
  the user typed (duplicates across users included), unlike the clinical e-mail rule.
- ``password_hash`` is the Django hash byte for byte, only U+0000 removed: trimming a hash would
  change it.
- An unreadable ``date_joined`` / ``last_login`` / ``uploaded_at`` becomes None, not a quarantine.
- ``metadata`` and ``definition`` must be JSON maps and the tags JSON arrays; anything else (JSON
  ``null``, a string) is ``INVALID_VALUE``: the app reads them as maps and lists.
- A file path with U+0000 in it is ``UNSAFE_PATH`` (removing the character would open another
  file), as is an empty path (it names the media root, not a file). A blank recorded sha256 counts
  as NULL. A recorded size that differs from the real one is ``CHECKSUM_MISMATCH`` like the sha256
  (§6: "a NULL recorded sha256 or size is computed, not a mismatch"); the sha256 is checked first.
- Firestore's limits checked besides §6's list: map keys must be valid Unicode text, strings must
  be valid Unicode, and fields nest at most 20 deep (Firestore's documented limit); the 1 MiB
  limit is checked with room for the bookkeeping fields the writer adds.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.firestore_size import (
    DOCUMENT_OVERHEAD,
    MAX_DOCUMENT_BYTES,
    document_size,
    name_size,
)
from worker.rules import INT64, INVALID_VALUE, Quarantined, clean_text, coerce_datetime, content_hash, remove_nul

# Quarantine reason codes of the app path (DESIGN §6); INVALID_VALUE is worker.rules'.
INVALID_USERNAME = "INVALID_USERNAME"
ORPHAN_USER = "ORPHAN_USER"
UNSAFE_PATH = "UNSAFE_PATH"
MISSING_BLOB = "MISSING_BLOB"
CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
ORPHAN_FILE = "ORPHAN_FILE"

# Per entity, in the order §6 applies them: a record broken in two ways gets the earlier reason.
USER_REASONS = (INVALID_USERNAME, INVALID_VALUE)
FILE_REASONS = (ORPHAN_USER, UNSAFE_PATH, MISSING_BLOB, CHECKSUM_MISMATCH, INVALID_VALUE)
FILTER_REASONS = (ORPHAN_USER, ORPHAN_FILE, INVALID_VALUE)

# Fields the writer adds to every document besides its §6 fields (DESIGN §5): never hashed.
BOOKKEEPING = ("shard", "content_hash", "run_id", "migrated_at")
# Where the target put a file's blob: like a surrogate id, it says nothing about the source.
TARGET_ONLY = ("blob_url",)

# Largest bookkeeping the writer adds (run ids are ≤ 64 characters, as in migration.runs), so a
# document that passes the 1 MiB rule still fits once written.
_BOOKKEEPING_AT_MOST: dict[str, Any] = {
    "shard": "shard-15",
    "content_hash": "0" * 64,
    "run_id": "r" * 64,
    "migrated_at": datetime(2000, 1, 1, tzinfo=UTC),
}
MAX_FIELD_DEPTH = 20  # Firestore: fields nest at most 20 deep in maps and arrays
_RESERVED_KEY = re.compile(r"__.*__", re.DOTALL)

# --- partitions ------------------------------------------------------------------------------

SHARDS = 16
_SHARD_KEY = re.compile(r"shard-(0[0-9]|1[0-5])")


def shard_of(user_id: int | None) -> int:
    """A row's shard: its user's id modulo 16; a row without user (NULL) lives in shard 0."""
    return 0 if user_id is None else int(user_id) % SHARDS


def shard_key(number: int) -> str:
    """The partition key of shard ``number``: 7 → 'shard-07'."""
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < SHARDS:
        raise ValueError(f"a shard number is an integer from 0 to {SHARDS - 1}")
    return f"shard-{number:02d}"


def shard_number(key: str) -> int:
    """The shard a partition key names; anything but 'shard-00' … 'shard-15' exactly is refused.

    The key is not echoed in the error: partition keys can arrive from outside (§8).
    """
    match = _SHARD_KEY.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise ValueError(f"a partition key of the app path is one of shard-00 … shard-{SHARDS - 1:02d}")
    return int(match.group(1))


# --- values Firestore refuses ----------------------------------------------------------------


def _text_size(value: str) -> int | None:
    """A string's storage size (``firestore_size.string_size``), encoded once; None when it is not Unicode
    text (a lone surrogate), which Firestore cannot store."""
    try:
        return len(value.encode("utf-8")) + 1
    except UnicodeEncodeError:
        return None


class _Refused(Exception):
    """What Firestore refuses inside one field's value, as a phrase without the value."""

    def __init__(self, phrase: str) -> None:
        super().__init__(phrase)
        self.phrase = phrase


def _key_size(key: Any) -> int:
    """A map key's storage size, or :class:`_Refused`: empty or not text, not Unicode, ``__name__``."""
    if not isinstance(key, str) or not key:
        raise _Refused("holds an empty or non-text key")
    size = _text_size(key)
    if size is None:
        raise _Refused("holds a key that is not valid Unicode")
    if key[:2] == "__" and _RESERVED_KEY.fullmatch(key):
        raise _Refused("holds a reserved key of the form __name__")
    return size


def _checked_size(value: Any, depth: int) -> int:
    """The value's Firestore storage size (the sizes of ``firestore_size``), or :class:`_Refused` with the
    first thing Firestore refuses in it, in one walk: depth past 20; in a map, key by key (an empty,
    non-text, non-Unicode or ``__name__`` key, then its value); in an array, item by item (an array
    directly inside it, then the item); text that is not Unicode, an integer outside int64, any other
    type. Plain maps and lists are known by their exact type and leaves are tested next: only a value
    of another kind meets an ABC's test."""
    if depth > MAX_FIELD_DEPTH:
        raise _Refused(f"nests deeper than {MAX_FIELD_DEPTH} levels")
    kind = type(value)
    if kind is dict:
        return _checked_map_size(value, depth)
    if kind is list:
        return _checked_array_size(value, depth)
    if isinstance(value, str):
        size = _text_size(value)
        if size is None:
            raise _Refused("holds text that is not valid Unicode")
        return size
    if value is None or isinstance(value, bool):  # before int: bool is an int subclass
        return 1
    if isinstance(value, int):
        if not INT64[0] <= value <= INT64[1]:
            raise _Refused("holds an integer outside the 64-bit range")
        return 8
    if isinstance(value, (float, datetime)):
        return 8
    if isinstance(value, Mapping):
        return _checked_map_size(value, depth)
    if isinstance(value, (list, tuple)):
        return _checked_array_size(value, depth)
    raise _Refused("holds a value of a type Firestore cannot store")


def _checked_map_size(value: Mapping[Any, Any], depth: int) -> int:
    size = 0
    for key, item in value.items():
        size += _key_size(key) + _checked_size(item, depth + 1)
    return size


def _checked_array_size(value: list[Any] | tuple[Any, ...], depth: int) -> int:
    size = 0
    for item in value:
        if isinstance(item, (list, tuple)):
            raise _Refused("holds an array inside an array")
        size += _checked_size(item, depth + 1)
    return size


@functools.lru_cache(maxsize=1024, typed=True)  # an entity's documents have the same few field names
def _field_name_size(name: Any) -> int | None:
    """A top-level field name's storage size, or None when Firestore refuses it as a name."""
    if not isinstance(name, str) or not name or (name[:2] == "__" and _RESERVED_KEY.fullmatch(name)):
        return None
    return _text_size(name)


def firestore_value_problem(document: Mapping[str, Any], path: str) -> str | None:
    """Why Firestore would refuse ``document`` at ``path``, or None when it can hold it.

    Fields are examined in sorted order and the first problem found is described with the
    field's name, never its value (e.g. 'metadata holds an array inside an array'). Checked at
    any depth: arrays directly inside arrays, map keys of the form ``__name__`` or empty,
    integers outside int64, text that is not Unicode, nesting deeper than 20; then the whole
    document's storage size against 1 MiB (the detail names its largest field). The same walk
    that looks for problems adds up the storage size (``firestore_size.document_size``).
    """
    size = 0
    for name in sorted(document, key=str):
        name_bytes = _field_name_size(name)
        if name_bytes is None:
            return "a field name is empty, not Unicode or of the reserved form __name__"
        try:
            size += name_bytes + _checked_size(document[name], 1)
        except _Refused as refused:
            return f"{name} {refused.phrase}"
    if name_size(path) + size + DOCUMENT_OVERHEAD > MAX_DOCUMENT_BYTES:
        largest = max(sorted(document), key=lambda name: document_size(path, {name: document[name]}))
        return f"document is larger than 1 MiB (largest field: {largest})"
    return None


def require_firestore_value(document: Mapping[str, Any], path: str) -> None:
    """A document Firestore would refuse quarantines its record as INVALID_VALUE (§6)."""
    problem = firestore_value_problem(document, path)
    if problem is not None:
        raise Quarantined(INVALID_VALUE, problem)


def _require_writable(document: Mapping[str, Any], path: str) -> None:
    """The §6 document, checked as it will be written: with the writer's bookkeeping fields."""
    require_firestore_value({**document, **_BOOKKEEPING_AT_MOST}, path)


def strip_nul_deep(value: Any, field: str = "value") -> Any:
    """Remove U+0000 from every string inside maps and lists, keys included (§6).

    Two keys of one map that differ only by U+0000 would collapse into one and lose data: that
    is INVALID_VALUE (``field`` names the field in the detail), as is nesting too deep to walk.
    """

    def strip(item: Any, depth: int) -> Any:
        if depth > MAX_FIELD_DEPTH + 1:
            raise Quarantined(INVALID_VALUE, f"{field} nests deeper than {MAX_FIELD_DEPTH} levels")
        if isinstance(item, str):
            return item.replace("\x00", "")
        kind = type(item)  # a plain dict or list by identity: neither meets the Mapping ABC's test
        if kind is dict or (kind is not list and isinstance(item, Mapping)):
            stripped: dict[Any, Any] = {}
            for key, inner in item.items():
                new_key = key.replace("\x00", "") if isinstance(key, str) else key
                if new_key in stripped:
                    raise Quarantined(INVALID_VALUE, f"{field} holds two keys that differ only by U+0000")
                stripped[new_key] = strip(inner, depth + 1)
            return stripped
        if isinstance(item, list | tuple):
            return [strip(inner, depth + 1) for inner in item]
        return item

    return strip(value, 0)


def _json_map(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise Quarantined(INVALID_VALUE, f"{field} is not a JSON map")
    return strip_nul_deep(value, field)  # type: ignore[no-any-return]


def _json_list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise Quarantined(INVALID_VALUE, f"{field} is not a JSON array")
    return strip_nul_deep(value, field)  # type: ignore[no-any-return]


def _flag(value: Any) -> bool:
    """A Django boolean as the driver hands it back (bool; 0/1 or text on SQLite)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "t", "true", "y", "yes")
    return bool(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


# --- users -----------------------------------------------------------------------------------


def require_username(username: str | None) -> str:
    """A user is found by username: an empty one (after trimming, U+0000 removed) is refused."""
    cleaned = clean_text(username)
    if cleaned is None:
        raise Quarantined(INVALID_USERNAME, "username is empty")
    return cleaned


def normalize_app_email(email: str | None) -> str | None:
    """Lower-cased, trimmed and collapsed; '' → None. Not validated: §6 keeps what was typed."""
    cleaned = clean_text(email)
    return None if cleaned is None else cleaned.lower()


def copy_password_hash(password: str | None) -> str | None:
    """The Django password hash exactly as stored (only U+0000 removed). A secret: never logged."""
    return remove_nul(password)


def user_path(legacy_id: int) -> str:
    return f"users/{legacy_id}"


def transform_user(row: Mapping[str, Any]) -> dict[str, Any]:
    """Map one ``auth_user`` row to the §6 fields of ``users/{id}`` (reasons in USER_REASONS order)."""
    legacy_id = int(row["id"])
    document = {
        "legacy_id": legacy_id,
        "username": require_username(row["username"]),
        "email": normalize_app_email(row["email"]),
        "first_name": clean_text(row["first_name"]),
        "last_name": clean_text(row["last_name"]),
        "is_active": _flag(row["is_active"]),
        "is_staff": _flag(row["is_staff"]),
        "is_superuser": _flag(row["is_superuser"]),
        "date_joined": coerce_datetime(row["date_joined"]),
        "last_login": coerce_datetime(row["last_login"]),
        "password_hash": copy_password_hash(row["password"]),
    }
    _require_writable(document, user_path(legacy_id))
    return document


# --- files -----------------------------------------------------------------------------------


def require_user(user_migrated: bool) -> None:
    """A file or filter hangs off a user migrated in the same shard (a NULL user never is)."""
    if not user_migrated:
        raise Quarantined(ORPHAN_USER, "user is not migrated in this shard")


_DRIVE = re.compile(r"^[A-Za-z]:")


MAX_PATH_BYTES = 4096


def unsafe_path_problem(relative_path: str) -> str | None:
    """Why this path is unsafe on its face (the reason, not the path), or ``None``. Pure: touches no file."""
    if not isinstance(relative_path, str):
        return "path is not text"
    if relative_path.strip() == "":
        return "path is empty"
    if "\x00" in relative_path:
        return "path contains a NUL character"
    try:
        size = len(relative_path.encode("utf-8"))
    except UnicodeEncodeError:
        return "path is not valid UTF-8 text"
    if size > MAX_PATH_BYTES:
        return "path is too long"
    if relative_path[0] in "/\\" or _DRIVE.match(relative_path):
        return "path is absolute"
    parts = re.split(r"[/\\]", relative_path)
    if any(part == ".." for part in parts):
        return "path climbs to a parent folder"
    if any(part in ("", ".") for part in parts):
        return "path has an empty or '.' part"
    return None


def require_safe_path(file_path: str | None) -> str:
    """The lexical half of the UNSAFE_PATH rule (:func:`unsafe_path_problem`): relative, climbing
    nowhere. Returns the path unchanged, to be joined under MEDIA_ROOT. Symlinks leading outside the
    root can only be found by looking at the files: the media source does that, with the same reason."""
    problem = unsafe_path_problem(file_path or "")
    if problem is not None:
        raise Quarantined(UNSAFE_PATH, problem)
    return file_path  # type: ignore[return-value]


def _recorded(value: str | None) -> str | None:
    text = (value or "").strip()
    return text or None


def require_checksum(recorded: str | None, actual: str) -> None:
    """The recorded sha256 must match the real content's, in any case; NULL is not a mismatch."""
    expected = _recorded(recorded)
    if expected is not None and expected.lower() != actual.strip().lower():
        raise Quarantined(CHECKSUM_MISMATCH, "recorded sha256 differs from the file's content")


def require_size(recorded: int | None, actual: int) -> None:
    """The recorded size must match the real content's; NULL is computed, not a mismatch."""
    if recorded is not None and int(recorded) != actual:
        raise Quarantined(CHECKSUM_MISMATCH, "recorded size differs from the file's content")


def normalize_file_id(file_id: Any) -> str:
    """A file's UUID in its canonical text form; anything else (SQLite holds text) is refused."""
    try:
        return str(file_id if isinstance(file_id, uuid.UUID) else uuid.UUID(str(file_id)))
    except (ValueError, TypeError, AttributeError):
        raise Quarantined(INVALID_VALUE, "file_id is not a UUID") from None


def blob_key(user_id: int | None, file_id: Any) -> str:
    """Where a file's content goes in the blob store: ``files/{user_id}/{file_id}`` (§5).

    Both parts are normalized (an integer and a canonical UUID), so no source value can steer
    the key elsewhere.
    """
    if user_id is None:  # never reached through the rules: such a file is ORPHAN_USER first
        raise Quarantined(ORPHAN_USER, "file has no user")
    return f"files/{int(user_id)}/{normalize_file_id(file_id)}"


def file_path_in_target(legacy_id: int) -> str:
    return f"files/{legacy_id}"


def file_document(row: Mapping[str, Any], *, size_bytes: int, sha256: str, blob_url: str) -> dict[str, Any]:
    """The §6 fields of ``files/{id}`` for one ``list_cutter_savedfile`` row that passed the
    earlier rules; ``size_bytes``/``sha256`` are the *real* content's, ``blob_url`` where it went."""
    legacy_id = int(row["id"])
    document = {
        "legacy_id": legacy_id,
        "user_id": _optional_int(row["user_id"]),
        "file_id": normalize_file_id(row["file_id"]),
        "file_name": clean_text(row["file_name"]),
        "size_bytes": int(size_bytes),
        "sha256": sha256.strip().lower(),
        "uploaded_at": coerce_datetime(row["uploaded_at"]),
        "system_tags": _json_list(row["system_tags"], "system_tags"),
        "user_tags": _json_list(row["user_tags"], "user_tags"),
        "metadata": _json_map(row["metadata"], "metadata"),
        "blob_url": blob_url,
    }
    _require_writable(document, file_path_in_target(legacy_id))
    return document


# --- filters ---------------------------------------------------------------------------------


def require_file(file_id: int | None, file_migrated: bool) -> None:
    """A filter for one file needs that file migrated; a filter for any file (NULL) does not."""
    if file_id is not None and not file_migrated:
        raise Quarantined(ORPHAN_FILE, "file is not migrated")


def filter_path(legacy_id: int) -> str:
    return f"filters/{legacy_id}"


def filter_document(row: Mapping[str, Any]) -> dict[str, Any]:
    """The §6 fields of ``filters/{id}``; ``file_id`` stays the file's *legacy* id (or None)."""
    legacy_id = int(row["id"])
    document = {
        "legacy_id": legacy_id,
        "user_id": _optional_int(row["user_id"]),
        "file_id": _optional_int(row["file_id"]),
        "name": clean_text(row["name"]),
        "definition": _json_map(row["definition"], "definition"),
        "created_at": coerce_datetime(row["created_at"]),
        "updated_at": coerce_datetime(row["updated_at"]),
    }
    _require_writable(document, filter_path(legacy_id))
    return document


# --- entities and the content hash -----------------------------------------------------------


@dataclass(frozen=True)
class AppEntity:
    """What the app path needs to know about one entity's source and target."""

    name: str
    table: str  # the Django table it is read from
    id_column: str
    shard_column: str  # the column whose value modulo 16 is the shard
    updated_at_column: str | None  # None: no watermark, so only full runs are possible
    collection: str
    reasons: tuple[str, ...]
    parents: tuple[str, ...]
    fields: tuple[str, ...]  # the §6 fields of a document, without bookkeeping


APP_ENTITIES: dict[str, AppEntity] = {
    "users": AppEntity(
        name="users",
        table="auth_user",
        id_column="id",
        shard_column="id",
        # auth_user has no updated_at column: users cannot be migrated incrementally, only in full.
        updated_at_column=None,
        collection="users",
        reasons=USER_REASONS,
        parents=(),
        fields=(
            "legacy_id",
            "username",
            "email",
            "first_name",
            "last_name",
            "is_active",
            "is_staff",
            "is_superuser",
            "date_joined",
            "last_login",
            "password_hash",
        ),
    ),
    "files": AppEntity(
        name="files",
        table="list_cutter_savedfile",
        id_column="id",
        shard_column="user_id",
        updated_at_column="updated_at",
        collection="files",
        reasons=FILE_REASONS,
        parents=("users",),
        fields=(
            "legacy_id",
            "user_id",
            "file_id",
            "file_name",
            "size_bytes",
            "sha256",
            "uploaded_at",
            "system_tags",
            "user_tags",
            "metadata",
            "blob_url",
        ),
    ),
    "filters": AppEntity(
        name="filters",
        table="list_cutter_savedfilter",
        id_column="id",
        shard_column="user_id",
        updated_at_column="updated_at",
        collection="filters",
        reasons=FILTER_REASONS,
        parents=("users", "files"),
        fields=("legacy_id", "user_id", "file_id", "name", "definition", "created_at", "updated_at"),
    ),
}


_UNHASHED = frozenset(BOOKKEEPING) | frozenset(TARGET_ONLY)


def document_hash(entity: str, document: Mapping[str, Any]) -> str:
    """The content hash of a document: ``rules.content_hash`` of its §6 fields.

    Left out: the bookkeeping (``shard``, ``content_hash``, ``run_id``, ``migrated_at``), which
    describes the run and not the record, and ``blob_url``, which says where *this* target put
    the blob — like a surrogate id, it differs between targets (another bucket, the emulator)
    although the source is the same. The same source must give the same hash on any target; a
    blob's bytes are covered by ``sha256``, which is hashed. Everything else in the document is
    hashed, so a field the target gained or lost is a mismatch. Works on what the worker built
    and on what Firestore hands back (timestamps compare in UTC).
    """
    if entity not in APP_ENTITIES:
        raise ValueError("unknown app entity")
    return content_hash({name: value for name, value in document.items() if name not in _UNHASHED})
