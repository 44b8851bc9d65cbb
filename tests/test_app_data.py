"""The List Cutter demo data: tables like the legacy SQL, real files, and a tally that holds.

The tally is checked against an independent pass over what was generated: every row read back
from the database, every file looked at on disk, the §6 rules of worker.app_rules applied in
their order, shard by shard, with the I/O part of UNSAFE_PATH (symlinks) done here.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, inspect, select

from demo.app_data import ENTITIES, MIGRATED, SECRET_CONTENT, SHARED_LINK, AppTally, generate_app
from worker import app_rules, django_schema, rules
from worker.app_rules import Quarantined

LEGACY_SQL = Path(os.getenv("LISTCUTTER_SQL", "/work/shared/legacy/listcutter_postgres.sql"))
# shared/legacy/listcutter_postgres.sql, column by column: name → (PostgreSQL type, nullable).
EXPECTED_COLUMNS: dict[str, dict[str, tuple[str, bool]]] = {
    "auth_user": {
        "id": ("integer", False),
        "password": ("character varying", False),
        "last_login": ("timestamp with time zone", True),
        "is_superuser": ("boolean", False),
        "username": ("character varying", False),
        "first_name": ("character varying", False),
        "last_name": ("character varying", False),
        "email": ("character varying", False),
        "is_staff": ("boolean", False),
        "is_active": ("boolean", False),
        "date_joined": ("timestamp with time zone", False),
    },
    "list_cutter_savedfile": {
        "id": ("integer", False),
        "user_id": ("integer", True),
        "file_id": ("uuid", False),
        "file_name": ("character varying", False),
        "file_path": ("character varying", False),
        "uploaded_at": ("timestamp with time zone", False),
        "system_tags": ("jsonb", False),
        "user_tags": ("jsonb", False),
        "metadata": ("jsonb", False),
        "size_bytes": ("bigint", True),
        "sha256": ("character", True),
        "updated_at": ("timestamp with time zone", False),
    },
    "list_cutter_savedfilter": {
        "id": ("integer", False),
        "user_id": ("integer", True),
        "file_id": ("integer", True),
        "name": ("character varying", False),
        "definition": ("jsonb", False),
        "created_at": ("timestamp with time zone", False),
        "updated_at": ("timestamp with time zone", False),
    },
}
SQL_TYPES = {
    "SERIAL": "integer",
    "INTEGER": "integer",
    "BIGINT": "bigint",
    "VARCHAR": "character varying",
    "CHAR": "character",
    "BOOLEAN": "boolean",
    "TIMESTAMPTZ": "timestamp with time zone",
    "UUID": "uuid",
    "JSONB": "jsonb",
}


def legacy_sql_columns(sql: str) -> dict[str, dict[str, tuple[str, bool]]]:
    tables: dict[str, dict[str, tuple[str, bool]]] = {}
    for name, body in re.findall(r"CREATE TABLE (\w+) \((.*?)\n\);", sql, re.DOTALL):
        columns = tables.setdefault(name, {})
        for line in body.splitlines():
            match = re.match(r"\s+(\w+)\s+([A-Z]+)", line)
            if match:
                definition = line.split("--")[0]
                nullable = "NOT NULL" not in definition and "PRIMARY KEY" not in definition
                columns[match.group(1)] = (SQL_TYPES[match.group(2)], nullable)
    return tables


def test_expected_columns_are_the_legacy_sql() -> None:
    if not LEGACY_SQL.exists():
        pytest.skip("shared/legacy/listcutter_postgres.sql is not on this machine")
    assert legacy_sql_columns(LEGACY_SQL.read_text()) == EXPECTED_COLUMNS


# --- an independent pass over the generated data --------------------------------------------


def resolve_safely(media_root: Path, file_path: str) -> Path:
    """The I/O half of UNSAFE_PATH: where the path leads, symlinks followed, must be under the root."""
    app_rules.require_safe_path(file_path)
    root = media_root.resolve()
    real = (media_root / file_path).resolve()
    if not real.is_relative_to(root):
        raise Quarantined(app_rules.UNSAFE_PATH, "file path leads outside the media root")
    return real


def read_shard(engine: Engine, entity: str, shard: int) -> list[dict[str, Any]]:
    table = django_schema.SOURCES[entity]
    with engine.connect() as conn:
        query = select(table).where(django_schema.shard_filter(table, shard)).order_by(table.c.id)
        return [dict(row._mapping) for row in conn.execute(query)]


def apply_rules(engine: Engine, media_root: Path) -> tuple[dict[str, dict[int, str]], dict[str, Counter[int]]]:
    """Each record's fate by the rules, and how many records each shard read per entity."""
    fates: dict[str, dict[int, str]] = {entity: {} for entity in ENTITIES}
    read: dict[str, Counter[int]] = {entity: Counter() for entity in ENTITIES}
    for shard in range(app_rules.SHARDS):
        users: set[int] = set()
        for row in read_shard(engine, "users", shard):
            read["users"][shard] += 1
            try:
                document = app_rules.transform_user(row)
                users.add(row["id"])
                fates["users"][row["id"]] = MIGRATED
                assert row["password"].replace("\x00", "") == document["password_hash"]
            except Quarantined as problem:
                fates["users"][row["id"]] = problem.reason
        files: set[int] = set()
        for row in read_shard(engine, "files", shard):
            read["files"][shard] += 1
            try:
                app_rules.require_user(row["user_id"] in users)
                real = resolve_safely(media_root, row["file_path"])
                if not real.is_file():
                    raise Quarantined(app_rules.MISSING_BLOB, "file is missing")
                content = real.read_bytes()
                assert content != SECRET_CONTENT
                actual = hashlib.sha256(content).hexdigest()
                app_rules.require_checksum(row["sha256"], actual)
                app_rules.require_size(row["size_bytes"], len(content))
                key = app_rules.blob_key(row["user_id"], row["file_id"])
                app_rules.file_document(row, size_bytes=len(content), sha256=actual, blob_url=f"memory://{key}")
                files.add(row["id"])
                fates["files"][row["id"]] = MIGRATED
            except Quarantined as problem:
                fates["files"][row["id"]] = problem.reason
        for row in read_shard(engine, "filters", shard):
            read["filters"][shard] += 1
            try:
                app_rules.require_user(row["user_id"] in users)
                app_rules.require_file(row["file_id"], row["file_id"] in files)
                app_rules.filter_document(row)
                fates["filters"][row["id"]] = MIGRATED
            except Quarantined as problem:
                fates["filters"][row["id"]] = problem.reason
    return fates, read


def check_generated(engine: Engine, media_root: Path, tally: AppTally) -> None:
    fates, read = apply_rules(engine, media_root)
    for entity in ENTITIES:
        assert fates[entity] == tally.outcomes[entity], entity
        table = django_schema.SOURCES[entity]
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(table)) == tally.totals(entity)["eligible"]
        for shard in range(app_rules.SHARDS):
            expected = tally.expected(entity, shard)
            assert read[entity][shard] == expected["eligible"], (entity, shard)
            assert expected["migrated"] + sum(expected["quarantined"].values()) == expected["eligible"]
        totals = tally.totals(entity)
        built = Counter(fates[entity].values())
        assert totals["migrated"] == built[MIGRATED]
        assert totals["quarantined"] == {reason: n for reason, n in sorted(built.items()) if reason != MIGRATED}
        assert set(totals["quarantined"]) <= set(app_rules.APP_ENTITIES[entity].reasons)
    # Every reason of every entity is built at least once.
    for entity in ENTITIES:
        assert set(tally.totals(entity)["quarantined"]) == set(app_rules.APP_ENTITIES[entity].reasons) - (
            {rules.INVALID_VALUE} if entity == "users" else set()
        )


def check_media(media_root: Path, outside: Path, engine: Engine) -> None:
    root = media_root.resolve()
    links = [path for path in (media_root / "uploads").rglob("*") if path.is_symlink()]
    escaping = [link for link in links if not link.resolve().is_relative_to(root)]
    assert (media_root / SHARED_LINK) in escaping
    assert (media_root / SHARED_LINK).resolve() == outside.resolve()
    assert any(link.is_file() and link.resolve() == (outside / "secret.csv").resolve() for link in escaping)
    assert any(link.resolve().is_relative_to(root) for link in links)  # a safe, internal symlink too
    assert (outside / "secret.csv").read_bytes() == SECRET_CONTENT
    with engine.connect() as conn:
        paths = [row.file_path for row in conn.execute(select(django_schema.savedfile.c.file_path))]
        records = conn.execute(select(django_schema.savedfile.c.sha256, django_schema.savedfile.c.size_bytes)).all()
    assert any(p.startswith("../") for p in paths) and any(p.startswith("/") for p in paths)
    assert any("\\" in p for p in paths) and f"{SHARED_LINK}/secret.csv" in paths
    assert any(sha is None for sha, _ in records) and any(sha and sha != sha.lower() for sha, _ in records)
    assert any(size is None for _, size in records)
    csvs = [p for p in (media_root / "uploads").rglob("*.csv") if not p.is_symlink() and p.is_file()]
    assert csvs and all(p.read_bytes().startswith(b"name,email,state,city,amount\n") for p in csvs)


def generate_and_check(engine: Engine, tmp_path: Path) -> AppTally:
    media_root = tmp_path / "media"
    tally = generate_app(engine, media_root, users=120, seed=11, chunk_size=97)
    check_generated(engine, media_root, tally)
    check_media(media_root, tmp_path / "outside", engine)
    return tally


def test_sqlite_demo_data(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    tally = generate_and_check(engine, tmp_path)
    assert {name: {c["name"] for c in inspect(engine).get_columns(name)} for name in EXPECTED_COLUMNS} == {
        name: set(columns) for name, columns in EXPECTED_COLUMNS.items()
    }
    with engine.connect() as conn:  # SQLite keeps U+0000 (removed by the rules, never quarantined)
        names = list(conn.scalars(select(django_schema.savedfile.c.file_name)))
        usernames = list(conn.scalars(select(django_schema.auth_user.c.username)))
    assert any("\x00" in name for name in names) and any("\x00" in name for name in usernames)
    assert tally.totals("users")["quarantined"][app_rules.INVALID_USERNAME] >= 3


def test_postgres_demo_data(postgres_url: str, tmp_path: Path) -> None:
    engine = create_engine(postgres_url, hide_parameters=True)
    try:
        generate_and_check(engine, tmp_path)
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
                "WHERE table_schema = 'public'"
            ).all()
            next_id = conn.exec_driver_sql("SELECT nextval(pg_get_serial_sequence('auth_user', 'id'))").scalar()
            users = conn.exec_driver_sql("SELECT max(id) FROM auth_user").scalar()
        columns: dict[str, dict[str, tuple[str, bool]]] = {}
        for table, column, data_type, nullable in rows:
            columns.setdefault(table, {})[column] = (data_type, nullable == "YES")
        assert columns == EXPECTED_COLUMNS
        assert next_id == users + 1  # the sequences moved past the explicit ids
    finally:
        engine.dispose()


def test_same_seed_same_data(tmp_path: Path) -> None:
    tallies, dumps = [], []
    for n in (1, 2):
        engine = create_engine(f"sqlite:///{tmp_path / f'app{n}.db'}")
        media_root = tmp_path / f"run{n}" / "media"
        tallies.append(generate_app(engine, media_root, users=40, seed=3))
        with engine.connect() as conn:
            dumps.append([conn.execute(select(t).order_by(t.c.id)).all() for t in django_schema.SOURCES.values()])
    assert tallies[0] == tallies[1]
    first, second = dumps
    assert first[0] == second[0] and first[2] == second[2]  # files differ only in their absolute outside paths
    assert [r.sha256 for r in first[1]] == [r.sha256 for r in second[1]]
    other = generate_app(create_engine(f"sqlite:///{tmp_path / 'app3.db'}"), tmp_path / "run3" / "media", seed=4)
    assert other != tallies[0]


@pytest.mark.parametrize("shard", [0, 5, 15])
def test_shard_filter_matches_shard_of_on_sqlite(tmp_path: Path, shard: int) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    tally = generate_app(engine, tmp_path / "media", users=40, seed=5)
    for entity in ENTITIES:
        table = django_schema.SOURCES[entity]
        column = table.c[app_rules.APP_ENTITIES[entity].shard_column]
        with engine.connect() as conn:
            selected = set(conn.scalars(select(table.c.id).where(django_schema.shard_filter(table, shard))))
            everything = conn.execute(select(table.c.id, column)).all()
        assert selected == {legacy_id for legacy_id, owner in everything if app_rules.shard_of(owner) == shard}
        assert len(selected) == tally.expected(entity, shard)["eligible"]
    with pytest.raises(ValueError):
        django_schema.shard_filter(django_schema.auth_user, 16)
