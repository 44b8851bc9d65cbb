"""Generate a messy List Cutter (Django) DB and its media folder, deterministic by seed.

The app path's counterpart of demo.legacy_data: the ``auth_user``, ``list_cutter_savedfile`` and
``list_cutter_savedfilter`` tables (SQLite for the demo, PostgreSQL in the tests) and the real
uploaded files under ``media_root``. Every row is built with a known set of defects; its *fate*
is the first §6 reason among them in the entity's reason order (worker.app_rules), or MIGRATED.
The tally of fates, per entity and shard, is the test oracle: it is written down while
generating, from what was built, not by running the rules over the result.

Built on purpose: blank/whitespace usernames (INVALID_USERNAME; their files and filters are then
ORPHAN_USER), mixed-case, blank and duplicated e-mails; orphan files (no user, a missing user,
a quarantined user); paths with '..', backslashes, absolute paths, a symlink to a file outside
the root and a symlinked folder leading outside (UNSAFE_PATH); files missing on disk; corrupted
files (CHECKSUM_MISMATCH); recorded sha256 NULL or upper case and NULL sizes (not mismatches);
metadata with nested arrays, ``__x__`` and empty keys, integers beyond int64 and one document
over 1 MiB (INVALID_VALUE); U+0000 inside text and JSON (SQLite only: PostgreSQL cannot hold it;
it is removed, not quarantined); filters of orphan users, of missing or quarantined files, for
any file (file_id NULL), with invalid definitions; rows broken in two ways (the earlier reason
wins). A symlink inside the root to a file inside the root is safe and migrated.

    python -m demo.app_data --url sqlite:///app.db --media-root demo_media --users 200 --seed 7
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, insert, text

from worker import app_rules, django_schema, rules

MIGRATED = "MIGRATED"
ENTITIES = tuple(app_rules.APP_ENTITIES)
MIN_USERS = 16
SECRET_NAME = "secret.csv"
SECRET_CONTENT = b"account,password\nroot,this file is outside MEDIA_ROOT and must never be migrated\n"
SHARED_LINK = "uploads/shared"  # a symlinked folder inside the root that leads outside it

# Defects a file can be built with → the §6 reason each causes (None: messy but migrated).
FILE_DEFECTS: dict[str, str | None] = {
    "dotdot": app_rules.UNSAFE_PATH,  # '../outside/secret.csv'
    "dotdot_deep": app_rules.UNSAFE_PATH,  # 'uploads/7/../../../outside/secret.csv'
    "backslash": app_rules.UNSAFE_PATH,  # '..\\outside\\secret.csv'
    "absolute": app_rules.UNSAFE_PATH,  # '/etc/passwd'
    "abs_outside": app_rules.UNSAFE_PATH,  # the outside secret's absolute path
    "symlink_file": app_rules.UNSAFE_PATH,  # a symlink in the root to the outside secret
    "symlink_dir": app_rules.UNSAFE_PATH,  # a file under a symlinked folder leading outside
    "missing": app_rules.MISSING_BLOB,
    "corrupt": app_rules.CHECKSUM_MISMATCH,  # the bytes changed after upload
    "nested_array": rules.INVALID_VALUE,
    "dunder": rules.INVALID_VALUE,
    "empty_key": rules.INVALID_VALUE,
    "bigint": rules.INVALID_VALUE,
    "tags_nested": rules.INVALID_VALUE,
    "huge": rules.INVALID_VALUE,  # a document over 1 MiB
    "sha_null": None,
    "sha_upper": None,
    "size_null": None,
    "nul_text": None,
    "int64_edge": None,
    "internal_symlink": None,
    "unicode_name": None,
}
# Every case is placed once first, so each appears at any scale (combinations test the order).
FILE_CASES: tuple[frozenset[str], ...] = tuple(
    frozenset(case)
    for case in (
        {"dotdot"},
        {"dotdot_deep"},
        {"backslash"},
        {"absolute"},
        {"abs_outside"},
        {"symlink_file"},
        {"symlink_dir"},
        {"missing"},
        {"corrupt"},
        {"nested_array"},
        {"dunder"},
        {"empty_key"},
        {"bigint"},
        {"tags_nested"},
        {"huge"},
        {"sha_null"},
        {"sha_upper"},
        {"size_null"},
        {"nul_text"},
        {"int64_edge"},
        {"internal_symlink"},
        {"unicode_name"},
        {"dotdot", "missing"},
        {"missing", "nested_array"},
        {"corrupt", "dunder"},
        {"sha_upper", "bigint"},
    )
)
RANDOM_FILE_DEFECTS = (
    "dotdot",
    "absolute",
    "symlink_file",
    "missing",
    "corrupt",
    "nested_array",
    "dunder",
    "bigint",
    "sha_null",
    "sha_upper",
    "size_null",
    "nul_text",
    "unicode_name",
    "internal_symlink",
)

FILTER_DEFECTS: dict[str, str | None] = {
    "missing_file": app_rules.ORPHAN_FILE,
    "quarantined_file": app_rules.ORPHAN_FILE,
    "nested_def": rules.INVALID_VALUE,
    "dunder_def": rules.INVALID_VALUE,
    "bigint_def": rules.INVALID_VALUE,
    "file_null": None,
    "own_file": None,
    "nul_def": None,
}
FILTER_CASES: tuple[frozenset[str], ...] = tuple(
    frozenset(case)
    for case in (
        {"file_null"},
        {"own_file"},
        {"missing_file"},
        {"quarantined_file"},
        {"nested_def"},
        {"dunder_def"},
        {"bigint_def"},
        {"nul_def"},
        {"missing_file", "nested_def"},
    )
)
RANDOM_FILTER_DEFECTS = ("missing_file", "quarantined_file", "nested_def", "dunder_def", "bigint_def", "nul_def")

FIRST_NAMES = ["Ana", "  María   José ", "JUAN", "", "Zoë\u200b", "محمد", "李", "O'Brien", "Ñusta", "dana"]
LAST_NAMES = ["Gómez", "", "  van der   Berg ", "כהן", "Smith", "Nakamura 中村", "🦄", "López"]
USERNAME_STEMS = ["ana.gomez", "  jdoe ", "Carlos_R", "ali\u200b", "مريم", "🦄unicorn", "li.wei", "bob+test"]
BLANK_CHARS = (" ", "\t", "\n", "\u3000", "\xa0")
FILE_NAMES = ["clientes 2024.csv", "  Ventas   Q1.csv ", "leads_export.csv", "contacts.csv", "pedidos-marzo.csv"]
HOSTILE_FILE_NAMES = ["../../etc/passwd", "Ïñtërnâtiônàl ✓.csv", "עסקאות.csv", "報告 2024.csv", "emoji 🚀.csv"]
STATES = ["CA", "NY", "TX", "WA", "FL", "IL"]
CITIES = ["Los Angeles", "New York", "Austin", "Seattle", "Miami", "Chicago", "São Paulo", "Zürich"]
PEOPLE = ["Ana Gómez", "John Smith", "Li Wei", "Fatima Zahra", "Olga Petrova", "Kwame Mensah", "Zoë Brown"]
FILTER_NAMES = ["Solo CA", "  big   accounts ", "فلتر المبيعات", "🔥 hot leads", "", "Q1\u200b review"]


@dataclass
class AppTally:
    """What the generator built: per entity and shard, fate → count; and each record's fate."""

    fates: dict[str, dict[int, Counter[str]]] = field(
        default_factory=lambda: {entity: {shard: Counter() for shard in range(app_rules.SHARDS)} for entity in ENTITIES}
    )
    outcomes: dict[str, dict[int, str]] = field(default_factory=lambda: {entity: {} for entity in ENTITIES})
    shards: dict[str, dict[int, int]] = field(default_factory=lambda: {entity: {} for entity in ENTITIES})

    def add(self, entity: str, legacy_id: int, shard: int, fate: str) -> None:
        self.fates[entity][shard][fate] += 1
        self.outcomes[entity][legacy_id] = fate
        self.shards[entity][legacy_id] = shard

    def fates_in(self, entity: str, shard: int) -> dict[int, str]:
        """Each record of one shard of one entity, by legacy id: the fate it was built to have."""
        return {i: fate for i, fate in self.outcomes[entity].items() if self.shards[entity][i] == shard}

    @staticmethod
    def _summary(fates: Counter[str]) -> dict[str, Any]:
        quarantined = {reason: count for reason, count in fates.items() if reason != MIGRATED and count}
        return {
            "eligible": sum(fates.values()),
            "migrated": fates[MIGRATED],
            "quarantined": dict(sorted(quarantined.items())),
        }

    def expected(self, entity: str, shard: int) -> dict[str, Any]:
        """Eligible, migrated and quarantined-by-reason counts of one shard of one entity."""
        return self._summary(self.fates[entity][shard])

    def totals(self, entity: str) -> dict[str, Any]:
        """The same counts over all shards."""
        return self._summary(sum(self.fates[entity].values(), Counter()))

    def ids(self, entity: str, fate: str) -> list[int]:
        """The legacy ids of one entity that were built to have ``fate``."""
        return sorted(legacy_id for legacy_id, built in self.outcomes[entity].items() if built == fate)

    def as_dict(self) -> dict[str, Any]:
        return {
            entity: {app_rules.shard_key(shard): self.expected(entity, shard) for shard in range(app_rules.SHARDS)}
            for entity in ENTITIES
        }


def fate_of(defects: set[str] | frozenset[str], reasons: tuple[str, ...], causes: dict[str, str | None]) -> str:
    """The first reason, in the entity's §6 order, that one of the defects causes; else MIGRATED."""
    caused = {causes.get(defect, defect) for defect in defects}
    return next((reason for reason in reasons if reason in caused), MIGRATED)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AppGenerator:
    def __init__(self, seed: int, now: datetime, media_root: Path, outside_dir: Path, *, nul_ok: bool) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.now = now
        self.media_root = media_root
        self.outside_dir = outside_dir
        self.nul_ok = nul_ok  # SQLite holds U+0000; PostgreSQL cannot (text and JSONB alike)

    def pick(self, options: list[Any] | tuple[Any, ...]) -> Any:
        return options[self.rng.randrange(len(options))]

    def timestamp(self) -> datetime:
        return self.now - timedelta(
            seconds=self.rng.randrange(1, 3 * 365 * 86400), microseconds=self.rng.randrange(10**6)
        )

    def nul(self, value: str) -> str:
        """Put U+0000 in the middle of ``value`` where the database can hold it."""
        if not self.nul_ok or not value:
            return value
        middle = len(value) // 2
        return value[:middle] + "\x00" + value[middle:]

    # --- users ---------------------------------------------------------------------------------

    @staticmethod
    def blank_username(k: int) -> str:
        """The k-th distinct all-whitespace username ('' first): usernames are UNIQUE."""
        name = ""
        while k > 0:
            k -= 1
            name = BLANK_CHARS[k % len(BLANK_CHARS)] + name
            k //= len(BLANK_CHARS)
        return name

    def password(self, uid: int) -> str:
        if self.rng.random() < 0.1:
            return "!" + "".join(
                self.pick("abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(40)
            )
        salt = base64.b64encode(hashlib.sha256(f"salt:{self.seed}:{uid}".encode()).digest()).decode()[:22]
        digest = base64.b64encode(hashlib.sha256(f"pw:{self.seed}:{uid}".encode()).digest()).decode()
        return f"pbkdf2_sha256$870000${salt}${digest}"

    def user(self, uid: int, invalid_serial: int | None) -> dict[str, Any]:
        stem = self.pick(USERNAME_STEMS)
        if invalid_serial is None:
            username = f"{stem}{uid}"
            if self.rng.random() < 0.05:
                username = self.nul(username)
        else:
            username = self.blank_username(invalid_serial)
            if invalid_serial % 3 == 2 and self.nul_ok:  # still unique: no other name holds U+0000
                username += "\x00"
        email = self.pick(
            [
                f"{stem.strip()}{uid}@example.com",
                f"  {stem.strip().upper()}{uid}@Example.COM ",
                "",
                "   ",
                "shared@example.com",
                "SHARED@Example.com",
                f"user{uid}@mail.co",
                "not-an-email",
            ]
        )
        return {
            "id": uid,
            "password": self.password(uid),
            "last_login": self.pick([self.timestamp(), self.timestamp(), None]),
            "is_superuser": uid % 97 == 1,
            "username": username,
            "first_name": self.pick(FIRST_NAMES),
            "last_name": self.pick(LAST_NAMES),
            "email": email,
            "is_staff": uid % 23 == 1,
            "is_active": self.rng.random() > 0.1,
            "date_joined": self.timestamp(),
        }

    # --- files ---------------------------------------------------------------------------------

    def csv_content(self) -> bytes:
        lines = ["name,email,state,city,amount"]
        for n in range(self.rng.randrange(3, 40)):
            person = self.pick(PEOPLE)
            handle = person.lower().replace(" ", ".")
            amount = f"{self.rng.randrange(10, 100_000) / 100:.2f}"
            lines.append(f'"{person}",{handle}{n}@example.com,{self.pick(STATES)},"{self.pick(CITIES)}",{amount}')
        return ("\n".join(lines) + "\n").encode("utf-8")

    def write(self, relative: str, data: bytes) -> None:
        target = self.media_root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def file(self, fid: int, uid: int | None, defects: frozenset[str]) -> dict[str, Any]:
        file_id = uuid.UUID(int=self.rng.getrandbits(128), version=4)
        stub = file_id.hex[:8]
        folder = f"uploads/{uid if uid is not None else 'anonymous'}"
        content = self.csv_content()
        columns = ["name", "email", "state", "city", "amount"]
        secret_sha = _sha256(SECRET_CONTENT)
        path = f"{folder}/{stub}_{self.pick(['clientes', 'ventas q1', 'leads', '報告'])}.csv"
        recorded_sha: str | None = _sha256(content)
        recorded_size: int | None = len(content)

        missing = "missing" in defects
        if "dotdot" in defects:
            path = f"../outside/{'nope_' + stub + '.csv' if missing else SECRET_NAME}"
        elif "dotdot_deep" in defects:
            path = f"{folder}/../../../outside/{SECRET_NAME}"
        elif "backslash" in defects:
            path = f"..\\outside\\{SECRET_NAME}"
        elif "absolute" in defects:
            path = "/etc/passwd"
        elif "abs_outside" in defects:
            path = str((self.outside_dir / SECRET_NAME).resolve())
        elif "symlink_file" in defects:
            path = f"{folder}/{stub}_link.csv"
            link = self.media_root / path
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((self.outside_dir / SECRET_NAME).resolve(), link)
        elif "symlink_dir" in defects:
            path = f"{SHARED_LINK}/{SECRET_NAME}"
        elif "internal_symlink" in defects:
            path = f"{folder}/{stub}_latest.csv"
            self.write(f"{folder}/{stub}_data.csv", content)
            os.symlink(f"{stub}_data.csv", self.media_root / path)  # relative: stays inside the root
        elif not missing:
            if "corrupt" in defects:  # recorded at upload, then the file lost its last lines
                original = content + b'"Late Row",late@example.com,CA,"Austin",1.00\n'
                recorded_sha, recorded_size = _sha256(original), len(original)
            self.write(path, content)
        if any(FILE_DEFECTS[d] == app_rules.UNSAFE_PATH for d in defects):
            recorded_sha, recorded_size = secret_sha, len(SECRET_CONTENT)
        if missing:
            recorded_sha = _sha256(b"gone")
        if "sha_upper" in defects and recorded_sha is not None:
            recorded_sha = recorded_sha.upper()
        if "sha_null" in defects:
            recorded_sha = None
        if "size_null" in defects:
            recorded_size = None

        name = self.pick(HOSTILE_FILE_NAMES if "unicode_name" in defects else FILE_NAMES)
        metadata: dict[str, Any] = {
            "rows": content.count(b"\n") - 1,
            "columns": columns,
            "delimiter": ",",
            "encoding": "utf-8",
            "source": {"app": "list-cutter", "version": self.pick(["2.3.1", "2.4.0"])},
        }
        system_tags: list[Any] = ["csv", self.pick(["uploaded", "imported"])]
        user_tags: list[Any] = self.rng.sample(
            ["clientes", "2024", "ventas", "🚀 launch", "עברית", "  spaced   tag "], 2
        )
        if "nested_array" in defects:
            if self.rng.random() < 0.5:
                metadata["preview"] = [columns, ["Ana", "ana@example.com", "CA", "LA", "1.00"]]
            else:
                metadata["layout"] = {"blocks": [{"cells": [[1, 2], [3, 4]]}]}
        if "dunder" in defects:
            metadata["source"]["__meta__"] = "injected"
        if "empty_key" in defects:
            metadata["extra"] = {"": "blank key"}
        if "bigint" in defects:
            metadata["stats"] = {"checksum_int": self.pick([2**63, 2**64 + 5, -(2**63) - 1])}
        if "int64_edge" in defects:
            metadata["stats"] = {"max": 2**63 - 1, "min": -(2**63)}
        if "tags_nested" in defects:
            system_tags.append(["nested", "tag"])
        if "huge" in defects:
            line = '"Ana Gómez",ana@example.com,CA,"Los Angeles",12.50\n'
            metadata["preview"] = line * (1_100_000 // len(line) + 1)
        if "nul_text" in defects:
            name = self.nul(name)
            metadata["note"] = self.nul("imported from the old system")
            user_tags.append(self.nul("tag with nul"))
            metadata[self.nul("key")] = "a key with U+0000"
        if self.nul_ok and "nul_text" in defects and self.rng.random() < 0.5:
            system_tags[0] = self.nul(system_tags[0])
        uploaded_at = self.timestamp()
        return {
            "id": fid,
            "user_id": uid,
            "file_id": str(file_id),
            "file_name": name,
            "file_path": path,
            "uploaded_at": uploaded_at,
            "system_tags": system_tags,
            "user_tags": user_tags,
            "metadata": metadata,
            "size_bytes": recorded_size,
            "sha256": recorded_sha,
            "updated_at": uploaded_at + timedelta(seconds=self.rng.randrange(0, 86400 * 30)),
        }

    # --- filters -------------------------------------------------------------------------------

    def filter(self, rid: int, uid: int | None, file_id: int | None, defects: frozenset[str]) -> dict[str, Any]:
        definition: dict[str, Any] = self.pick(
            [
                {"column": "state", "op": "in", "values": self.rng.sample(STATES, 2)},
                {"column": "amount", "op": "gt", "value": self.rng.randrange(100, 10_000)},
                {"op": "and", "clauses": [{"column": "city", "op": "eq", "value": "Zürich"}, {"column": "amount"}]},
            ]
        )
        if "nested_def" in defects:
            definition = {"op": "or", "clauses": [[{"column": "state", "op": "eq", "value": "CA"}]]}
        if "dunder_def" in defects:
            definition = {**definition, "__op__": "eq"}
        if "bigint_def" in defects:
            definition = {"column": "amount", "op": "gt", "value": self.pick([2**63, 2**70, -(2**63) - 1])}
        if "nul_def" in defects:
            definition = {"column": self.nul("state"), "op": "eq", "value": self.nul("CA")}
        created_at = self.timestamp()
        name = self.pick(FILTER_NAMES)
        return {
            "id": rid,
            "user_id": uid,
            "file_id": file_id,
            "name": self.nul(name) if "nul_def" in defects else name,
            "definition": definition,
            "created_at": created_at,
            "updated_at": created_at + timedelta(seconds=self.rng.randrange(0, 86400 * 90)),
        }


def _defects(rng: random.Random, pending: list[frozenset[str]], pool: tuple[str, ...], share: float) -> frozenset[str]:
    if pending:
        return pending.pop(0)
    return frozenset({pool[rng.randrange(len(pool))]}) if rng.random() < share else frozenset()


def _prepare_media(media_root: Path, outside_dir: Path) -> None:
    """Empty ``media_root/uploads`` (the generator's own folder) and lay out the escape targets."""
    uploads = media_root / "uploads"
    if uploads.is_symlink():
        raise ValueError("media_root/uploads is a symlink: refusing to empty it")
    if uploads.exists():
        shutil.rmtree(uploads)
    uploads.mkdir(parents=True)
    outside_dir.mkdir(parents=True, exist_ok=True)
    (outside_dir / SECRET_NAME).write_bytes(SECRET_CONTENT)
    os.symlink(outside_dir.resolve(), media_root / SHARED_LINK, target_is_directory=True)


def _flush(engine: Engine, batches: dict[str, list[dict[str, Any]]]) -> None:
    with engine.begin() as conn:
        for entity, rows in batches.items():
            if rows:
                conn.execute(insert(django_schema.SOURCES[entity]), rows)
                rows.clear()


def generate_app(
    engine: Engine,
    media_root: Path,
    *,
    users: int = 200,
    seed: int = 7,
    outside_dir: Path | None = None,
    now: datetime = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC),
    chunk_size: int = 1000,
) -> AppTally:
    """(Re)create the Django tables and ``media_root/uploads``, fill them, return what was built.

    ``outside_dir`` (default ``media_root.parent / 'outside'``) receives the file that the
    unsafe paths and symlinks point at; a correct migration never reads it.
    """
    if users < MIN_USERS:
        raise ValueError(f"at least {MIN_USERS} users, so every shard has one")
    media_root = Path(media_root)
    outside = Path(outside_dir) if outside_dir is not None else media_root.parent / "outside"
    django_schema.django_metadata.drop_all(engine)
    django_schema.django_metadata.create_all(engine)
    _prepare_media(media_root, outside)
    gen = AppGenerator(seed, now, media_root, outside, nul_ok=engine.dialect.name == "sqlite")
    tally = AppTally()
    batches: dict[str, list[dict[str, Any]]] = {entity: [] for entity in ENTITIES}
    pending_files = list(FILE_CASES)
    pending_filters = list(FILTER_CASES)
    fid = rid = 0
    invalid_serial = 0

    def add_file(uid: int | None, user_ok: bool, defects: frozenset[str]) -> tuple[int, str]:
        nonlocal fid
        fid += 1
        causes = {*defects, *(() if user_ok else (app_rules.ORPHAN_USER,))}
        fate = fate_of(causes, app_rules.FILE_REASONS, FILE_DEFECTS)
        batches["files"].append(gen.file(fid, uid, defects))
        tally.add("files", fid, app_rules.shard_of(uid), fate)
        return fid, fate

    def add_filter(uid: int | None, user_ok: bool, own_files: list[tuple[int, str]], defects: frozenset[str]) -> None:
        nonlocal rid
        rid += 1
        migrated_files = [f for f, fate in own_files if fate == MIGRATED]
        quarantined_files = [f for f, fate in own_files if fate != MIGRATED]
        file_id: int | None
        if "missing_file" in defects:
            file_id = 10_000_000 + rid  # no such file
        elif "quarantined_file" in defects:
            file_id = gen.pick(quarantined_files) if quarantined_files else 10_000_000 + rid
        elif "file_null" in defects:
            file_id = None
        elif migrated_files and ("own_file" in defects or gen.rng.random() < 0.6):
            file_id = gen.pick(migrated_files)
        else:
            file_id = None
        causes = {*defects, *(() if user_ok else (app_rules.ORPHAN_USER,))}
        fate = fate_of(causes, app_rules.FILTER_REASONS, FILTER_DEFECTS)
        batches["filters"].append(gen.filter(rid, uid, file_id, defects))
        tally.add("filters", rid, app_rules.shard_of(uid), fate)

    for uid in range(1, users + 1):
        invalid = uid in (1, 2, 3) or gen.rng.random() < 0.03
        batches["users"].append(gen.user(uid, invalid_serial if invalid else None))
        invalid_serial += invalid
        tally.add("users", uid, app_rules.shard_of(uid), app_rules.INVALID_USERNAME if invalid else MIGRATED)
        # The placed cases go to users that are migrated, so each shows its own reason.
        file_cases, filter_cases = ([], []) if invalid else (pending_files, pending_filters)
        own_files = [
            add_file(uid, not invalid, _defects(gen.rng, file_cases, RANDOM_FILE_DEFECTS, 0.15))
            for _ in range(gen.rng.randrange(1 if invalid else 0, 4))
        ]
        for _ in range(gen.rng.randrange(0, 3)):
            add_filter(uid, not invalid, own_files, _defects(gen.rng, filter_cases, RANDOM_FILTER_DEFECTS, 0.15))
        if sum(len(rows) for rows in batches.values()) >= chunk_size:
            _flush(engine, batches)

    # Rows of no user or of a user that does not exist, in several shards.
    for k in range(max(4, users // 25)):
        uid = None if k % 2 == 0 else users + 1000 + k
        defects = frozenset(gen.pick([set(), {"dotdot"}, {"missing"}, {"nested_array"}]))
        own = [add_file(uid, False, defects)]
        add_filter(uid, False, own, frozenset(gen.pick([set(), {"quarantined_file"}, {"nested_def"}])))
    _flush(engine, batches)
    if engine.dialect.name == "postgresql":  # explicit ids: move the sequences past them, as Django would be
        with engine.begin() as conn:
            for table in django_schema.SOURCES.values():
                conn.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), max(id)) FROM {table.name}")
                )
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="SQLAlchemy URL of the Django DB to (re)create")
    parser.add_argument("--media-root", required=True, type=Path, help="folder of the uploaded files")
    parser.add_argument("--outside-dir", type=Path, default=None)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    engine = create_engine(args.url, hide_parameters=True)
    tally = generate_app(engine, args.media_root, users=args.users, seed=args.seed, outside_dir=args.outside_dir)
    print(json.dumps({entity: tally.totals(entity) for entity in ENTITIES}, indent=2))


if __name__ == "__main__":
    main()
