"""Guards of the worker's speed-ups: each shortcut must read exactly what the plain way reads."""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pytest
from sqlalchemy import BigInteger, Column, MetaData, Table, Text, insert, select

from worker import batch, schema, store

HOSTILE = [None, "", " ", '"', '""', ",", "a,b", 'x,"y"', "\\N", "\\", "line\nbreak", "cr\r\nlf", "{", "}", "ñ€😀", "'"]
HOSTILE += ["NA", "NULL", "null", "nan", "N/A", "#N/A"]  # what CSV readers take for NULL by default


def test_python_whitespace_is_spelled_out_exactly() -> None:
    assert "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()) == batch._PY_SPACE


def test_array_literal() -> None:
    assert store.array_literal([]) == "{}"
    assert store.array_literal(pl.Series([3, -1, 2**62])) == "{3,-1,4611686018427387904}"
    assert store.array_literal(["a", 'b"c', "d\\e"]) == '{"a","b\\"c","d\\\\e"}'


@pytest.mark.parametrize("rows", [0, 1, 3000])
def test_frame_of_reads_what_the_driver_reads(postgres_url: str, rows: int) -> None:
    """frame_of (one CSV text folded by the server) and one_of (an array literal) against plain
    fetches: NULLs, empty strings, quotes, separators and newlines survive, row for row."""
    table = Table("speed_guard", MetaData(), Column("a", BigInteger), Column("b", Text), Column("c", BigInteger))
    values = [{"a": i if i % 7 else None, "b": HOSTILE[i % len(HOSTILE)], "c": -i} for i in range(rows)]
    engine = schema.make_engine(postgres_url)
    try:
        with engine.begin() as conn:
            table.create(conn)
            if values:
                conn.execute(insert(table), values)
            types = {"a": pl.Int64, "b": pl.String, "c": pl.Int64}
            statement = select(table.c.a, table.c.b, table.c.c).order_by(table.c.c.desc())
            expected = [dict(r._mapping) for r in conn.execute(statement)]
            assert store.frame_of(conn, statement, types).to_dicts() == expected
            only_b = store.frame_of(conn, select(table.c.b).order_by(table.c.c.desc()), {"b": pl.String})
            assert only_b["b"].to_list() == [r["b"] for r in expected]
            wanted = [s for s in HOSTILE if s is not None]
            picked = select(table.c.c).where(store.one_of(conn, table.c.b, pl.Series(wanted)))
            plain = select(table.c.c).where(table.c.b.in_(wanted))
            assert sorted(conn.scalars(picked)) == sorted(conn.scalars(plain))
            ids = pl.Series([-i for i in range(0, rows, 3)], dtype=pl.Int64)
            by_id = select(table.c.c).where(store.one_of(conn, table.c.c, ids))
            assert sorted(conn.scalars(by_id)) == sorted(ids.to_list())
            assert store.frame_of(conn, select(table.c.a).where(table.c.c > 0), {"a": pl.Int64}).height == 0
    finally:
        engine.dispose()


def test_mariadb_connections_share_one_preferred_tls_context(mariadb_url: str) -> None:
    """PyMySQL's preferred mode (no TLS option: TLS when the server offers it, unverified) is kept, with one
    context per process instead of one per connection (each loaded the system's CA store, ~20 ms)."""
    import pymysql
    from sqlalchemy.engine import make_url

    url = make_url(mariadb_url)
    own = pymysql.connect(host=url.host, port=url.port or 3306, user=url.username, password=url.password or "")
    engine = schema.make_engine(mariadb_url)
    try:
        with engine.connect() as first, engine.connect() as second:
            contexts = [c.connection.dbapi_connection.ctx for c in (first, second)]  # type: ignore[union-attr]
            assert first.scalar(select(1)) == second.scalar(select(1)) == 1
        assert contexts[0] is contexts[1]  # one context, not one per connection
        assert contexts[0] is schema.preferred_tls_context()
        shared, plain = contexts[0], own.ctx
        assert plain is not shared and own.ssl  # PyMySQL's own preferred mode, as the shared context stands in for
        settings = ("protocol", "verify_mode", "check_hostname", "verify_flags", "options", "minimum_version")
        assert [getattr(shared, s) for s in settings] == [getattr(plain, s) for s in settings]
        assert shared.verify_mode == 0 and not shared.check_hostname  # CERT_NONE: a CA store would go unused
    finally:
        own.close()
        engine.dispose()


def test_mariadb_tls_options_still_reach_pymysql(mariadb_url: str, tmp_path: Path) -> None:
    """A URL or ``connect_args`` that names TLS options gets PyMySQL's own context, not the shared one: here
    a CA file that does not exist fails the connection (the shared context would have connected)."""
    engine = schema.make_engine(mariadb_url, connect_args={"ssl": {"ca": str(tmp_path / "no-such-ca.pem")}})
    try:
        with pytest.raises(FileNotFoundError), engine.connect():
            pass
    finally:
        engine.dispose()
