"""Guards of the worker's speed-ups: each shortcut must read exactly what the plain way reads."""

from __future__ import annotations

import re
import sys
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from sqlalchemy import JSON, BigInteger, Column, Date, DateTime, MetaData, String, Table, Text, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from worker import batch, schema, store

HOSTILE = [None, "", " ", '"', '""', ",", "a,b", 'x,"y"', "\\N", "\\", "line\nbreak", "cr\r\nlf", "{", "}", "ñ€😀", "'"]
HOSTILE += ["NA", "NULL", "null", "nan", "N/A", "#N/A"]  # what CSV readers take for NULL by default


def test_python_whitespace_is_spelled_out_exactly() -> None:
    assert "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()) == batch._PY_SPACE


def test_array_literal() -> None:
    assert store.array_literal([]) == "{}"
    assert store.array_literal(pl.Series([3, -1, 2**62])) == "{3,-1,4611686018427387904}"
    assert store.array_literal([3, -1, 2**62]) == store.array_literal((3, -1, 2**62)) == "{3,-1,4611686018427387904}"
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


COPIED = Table(
    "copy_guard",
    MetaData(),
    Column("k", BigInteger),
    Column("s", String(24)),
    Column("t", Text),
    Column("j", JSON),
    Column("d", Date),
    Column("z", DateTime(timezone=True)),
    Column("none", Text),
)


def copy_guard_frame(rows: int) -> pl.DataFrame:
    bogota = timezone(timedelta(hours=-5))
    return pl.DataFrame(
        {
            "k": [None if i % 5 == 0 else (-1) ** i * (2**62 + i) for i in range(rows)],
            "s": [HOSTILE[i % len(HOSTILE)] for i in range(rows)],
            "t": [
                None if i % 3 == 0 else "notas\n\t\x01" * (i % 40) + str(HOSTILE[i % len(HOSTILE)]) for i in range(rows)
            ],
            "j": [None if i % 4 == 0 else f'{{"a": {i}, "b": "x\\"y"}}' for i in range(rows)],
            "d": [None if i % 6 == 0 else date(1899 + i % 200, 1 + i % 12, 1 + i % 28) for i in range(rows)],
            "z": [
                None if i % 7 == 0 else datetime(1950 + i % 90, 1 + i % 12, 1, 23, 59, 59, i * 7, tzinfo=bogota)
                for i in range(rows)
            ],
            "none": [None] * rows,
        },
        schema={
            "k": pl.Int64,
            "s": pl.String,
            "t": pl.String,
            "j": pl.String,
            "d": pl.Date,
            "z": pl.Datetime("us", "America/Bogota"),
            "none": pl.Null,
        },
    )


def test_binary_copy_stores_what_csv_copy_stores(postgres_url: str) -> None:
    """A frame COPYed in PostgreSQL's binary form (what a run that reads through connectorx writes) leaves
    exactly the rows its CSV form leaves: hostile text, JSON text, NULLs, an all-NULL column, dates before
    1900, datetimes of another zone to the microsecond, big integers — in a session whose zone is not UTC."""
    frame = copy_guard_frame(3000)
    assert "pyarrow" in sys.modules and store.binary_columns(COPIED, frame) is not None  # the binary form is taken
    engine = schema.make_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("SET TIME ZONE 'Asia/Kolkata'"))
            COPIED.create(conn)
            conn.execute(text("CREATE TABLE copy_guard_csv (LIKE copy_guard)"))
            store.copy_frame(conn, COPIED, frame)
            store._copy_csv(conn, '"copy_guard_csv"', frame)
            columns = "k, s, t, j::text, d, z, none"
            binary = conn.execute(text(f"SELECT {columns} FROM copy_guard ORDER BY k, s, t, z")).all()
            csv = conn.execute(text(f"SELECT {columns} FROM copy_guard_csv ORDER BY k, s, t, z")).all()
            assert len(binary) == len(csv) == frame.height
            assert binary == csv
            stored = conn.execute(text("SELECT z FROM copy_guard WHERE z IS NOT NULL ORDER BY k LIMIT 1")).scalar()
            assert stored.utcoffset() is not None
    finally:
        engine.dispose()


def test_the_binary_form_is_made_without_arrows_compute_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    """polars converts the columns (widened integers, a zone and unit made UTC microseconds, an all-NULL
    column typed): Arrow's first cast in a process builds its compute registry (time, and 31-38 MB of a
    first run's peak RSS)."""
    import pyarrow
    import pyarrow.compute

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("an Arrow cast")

    monkeypatch.setattr(pyarrow.compute, "cast", refused)
    narrower = pl.col("k").cast(pl.Int32, strict=False), pl.col("z").dt.cast_time_unit("ms")
    frame = copy_guard_frame(50).with_columns(*narrower)
    arrow = store.binary_columns(COPIED, frame)
    assert arrow is not None
    assert [str(t) for t in arrow.schema.types] == [
        "int64", "large_string", "large_string", "large_string", "date32[day]", "timestamp[us, tz=UTC]", "large_string"
    ]  # fmt: skip
    assert arrow.column("z").to_pylist() == frame["z"].to_list()  # the same instants
    assert arrow.column("k").to_pylist() == frame["k"].to_list()
    with pytest.raises(AssertionError, match="an Arrow cast"):
        pyarrow.array([1]).cast(pyarrow.int32())  # what the guard refuses


def test_frames_the_binary_form_cannot_write_exactly_go_as_csv() -> None:
    frame = copy_guard_frame(3)
    assert store.binary_columns(COPIED, frame) is not None
    naive_for_timestamptz = frame.with_columns(pl.col("z").dt.replace_time_zone(None))
    assert store.binary_columns(COPIED, naive_for_timestamptz) is None  # as text: the session's zone
    assert store.binary_columns(COPIED, frame.with_columns(pl.col("z").dt.cast_time_unit("ns"))) is None
    assert store.binary_columns(COPIED, frame.with_columns(pl.col("k").cast(pl.UInt64, strict=False))) is None
    assert store.binary_columns(COPIED, frame.with_columns(pl.col("s").cast(pl.Int64, strict=False))) is None
    assert store.binary_columns(COPIED, frame.with_columns(pl.col("d").cast(pl.String))) is None


@pytest.mark.parametrize("bad", ["x" * 25, "a\x00b"], ids=["too-long", "nul"])
def test_a_value_the_target_refuses_in_binary_form_is_told_as_such(postgres_url: str, bad: str) -> None:
    """The refused-value path (quarantine as INVALID_VALUE) reads the binary COPY's error as the CSV one's."""
    frame = copy_guard_frame(40).with_columns(pl.Series("s", ["fits"] * 39 + [bad]))
    engine = schema.make_engine(postgres_url)
    try:
        with engine.begin() as conn:
            COPIED.create(conn)
        with engine.begin() as conn, pytest.raises(DBAPIError) as refused:
            store.copy_frame(conn, COPIED, frame)
        assert store.is_refused_value(refused.value) and store.refused_column(refused.value) == "s"
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


def ledger_indexes(engine: object) -> dict[str, str]:
    """The ledger's indexes on PostgreSQL, by name: their definitions."""
    with engine.connect() as conn:  # type: ignore[attr-defined]
        found = conn.execute(
            text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'migration' AND tablename = 'ledger'")
        )
        return {row.indexname: row.indexdef for row in found}


def test_an_earlier_releases_ledger_gets_the_ledgers_indexes_and_keeps_its_rows(postgres_url: str) -> None:
    """The ledger carries only the indexes its readers need, BRIN indexes (a bloom filter of run ids, a
    min/max of times): each is written once per ledger row. create_schemas brings the ledger of an earlier
    release (B-trees on the run, on the run and legacy id, on the record) to them, rows kept; a second call
    changes nothing."""
    engine = schema.make_engine(postgres_url)
    try:
        schema.create_schemas(engine, schema.state_metadata)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX migration.ix_ledger_run_bloom")
            conn.exec_driver_sql("DROP INDEX migration.ix_ledger_at")
            conn.exec_driver_sql("CREATE INDEX ix_ledger_record ON migration.ledger (entity, partition_key, legacy_id)")
            conn.exec_driver_sql("CREATE INDEX ix_migration_ledger_run_id ON migration.ledger (run_id)")
            conn.exec_driver_sql("CREATE INDEX ix_ledger_run ON migration.ledger (run_id, legacy_id)")
            row = {"entity": "patients", "partition_key": "HSJ", "action": "inserted", "run_id": "r1"}
            rows = [row | {"legacy_id": i, "target_id": str(i), "at": datetime.now(UTC)} for i in range(5)]
            conn.execute(insert(schema.ledger), rows)
        for _ in range(2):
            schema.create_schemas(engine, schema.state_metadata)
            indexes = ledger_indexes(engine)
            assert set(indexes) == {"ledger_pkey", "ix_ledger_run_bloom", "ix_ledger_at"}
            assert indexes["ix_ledger_run_bloom"].endswith("USING brin (run_id text_bloom_ops)")
            assert indexes["ix_ledger_at"].endswith("USING brin (at)")
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT count(*) FROM migration.ledger WHERE run_id = 'r1'")) == 5
    finally:
        engine.dispose()


def test_a_postgresql_without_bloom_indexes_is_refused_before_anything_is_created(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BRIN bloom indexes came with PostgreSQL 14: an older server is told so, with both versions, before
    any schema or table of the control DB is made (not with the server's error about an unknown operator
    class); the clinical target's tables need none."""
    engine = schema.make_engine(postgres_url)
    try:
        with engine.connect():  # the dialect learns the server's version on the first connection
            pass
        monkeypatch.setattr(engine.dialect, "server_version_info", (13, 16))
        with pytest.raises(RuntimeError, match=r"^PostgreSQL 14 or newer is needed .*this server is 13\.16$"):
            schema.create_schemas(engine, schema.state_metadata)
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM pg_namespace WHERE nspname = 'migration'")) == 0
        schema.create_schemas(engine, schema.target_metadata)  # the clinical tables need no bloom index
    finally:
        engine.dispose()


def test_one_runs_ledger_rows_are_read_through_the_bloom_filter(postgres_url: str) -> None:
    """The readers of one run's rows (a rollback, the retention clean-up) find them through the BRIN bloom
    index, even where runs of other partitions wrote at the same time, and read only the block ranges
    that hold them (and the few a bloom filter takes for them)."""
    engine = schema.make_engine(postgres_url)
    try:
        schema.create_schemas(engine, schema.state_metadata)
        with engine.begin() as conn:
            # 40 runs, two at a time, each of two batches of 2,000 rows, the two runs' batches interleaved (160k
            # rows); run ids as random as Dagster's, so a block range's min/max of them would match most runs
            conn.exec_driver_sql(
                "INSERT INTO migration.ledger (entity, partition_key, legacy_id, target_id, action, content_hash, "
                "run_id, at) SELECT 'encounters', 'P' || mod(b, 2), g, g::text, 'inserted', md5(g::text) || "
                "md5(g::text), 'run-' || md5((div(b, 4) * 2 + mod(b, 2))::text), now() "
                "FROM generate_series(0, 79) AS b, generate_series(b * 2000 + 1, b * 2000 + 2000) AS g"
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE migration.ledger")  # summarizes the block ranges
        with engine.connect() as conn:
            wanted = conn.scalar(text("SELECT run_id FROM migration.ledger WHERE legacy_id = 70001"))
            plan = "\n".join(
                conn.scalars(
                    text(
                        "EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) SELECT id, legacy_id FROM migration.ledger "
                        "WHERE run_id = :run AND entity = 'encounters' ORDER BY id"
                    ),
                    {"run": wanted},
                )
            )
            assert "Bitmap Index Scan on ix_ledger_run_bloom" in plan, plan
            mine = text("SELECT count(*) FROM migration.ledger WHERE run_id = :run")
            assert conn.scalar(mine, {"run": wanted}) == 4000
            blocks = conn.scalar(text("SELECT relpages FROM pg_class WHERE oid = 'migration.ledger'::regclass"))
            read = sum(int(n) for n in re.findall(r"Heap Blocks: (?:exact|lossy)=(\d+)", plan))
            assert 0 < read < blocks / 10, (read, blocks, plan)
    finally:
        engine.dispose()


def test_a_role_that_does_not_own_the_ledger_keeps_its_earlier_indexes_and_says_so(postgres_url: str) -> None:
    """A database role that may create schemas but does not own the ledger cannot replace its indexes:
    create_schemas leaves them, says which, and the run goes on; the owner's next call replaces them."""
    owner = schema.make_engine(postgres_url)
    role = f"not_owner_{uuid.uuid4().hex[:8]}"
    database = make_url(postgres_url).database
    other = None
    try:
        schema.create_schemas(owner, schema.state_metadata)
        with owner.begin() as conn:
            conn.exec_driver_sql("DROP INDEX migration.ix_ledger_run_bloom")
            conn.exec_driver_sql("CREATE INDEX ix_migration_ledger_run_id ON migration.ledger (run_id)")
            conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
            conn.exec_driver_sql(f'GRANT CREATE ON DATABASE "{database}" TO "{role}"')
            conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA migration TO "{role}"')
            conn.exec_driver_sql(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA migration TO "{role}"')
        other = schema.make_engine(make_url(postgres_url).set(username=role).render_as_string(hide_password=False))
        said: list[str] = []
        schema.create_schemas(other, schema.state_metadata, log=said.append)
        assert len(said) == 2 and "ix_migration_ledger_run_id" in said[0] and "ix_ledger_run_bloom" in said[1], said
        assert all("migration.ledger" in line and "does not own" in line for line in said)
        assert set(ledger_indexes(owner)) == {"ledger_pkey", "ix_migration_ledger_run_id", "ix_ledger_at"}
        schema.create_schemas(owner, schema.state_metadata, log=said.append)
        assert set(ledger_indexes(owner)) == {"ledger_pkey", "ix_ledger_run_bloom", "ix_ledger_at"} and len(said) == 2
    finally:
        if other is not None:
            other.dispose()
        with owner.begin() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
            conn.exec_driver_sql(f'DROP ROLE "{role}"')
        owner.dispose()
