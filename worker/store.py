"""Bulk writes that are fast on PostgreSQL and plain on SQLite.

PostgreSQL gets COPY (into the table, or into a temporary staging table followed by one
``INSERT … ON CONFLICT``); SQLite, used only by the demo, gets executemany upserts.
"""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, Connection, Table, func, insert, literal_column, select
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError

# SQLSTATEs of a value the target cannot hold: class 22 (data exception: too long, bad encoding, out
# of range, bad datetime), NOT NULL and CHECK violations. Unique violations are not among them: they
# are the engine's own logic going wrong, and must stop the run.
REFUSED_VALUE_STATES = ("22", "23502", "23514")
INSUFFICIENT_PRIVILEGE = "42501"  # e.g. "must be owner of …"
_COLUMN_IN_CONTEXT = re.compile(r"\bcolumn (\w+)")


def jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    """A target row as JSON values (dates in ISO 8601), for the ledger's ``previous``."""
    return {k: v.isoformat() if isinstance(v, (date, datetime)) else v for k, v in row.items()}


def from_jsonable(table: Table, previous: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`jsonable` for ``table``: a ledger's ``previous`` as the row it was."""
    row: dict[str, Any] = {}
    for name, value in previous.items():
        kind = table.c[name].type.python_type if value is not None and isinstance(value, str) else None
        if kind is datetime:
            row[name] = datetime.fromisoformat(value)
        elif kind is date:
            row[name] = date.fromisoformat(value)
        else:
            row[name] = value
    return row


def qualified_name(conn: Connection, table: Table) -> str:
    schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(table.schema, table.schema)
    return f'"{schema}"."{table.name}"' if schema else f'"{table.name}"'


def _names(columns: Sequence[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


@contextmanager
def _copy_in(conn: Connection, statement: str) -> Iterator[Any]:
    """The driver's own ``COPY … FROM STDIN`` of ``statement`` (psycopg's ``Copy``, to write to), on a cursor
    whose errors are raised as SQLAlchemy raises the same error from an execute (a :class:`DBAPIError` with
    ``orig``, bound values hidden): callers tell a value the target refuses (:func:`is_refused_value`) from
    any other failure the same way for both."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    base = conn.dialect.loaded_dbapi.Error
    try:
        with cursor, cursor.copy(statement) as copy:
            yield copy
    except base as problem:
        raise DBAPIError.instance(statement, None, problem, base, hide_parameters=True) from None


def _copy(conn: Connection, qualified: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    statement = f"COPY {qualified} ({_names(columns)}) FROM STDIN"
    with _copy_in(conn, statement) as copy:
        for row in rows:
            copy.write_row(row)


def insert_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows: COPY on PostgreSQL, executemany elsewhere."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(insert(table), [dict(r) for r in rows])
        return
    columns = list(rows[0])
    as_json = {c for c in columns if isinstance(table.c[c].type, JSON)}
    _copy(
        conn,
        qualified_name(conn, table),
        columns,
        ([json.dumps(r[c]) if c in as_json and r[c] is not None else r[c] for c in columns] for r in rows),
    )


def upsert_rows(
    conn: Connection,
    table: Table,
    key: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    returning: Sequence[str] = (),
) -> list[tuple[Any, ...]]:
    """Insert or overwrite rows by ``key``: COPY into a staging table + one ON CONFLICT statement.
    Returns the ``returning`` columns of every written row (e.g. ids the database assigned)."""
    if not rows:
        return []
    columns = list(rows[0])
    updates = [c for c in columns if c not in key]
    if conn.dialect.name != "postgresql":
        stmt = sqlite_insert(table)
        upsert = stmt.on_conflict_do_update(index_elements=list(key), set_={c: stmt.excluded[c] for c in updates})
        if returning:
            upsert = upsert.returning(*(table.c[c] for c in returning))
        result = conn.execute(upsert, [dict(r) for r in rows])
        return [tuple(r) for r in result.all()] if returning else []
    stage = f"stage_{table.name}"
    names = _names(columns)
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE IF NOT EXISTS {stage} AS SELECT {names} FROM {qualified_name(conn, table)} WITH NO DATA"
    )
    conn.exec_driver_sql(f"TRUNCATE {stage}")
    _copy(conn, stage, columns, ([r[c] for c in columns] for r in rows))
    target = qualified_name(conn, table)
    assignments = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in updates)
    returned = f" RETURNING {_names(returning)}" if returning else ""
    result = conn.exec_driver_sql(
        f"INSERT INTO {target} ({names}) SELECT {names} FROM {stage} "
        f"ON CONFLICT ({_names(key)}) DO UPDATE SET {assignments}{returned}"
    )
    return [tuple(r) for r in result.all()] if returning else []


def analyze(conn: Connection, table: Table, columns: Sequence[str] = ()) -> None:
    """Refresh PostgreSQL's planner statistics: a table that grew from nothing inside one run is
    still 'empty' to the planner until autovacuum gets to it, and its lookups turn into scans.
    ``columns``: only those columns' statistics (the table's size is refreshed all the same)."""
    if conn.dialect.name == "postgresql":
        listed = f" ({_names(columns)})" if columns else ""
        conn.exec_driver_sql(f"ANALYZE {qualified_name(conn, table)}{listed}")


def prefer_index_lookups(conn: Connection) -> None:
    """Price random reads as the cached, SSD-backed reads they are (PostgreSQL, this session only).
    With the default (4, for spinning disks) the planner answers a batch's look-up of a few thousand
    documents (``= ANY(array)``) by scanning the whole table: a cost that grows with every batch."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET random_page_cost = 1.1")
        conn.commit()


def savepoint(conn: Connection) -> AbstractContextManager[Any]:
    """A SAVEPOINT on PostgreSQL; SQLite (the demo; pysqlite's SAVEPOINT handling is unreliable)
    runs the block in the enclosing transaction."""
    return conn.begin_nested() if conn.dialect.name == "postgresql" else nullcontext()


def is_refused_value(problem: DBAPIError) -> bool:
    """Did the database refuse a *value* (rather than fail for another reason)?"""
    state = getattr(problem.orig, "sqlstate", None) or ""
    return state.startswith(REFUSED_VALUE_STATES)


def is_not_owner(problem: DBAPIError) -> bool:
    """Did the database refuse the statement to this role (not the owner, or no privilege)?"""
    return getattr(problem.orig, "sqlstate", None) == INSUFFICIENT_PRIVILEGE


def refused_column(problem: DBAPIError) -> str | None:
    """The column whose value was refused, from the error's diagnostics (never its message text,
    which may quote the value)."""
    diag = getattr(problem.orig, "diag", None)
    if diag is None:
        return None
    if diag.column_name:
        return str(diag.column_name)
    found = _COLUMN_IN_CONTEXT.search(diag.context or "")
    return found.group(1) if found else diag.constraint_name


def refused_rows(
    conn: Connection, table: Table, key: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> dict[int, str | None]:
    """The positions in ``rows`` of the rows the target refuses, each with the refused column.

    Bisects with savepoints that are always rolled back, so the caller's transaction is left as it
    was: about 2·k·log2(n) probes for k bad rows among n.
    """
    refused: dict[int, str | None] = {}

    def probe(lo: int, hi: int) -> None:
        try:
            with conn.begin_nested() as attempt:
                upsert_rows(conn, table, key, rows[lo:hi])
                attempt.rollback()
            return
        except DBAPIError as problem:
            if not is_refused_value(problem):
                raise
            if hi - lo == 1:
                refused[lo] = refused_column(problem)
                return
        middle = (lo + hi) // 2
        probe(lo, middle)
        probe(middle, hi)

    if rows and conn.dialect.name == "postgresql":
        probe(0, len(rows))
    return refused


def missing_from(ours: Iterable[int], theirs: Iterable[int]) -> Iterator[int]:
    """The ids of sorted ``ours`` that sorted ``theirs`` lacks, in one pass over both."""
    other = iter(theirs)
    current = next(other, None)
    for value in ours:
        while current is not None and current < value:
            current = next(other, None)
        if current != value:
            yield value


# --- frames (the fast path) --------------------------------------------------------------------


def one_of(conn: Connection, column: Any, values: Any) -> Any:
    """``column`` is one of ``values`` (a sequence or a polars Series, no NULLs): ``= ANY(array)`` on
    PostgreSQL (one parameter, one plan), ``IN (…)`` elsewhere. The array travels as one text
    parameter in PostgreSQL's array syntax, built without Python per value."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy import any_, bindparam, cast
        from sqlalchemy.dialects.postgresql import ARRAY
        from sqlalchemy.types import NullType

        # An untyped parameter cast to the array type: PostgreSQL parses it once, into a constant
        # (a text parameter cast at run time would be parsed again for every row a scan filters).
        return column == any_(cast(bindparam(None, array_literal(values), type_=NullType()), ARRAY(column.type)))
    return column.in_(values.to_list() if hasattr(values, "to_list") else list(values))


def array_literal(values: Any) -> str:
    """``values`` (integers or strings, no NULLs) as a PostgreSQL array literal: ``{1,2}``, ``{"a","b"}``.

    A polars Series is joined by polars; a Python list of integers (a page's ids) by ``str.join``: ~25 µs
    for 500 ids, where building a Series for them costs milliseconds and wakes polars' threads."""
    if isinstance(values, list | tuple) and all(type(value) is int for value in values):
        return "{" + ",".join(map(str, values)) + "}"
    import polars as pl

    series = values if isinstance(values, pl.Series) else pl.Series(list(values))
    if series.dtype == pl.Null or series.len() == 0:
        return "{}"
    if series.dtype.is_integer():
        return "{" + series.cast(pl.String).str.join(",").item() + "}"
    if series.dtype != pl.String:
        raise TypeError(f"no array literal for a {series.dtype} column")
    quoted = series.str.replace_all("\\", "\\\\", literal=True).str.replace_all('"', '\\"', literal=True)
    return "{" + ('"' + quoted + '"').str.join(",").item() + "}"


def frame_of(conn: Connection, statement: Any, types: Mapping[str, Any]) -> Any:
    """The rows of ``statement`` as a polars frame with the given column types (integers and
    strings), in the order of its columns. On PostgreSQL the server folds the rows into one CSV text
    (``string_agg``) that polars parses: one value crosses to Python, not one object per row."""
    import polars as pl

    if conn.dialect.name != "postgresql":
        return pl.DataFrame(conn.execute(statement).all(), schema=dict(types), orient="row")
    translate = conn.get_execution_options().get("schema_translate_map")
    translated = {"schema_translate_map": translate, "render_schema_translate": True} if translate else {}
    compiled = statement.compile(dialect=conn.dialect, **translated)
    fields = []
    for i, kind in enumerate(types.values()):
        if kind == pl.String:  # quoted, quotes doubled; NULL stays an unquoted empty field
            fields.append(f"""coalesce('"' || replace(q.c{i}::text, '"', '""') || '"', '')""")
        elif kind.is_integer():
            fields.append(f"coalesce(q.c{i}::text, '')")
        else:
            raise TypeError(f"frame_of reads integer and string columns, not {kind}")
    # A leading constant field: no line is ever empty (a lone NULL would be), which CSV readers skip.
    line = " || ',' || ".join(["'0'", *fields])
    aliases = ", ".join(f"c{i}" for i in range(len(types)))
    sql = f"SELECT string_agg({line}, E'\\n') FROM ({compiled}) AS q({aliases})"
    text = conn.exec_driver_sql(sql, compiled.params).scalar()
    if not text:
        return pl.DataFrame(schema=dict(types))
    return pl.read_csv(text.encode(), has_header=False, schema={"_": pl.Int8, **types}).drop("_")


def copy_frame(conn: Connection, table: Table, frame: Any) -> None:
    """Append a polars frame's rows: one COPY … CSV on PostgreSQL (no Python per row), executemany
    elsewhere. JSON columns hold JSON text."""
    if frame.height == 0:
        return
    if conn.dialect.name != "postgresql":
        as_json = {c for c in frame.columns if isinstance(table.c[c].type, JSON)}
        rows = [
            {k: json.loads(v) if k in as_json and v is not None else v for k, v in r.items()} for r in frame.to_dicts()
        ]
        conn.execute(insert(table), rows)
        return
    _copy_into(conn, table, qualified_name(conn, table), frame)


def _copy_into(conn: Connection, table: Table, qualified: str, frame: Any) -> None:
    """COPY a frame's rows into ``qualified`` (``table`` or a table made like it): in PostgreSQL's binary
    form when :func:`binary_columns` can write every column, else as CSV. The binary form costs the server
    about half the CPU of parsing the same rows as text (200k patients rows into a table without indexes:
    0.27 s against 0.52 s), the same on the client, and stores the same values."""
    # pyarrow is loaded by a run that reads through connectorx; one that read its few rows through the driver
    # (worker/source.py, DRIVER_ROWS) writes them as CSV rather than load it (~60 ms) for them.
    arrow = binary_columns(table, frame) if "pyarrow" in sys.modules else None
    if arrow is None:
        _copy_csv(conn, qualified, frame)
        return
    import pgpq

    statement = f"COPY {qualified} ({_names(frame.columns)}) FROM STDIN WITH (FORMAT binary)"
    encoder = pgpq.ArrowToPostgresBinaryEncoder(arrow.schema)
    with _copy_in(conn, statement) as copy:
        copy.write(encoder.write_header())
        for batch in arrow.to_batches():
            copy.write(encoder.write_batch(batch))
        copy.write(encoder.finish())


def binary_columns(table: Table, frame: Any) -> Any:
    """``frame`` as an Arrow table whose every column has the Arrow type whose binary COPY form is the one of
    its column of ``table`` (``bigint``, text types and ``json`` as text, ``date``, ``timestamptz``), or None
    when one has not: another type, one the CSV form would let the server convert, integers that might not
    fit, nanoseconds (the CSV form keeps microseconds), or a datetime without time zone for a ``timestamptz``
    (as text, the server would read it in its session's time zone). Those frames go as CSV, as before.

    The columns are converted by polars before they are handed to Arrow, not cast by Arrow: Arrow's first
    cast in a process builds its compute functions' registry (27–250 ms, and 31–38 MB more of a first
    run's peak RSS, measured in the spare of a resident worker that had cast once ahead)."""
    import polars as pl
    import pyarrow as pa
    from sqlalchemy.dialects.postgresql import JSONB

    widened_to_bigint = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32)
    wanted, columns = [], []
    for name, dtype in frame.schema.items():
        kind, column = table.c[name].type, pl.col(name)
        if isinstance(kind, sqltypes.BigInteger):
            arrow_type, fits, column = pa.int64(), dtype in widened_to_bigint, column.cast(pl.Int64)
        elif isinstance(kind, (sqltypes.String, JSON)) and not isinstance(kind, JSONB):  # jsonb's form is not text
            arrow_type, fits, column = pa.large_string(), dtype == pl.String, column.cast(pl.String)
        elif isinstance(kind, sqltypes.DateTime) and kind.timezone:
            arrow_type = pa.timestamp("us", tz="UTC")
            fits = isinstance(dtype, pl.Datetime) and dtype.time_unit != "ns" and dtype.time_zone is not None
            if fits:  # the same instants, in microseconds and UTC
                column = column.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
            else:
                column = column.cast(pl.Datetime("us", "UTC"))
        elif isinstance(kind, sqltypes.Date):
            arrow_type, fits, column = pa.date32(), dtype == pl.Date, column.cast(pl.Date)
        else:
            return None
        if not (fits or dtype == pl.Null):
            return None
        wanted.append(pa.field(name, arrow_type))
        columns.append(column)
    arrow = frame.select(columns).to_arrow(compat_level=pl.CompatLevel.oldest())  # strings as large_string
    return arrow if arrow.schema.equals(pa.schema(wanted)) else None


def _copy_csv(conn: Connection, qualified: str, frame: Any) -> None:
    buffer = io.BytesIO()
    frame.write_csv(
        buffer,
        include_header=False,
        null_value=r"\N",
        quote_style="non_numeric",  # an empty string is "", a NULL is a bare \N
        datetime_format="%Y-%m-%d %H:%M:%S%.6f%:z",
        date_format="%Y-%m-%d",
    )
    statement = f"COPY {qualified} ({_names(frame.columns)}) FROM STDIN WITH (FORMAT csv, NULL '\\N')"
    with _copy_in(conn, statement) as copy:
        copy.write(buffer.getbuffer())


def upsert_frame(conn: Connection, table: Table, key: Sequence[str], frame: Any, *, fresh: bool) -> Any:
    """Insert or overwrite a frame's rows by ``key``; return ``legacy_id``, ``id`` of every row
    written (a polars frame).

    ``fresh``: none of the rows exists yet (their range of the target is empty), so they are copied
    straight into the table, without a staging table or ON CONFLICT."""
    import polars as pl

    types = {"legacy_id": pl.Int64, "id": pl.Int64}
    if frame.height == 0:
        return pl.DataFrame(schema=types)
    if conn.dialect.name != "postgresql":
        written = upsert_rows(conn, table, key, frame.to_dicts(), returning=("legacy_id", "id"))
        return pl.DataFrame(written, schema=types, orient="row")
    target = qualified_name(conn, table)
    names = _names(frame.columns)
    if fresh:
        # The ids are drawn from the table's sequence up front, in the frame's order (as the
        # column default would draw them), and copied with the rows: nothing to read back.
        # The sequence is looked up once: as an argument of nextval() it would be looked up per row.
        sequence = conn.scalar(select(func.pg_get_serial_sequence(target, "id")))
        regclass = literal_column("'" + str(sequence).replace("'", "''") + "'::regclass")
        drawn = frame_of(
            conn, select(func.nextval(regclass)).select_from(func.generate_series(1, frame.height)), {"id": pl.Int64}
        )
        if drawn.height != frame.height:
            raise RuntimeError("the target's id sequence gave fewer ids than rows")
        _copy_into(conn, table, target, pl.concat([drawn, frame], how="horizontal"))
        return pl.DataFrame({"legacy_id": frame["legacy_id"], "id": drawn["id"]}, schema=types)
    stage = f"stage_{table.name}"
    conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {stage} AS SELECT {names} FROM {target} WITH NO DATA")
    conn.exec_driver_sql(f"TRUNCATE {stage}")
    _copy_into(conn, table, stage, frame)
    updates = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in frame.columns if c not in key)
    result = conn.exec_driver_sql(
        f"INSERT INTO {target} ({names}) SELECT {names} FROM {stage} "
        f'ON CONFLICT ({_names(key)}) DO UPDATE SET {updates} RETURNING "legacy_id", "id"'
    )
    return pl.DataFrame(result.all(), schema=types, orient="row")


def previous_versions(
    conn: Connection, table: Table, ids: Sequence[int], *, delete_them: bool
) -> list[tuple[int, int, str]]:
    """``(legacy_id, id, the row as JSON text)`` of the rows with these target ids — what the
    ledger keeps to restore them — deleting them too if ``delete_them``."""
    if not ids:
        return []
    if conn.dialect.name == "postgresql":
        target = qualified_name(conn, table)
        picked = 't."legacy_id", t."id", to_jsonb(t)::text'
        where = 't."id" = ANY(%(ids)s)'
        if delete_them:
            sql = f"DELETE FROM {target} AS t WHERE {where} RETURNING {picked}"
        else:
            sql = f"SELECT {picked} FROM {target} AS t WHERE {where}"
        return [tuple(r) for r in conn.exec_driver_sql(sql, {"ids": list(ids)}).all()]  # type: ignore[misc]
    rows = conn.execute(table.select().where(table.c.id.in_(list(ids)))).mappings().all()
    found = [(r["legacy_id"], r["id"], json.dumps(jsonable(r))) for r in rows]
    if delete_them:
        conn.execute(table.delete().where(table.c.id.in_(list(ids))))
    return found


def set_hashes(conn: Connection, table: Table, ids: Sequence[int], hashes: Sequence[str]) -> None:
    """Rewrite ``content_hash`` of the given target rows in place (nothing else of them)."""
    if not ids:
        return
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(
            f'UPDATE {qualified_name(conn, table)} AS t SET "content_hash" = u.h '
            f'FROM unnest(%(ids)s::bigint[], %(hashes)s::text[]) AS u(id, h) WHERE t."id" = u.id',
            {"ids": list(ids), "hashes": list(hashes)},
        )
        return
    from sqlalchemy import bindparam, update

    conn.execute(
        update(table).where(table.c.id == bindparam("_id")).values(content_hash=bindparam("_h")),
        [{"_id": i, "_h": h} for i, h in zip(ids, hashes, strict=True)],
    )
