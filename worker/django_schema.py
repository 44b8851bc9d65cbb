"""The List Cutter Django tables, the app path's source (read only).

They mirror shared/legacy/listcutter_postgres.sql column for column. The project only reads
them, except the demo/test generator (demo.app_data), which creates them where no Django
database exists. On PostgreSQL the columns have their real types (JSONB, UUID, TIMESTAMPTZ);
on SQLite (the demo) JSON is text, a UUID is its text form and a timestamp is the naive-UTC text
Django itself writes there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    CHAR,
    JSON,
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    false,
    literal,
    or_,
    true,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import DateTime, TypeDecorator, TypeEngine

from worker import app_rules, rules


class DjangoDateTime(TypeDecorator[Any]):
    """TIMESTAMPTZ on PostgreSQL; on SQLite the text Django writes ('YYYY-MM-DD HH:MM:SS.ffffff',
    naive UTC). Reading SQLite never fails on junk text: it is handed back raw, and the rules
    (rules.coerce_datetime) turn it into None."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if dialect.name == "sqlite" and isinstance(value, datetime):
            aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
            return aware.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if dialect.name == "sqlite" and isinstance(value, str):
            parsed = rules.coerce_datetime(value)
            return value if parsed is None else parsed
        return value


_json = JSON().with_variant(postgresql.JSONB(), "postgresql")
_uuid = String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")
_timestamp = DjangoDateTime()

django_metadata = MetaData()


def column(*args: Any, **kwargs: Any) -> Column[Any]:
    """A column that is NOT NULL unless said otherwise, as Django creates them."""
    kwargs.setdefault("nullable", False)
    return Column(*args, **kwargs)


auth_user = Table(
    "auth_user",
    django_metadata,
    column("id", Integer, primary_key=True, autoincrement=True),
    column("password", String(128)),  # a Django hash: a secret, never logged
    column("last_login", _timestamp, nullable=True),
    column("is_superuser", Boolean, server_default=false()),
    column("username", String(150), unique=True),
    column("first_name", String(150), server_default=""),
    column("last_name", String(150), server_default=""),
    column("email", String(254), server_default=""),
    column("is_staff", Boolean, server_default=false()),
    column("is_active", Boolean, server_default=true()),
    column("date_joined", _timestamp),
)

savedfile = Table(
    "list_cutter_savedfile",
    django_metadata,
    column("id", Integer, primary_key=True, autoincrement=True),
    column("user_id", Integer, nullable=True),  # the FK was dropped years ago: orphans exist
    column("file_id", _uuid, unique=True),
    column("file_name", String(255)),
    column("file_path", String(500)),  # relative to MEDIA_ROOT; the file may be missing
    column("uploaded_at", _timestamp),
    column("system_tags", _json, server_default="[]"),
    column("user_tags", _json, server_default="[]"),
    column("metadata", _json, server_default="{}"),
    column("size_bytes", BigInteger, nullable=True),
    column("sha256", CHAR(64), nullable=True),
    column("updated_at", _timestamp),
    Index("idx_savedfile_user", "user_id"),
)

savedfilter = Table(
    "list_cutter_savedfilter",
    django_metadata,
    column("id", Integer, primary_key=True, autoincrement=True),
    column("user_id", Integer, nullable=True),
    column("file_id", Integer, nullable=True),  # list_cutter_savedfile.id; NULL = any file
    column("name", String(255)),
    column("definition", _json),
    column("created_at", _timestamp),
    column("updated_at", _timestamp),
    Index("idx_savedfilter_user", "user_id"),
)

SOURCES: dict[str, Table] = {"users": auth_user, "files": savedfile, "filters": savedfilter}


def shard_filter(table: Table, shard: int) -> ColumnElement[bool]:
    """The WHERE clause selecting one shard of a Django table (DESIGN §3).

    ``id % 16`` for auth_user, ``user_id % 16`` for files and filters, with a NULL user_id in
    shard 0 — the same as app_rules.shard_of, on PostgreSQL and SQLite alike (both truncate
    ``%`` toward zero, so the sum keeps a negative id in Python's shard too).
    """
    app_rules.shard_key(shard)  # validates the number
    entity = next((name for name, source in SOURCES.items() if source.name == table.name), None)
    if entity is None:
        raise ValueError("not a Django source table")
    column = table.c[app_rules.APP_ENTITIES[entity].shard_column]
    n = app_rules.SHARDS
    in_shard = (column % n + n) % n == literal(shard)
    if shard == 0 and column.nullable:
        return or_(column.is_(None), in_shard)
    return in_shard
