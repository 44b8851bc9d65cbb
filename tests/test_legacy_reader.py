"""The legacy reader against real MariaDB: pages read through the index on ``sistema`` (a range of
it, not the whole sistema per page), incremental pages and the source watermark through the index on
``actualizado_en`` — each found by its columns, whatever the legacy host named it."""

from __future__ import annotations

import threading
from datetime import datetime
from itertools import pairwise
from typing import Any

import polars as pl
import pytest
from sqlalchemy import event, func, insert, select, text

from worker import schema, source
from worker.source import LegacyReader, changed_index, latest_update

pytestmark = pytest.mark.integration
LEGACY_NAME = "idx_pacientes_actualizado"  # the names in shared/legacy/clinical_mariadb.sql
SISTEMA_INDEX = "idx_pacientes_sistema"


def _patients(url: str) -> tuple[object, list[dict[str, object]]]:
    engine = schema.make_engine(url)
    schema.legacy_metadata.create_all(engine)
    p = schema.pacientes
    with engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE pacientes RENAME INDEX ix_pacientes_actualizado_en TO {LEGACY_NAME}"))
        conn.execute(text(f"ALTER TABLE pacientes RENAME INDEX ix_pacientes_sistema TO {SISTEMA_INDEX}"))
        conn.execute(insert(schema.sistemas), [{"codigo": "HSJ", "nombre": "H", "activo": 1},
                                               {"codigo": "CLN01", "nombre": "C", "activo": 1}])  # fmt: skip
        rows = []
        for i in range(1, 301):
            sistema = "HSJ" if i % 3 else "CLN01"
            # HSJ's rows change in 2024; one CLN01 row later than all of them; one row never updated
            stamp = None if i == 7 else datetime(2024, 1, 1 + i % 28, 10, 0, 0)
            if i == 300:
                stamp = datetime(2025, 6, 1)
            rows.append({"id": i, "sistema": sistema, "documento": f"D{i}", "nombres": "Ana", "actualizado_en": stamp,
                         "eliminado": 0})  # fmt: skip
        conn.execute(insert(p), rows)
        # a zero date, as the legacy host has them
        conn.execute(text("SET SESSION sql_mode = ''"))
        conn.execute(text("UPDATE pacientes SET actualizado_en = '0000-00-00 00:00:00' WHERE id = 8"))
    return engine, rows


def test_the_index_on_actualizado_en_is_found_by_its_column(mariadb_url: str) -> None:
    engine, _ = _patients(mariadb_url)
    with engine.connect() as conn:
        assert changed_index(conn, schema.pacientes) == LEGACY_NAME
        conn.execute(text(f"ALTER TABLE pacientes DROP INDEX {LEGACY_NAME}"))
        assert changed_index(conn, schema.pacientes) is None


@pytest.mark.parametrize("indexed", [True, False])
def test_the_watermark_is_the_sistemas_own_latest_update(mariadb_url: str, indexed: bool) -> None:
    engine, _ = _patients(mariadb_url)
    p = schema.pacientes
    with engine.connect() as conn:
        if not indexed:
            conn.execute(text(f"ALTER TABLE pacientes DROP INDEX {LEGACY_NAME}"))
        for sistema in ("HSJ", "CLN01", "NONE"):
            expected = conn.scalar(select(func.max(p.c.actualizado_en)).where(p.c.sistema == sistema))
            assert latest_update(conn, p, sistema) == expected
    assert expected is None  # a sistema without rows has no watermark


def _changed(rows: list[dict[str, Any]], since: datetime, sistema: str | None = "HSJ") -> list[int]:
    """The ids of ``rows`` (of ``sistema``; None: any) changed at or after ``since``, in their order (id 8's
    zero date is before any)."""
    return [r["id"] for r in rows if (sistema is None or r["sistema"] == sistema) and r["id"] != 8
            and r["actualizado_en"] is not None and r["actualizado_en"] >= since]  # fmt: skip


def _statements(engine: object) -> list[str]:
    """Every statement ``engine`` sends from now on (SQLAlchemy's event), with its parameters inlined."""
    sent: list[str] = []

    def before(conn: object, cursor: object, statement: str, parameters: object, *args: object) -> None:
        sent.append(cursor.mogrify(statement, parameters))  # type: ignore[attr-defined]  # PyMySQL's own quoting

    event.listen(engine, "before_cursor_execute", before)
    return sent


@pytest.mark.parametrize("page", [4, 1000])
def test_incremental_pages_hold_exactly_the_changed_rows_in_id_order(mariadb_url: str, page: int) -> None:
    """Few rows changed: their ids are listed from the index on actualizado_en alone (of every sistema),
    and each page reads its own rows by id along the primary key — a changed row is read once."""
    engine, rows = _patients(mariadb_url)
    since = datetime(2024, 1, 20)
    changed, expected = _changed(rows, since, None), _changed(rows, since)
    sent = _statements(engine)
    reader = LegacyReader(engine, "patients", "HSJ", page)
    read = [int(i) for frame, _ in reader.pages(-1, since) for i in frame["id"]]
    assert read == expected and len(expected) > 8
    assert reader.changed_ids == changed and reader.changed_index is None
    listing = [statement for statement in sent if statement.startswith("SELECT pacientes.id \nFROM")]
    assert len(listing) == 1 and LEGACY_NAME in listing[0]
    assert "Using index" in _explain(engine, listing[0])  # the index alone: no row is read to list them
    pages = [statement for statement in sent if "pacientes.id IN (" in statement]
    assert len(pages) == -(-len(changed) // page)
    for statement in pages:
        plan = _explain(engine, statement)
        assert "'range', 'PRIMARY'" in plan, plan


def test_a_page_of_other_sistemas_rows_alone_does_not_end_the_read(mariadb_url: str) -> None:
    """Listed ids are of every sistema: a page of them may hold none of the sistema's rows, and the
    sistema's changed rows after it are still read."""
    engine, rows = _patients(mariadb_url)
    _otro(engine)
    late = {"id": 2_500, "sistema": "HSJ", "documento": "D2500", "actualizado_en": datetime(2024, 6, 1), "eliminado": 1}
    with engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text("UPDATE pacientes SET actualizado_en = '2024-06-01' WHERE id BETWEEN 1001 AND 1012"))
        conn.execute(insert(schema.pacientes), [late])
    since = datetime(2024, 1, 20)
    expected = _changed([*rows, late], since)
    reader = LegacyReader(engine, "patients", "HSJ", 5)
    read = [int(i) for frame, _ in reader.pages(-1, since) for i in frame["id"]]
    assert reader.changed_ids is not None and {1001, 2_500} <= set(reader.changed_ids)
    assert read == expected and read[-1] == 2_500  # soft-deleted: an incremental run reads it, to delete


def test_many_changes_elsewhere_are_counted_and_the_sistemas_few_read_through_the_index(mariadb_url: str) -> None:
    """More changed rows of every sistema than pages of ids to list: the sistema's own are counted, and
    few as they are, read through the index on actualizado_en."""
    engine, rows = _patients(mariadb_url)
    _otro(engine)
    with engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text("UPDATE pacientes SET actualizado_en = '2024-06-01' WHERE sistema = 'OTRO'"))
    since = datetime(2024, 1, 20)
    reader = LegacyReader(engine, "patients", "HSJ", 4)  # 1,000 OTRO rows changed > 25 pages of 4
    read = [int(i) for frame, _ in reader.pages(-1, since) for i in frame["id"]]
    expected = _changed(rows, since)
    assert read == expected and len(expected) <= 25 * 4
    assert reader.changed_ids is None and reader.changed_index == LEGACY_NAME
    assert LEGACY_NAME in _plan(engine, reader, since)


def test_no_more_ids_than_max_listed_ids_are_listed(mariadb_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing is bounded in memory whatever the pages: past MAX_LISTED_IDS changed rows, they are counted."""
    engine, rows = _patients(mariadb_url)
    monkeypatch.setattr(source, "MAX_LISTED_IDS", 10)
    since = datetime(2024, 1, 20)
    reader = LegacyReader(engine, "patients", "HSJ", 1000)
    read = [int(i) for frame, _ in reader.pages(-1, since) for i in frame["id"]]
    expected = _changed(rows, since)
    assert read == expected and len(expected) > 10
    assert reader.changed_ids is None and reader.changed_index == LEGACY_NAME


def test_many_changed_rows_are_read_in_id_order_without_the_index(mariadb_url: str) -> None:
    engine, rows = _patients(mariadb_url)
    reader = LegacyReader(engine, "patients", "HSJ", 2)  # 200 changed HSJ rows > 25 pages of 2
    since = datetime(2000, 1, 1)
    read = [int(i) for frame, _ in reader.pages(-1, since) for i in frame["id"]]
    assert read == [r["id"] for r in rows if r["sistema"] == "HSJ" and r["id"] not in (7, 8)]
    assert reader.changed_ids is None and reader.changed_index is None


@pytest.mark.parametrize(
    ("sistema", "sistema_index", "index"),
    [
        ("CLN01", True, SISTEMA_INDEX),  # 100 of 1,300 rows: a range of the sistema index
        ("OTRO", True, "PRIMARY"),  # 1,000 of 1,300: the primary key, walked in order and filtered
        ("CLN01", False, "PRIMARY"),  # no index on sistema alone
    ],
)
def test_full_pages_are_ranges_of_the_sistema_index_or_the_primary_key(
    mariadb_url: str, sistema: str, sistema_index: bool, index: str
) -> None:
    engine, rows = _patients(mariadb_url)
    others = _otro(engine)
    with engine.begin() as conn:
        if not sistema_index:
            conn.execute(text(f"ALTER TABLE pacientes DROP INDEX {SISTEMA_INDEX}"))
    reader = LegacyReader(engine, "patients", sistema, 7)
    read = [int(i) for frame, _ in reader.pages(-1) for i in frame["id"]]
    assert read == [r["id"] for r in [*rows, *others] if r["sistema"] == sistema]
    assert reader.page_index == index
    plan = _plan(engine, reader, None, after=150)
    # a range scan of that index (by the default plan MariaDB reads the sistema by `ref` and filters ids)
    assert f"'range', '{index}'" in plan, plan


@pytest.mark.parametrize(("sistema", "index"), [("OTRO", "PRIMARY"), ("CLN01", SISTEMA_INDEX)])
def test_the_eligible_ids_are_read_along_the_index_the_pages_are(
    mariadb_url: str, monkeypatch: pytest.MonkeyPatch, sistema: str, index: str
) -> None:
    """The mass-delete guard's read of every eligible id: exactly the sistema's rows that are not
    soft-deleted, after ``after``; read along the primary key for a sistema of most of the table (left
    to itself, MariaDB reads it by the sistema's index and looks every row up for ``eliminado``)."""
    engine, rows = _patients(mariadb_url)
    others = _otro(engine)  # OTRO: 1,000 of 1,300 rows; CLN01: 100
    with engine.begin() as conn:
        conn.execute(text("UPDATE pacientes SET eliminado = 1 WHERE MOD(id, 5) = 0"))
    queries: list[str] = []
    frame = LegacyReader.frame

    def seen(self: LegacyReader, query: object, *args: object) -> pl.DataFrame:
        queries.append(_sql(engine, query))
        return frame(self, query, *args)

    monkeypatch.setattr(LegacyReader, "frame", seen)
    with engine.connect() as conn:  # type: ignore[attr-defined]
        ids = LegacyReader(engine, "patients", sistema, None).eligible_ids(150, conn)["id"].to_list()
    plan = _explain(engine, queries[-1])
    expected = [r["id"] for r in [*rows, *others] if r["sistema"] == sistema and r["id"] > 150 and r["id"] % 5]
    assert sorted(ids) == expected
    assert f"'{index}'" in plan and "'ref'" not in plan, plan


def test_the_sistema_share_is_estimated_without_reading_the_rows(mariadb_url: str) -> None:
    """The share is MariaDB's estimate (InnoDB caps an index range at half the table): a sistema of
    a quarter of the table or more is paged by the primary key."""
    engine, _ = _patients(mariadb_url)
    with engine.connect() as conn:
        shares = {s: source._share(conn, schema.pacientes, s, SISTEMA_INDEX) for s in ("HSJ", "CLN01", "NONE")}
        assert 0.25 <= shares["CLN01"] < shares["HSJ"] <= 0.75 and shares["NONE"] < 0.05, shares
        assert source.page_index(conn, schema.pacientes, "NONE") == SISTEMA_INDEX
        assert source.page_index(conn, schema.pacientes, "HSJ") == "PRIMARY"


def _plan(engine: object, reader: LegacyReader, since: datetime | None, after: int = -1) -> str:
    return _explain(engine, _sql(engine, reader._query(after, since)))


def _sql(engine: object, query: object) -> str:
    return str(query.compile(engine, compile_kwargs={"literal_binds": True}))  # type: ignore[attr-defined]


def _explain(engine: object, sql: str) -> str:
    """MariaDB's plan of ``sql``, its rows in one line, quoted with ' only."""
    with engine.connect() as conn:  # type: ignore[attr-defined]
        return " ".join(str(row) for row in conn.exec_driver_sql("EXPLAIN " + sql).all()).replace('"', "'")


def _otro(engine: object) -> list[dict[str, object]]:
    """1,000 rows of a third sistema, OTRO (ids 1,001–2,000), beside _patients' 300."""
    others = [{"id": i, "sistema": "OTRO", "documento": f"O{i}", "eliminado": 0} for i in range(1_001, 2_001)]
    with engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(insert(schema.sistemas), [{"codigo": "OTRO", "nombre": "O", "activo": 1}])
        conn.execute(insert(schema.pacientes), others)
    return others


def test_pages_sized_by_memory_hold_every_row_once_in_id_order(mariadb_url: str, monkeypatch) -> None:
    """Without a batch size, each page has as many rows as make PAGE_BYTES of the page before:
    narrow rows make long pages, wide ones (long names) short ones, and no row is read twice or lost."""
    engine, rows = _patients(mariadb_url)
    with engine.begin() as conn:  # the rows from id 150 on are wide: every text column full
        conn.execute(
            text(
                "UPDATE pacientes SET nombres = REPEAT('x', 120), apellidos = REPEAT('y', 120),"
                " email = REPEAT('e', 255), telefono = REPEAT('5', 40) WHERE id >= 150"
            )
        )
    monkeypatch.setattr(source, "MIGRATION_PAGES", source.PageBudget(bytes=6_000, min_rows=3, max_rows=60))
    reader = LegacyReader(engine, "patients", "HSJ", None)
    pages = [frame for frame, _ in reader.pages(-1)]
    read = [int(i) for frame in pages for i in frame["id"]]
    assert read == [r["id"] for r in rows if r["sistema"] == "HSJ"]
    sizes = [frame.height for frame in pages]
    assert sizes[0] == 3  # nothing known yet: the smallest page
    for before, page in pairwise(pages[:-1]):  # the last page may be short
        assert page.height == source.next_page_rows(before)
    assert max(sizes) == 60 and sizes[-2] <= 12, sizes  # narrow rows: the longest pages; wide: short ones


def test_a_page_sized_by_memory_keeps_within_its_bounds() -> None:
    narrow = pl.DataFrame({"id": range(1000), "name": ["Ana"] * 1000})
    wide = pl.DataFrame({"id": range(1000), "name": ["x" * 5000] * 1000})
    rows = source.next_page_rows(narrow)
    assert rows == min(source.MAX_PAGE_ROWS, int(source.PAGE_BYTES / (narrow.estimated_size() / 1000)))
    assert source.MIN_PAGE_ROWS < rows <= source.MAX_PAGE_ROWS
    assert source.next_page_rows(wide) == source.MIN_PAGE_ROWS  # 5 kB rows: never fewer than the minimum
    assert source.next_page_rows(narrow.clear()) == source.MIN_PAGE_ROWS
    assert source.next_page_rows(pl.DataFrame({"id": [1]})) == source.MAX_PAGE_ROWS


def test_few_changed_rows_are_read_through_the_driver_into_the_same_frames(mariadb_url: str, monkeypatch) -> None:
    """An incremental run with few changed rows reads them through its SQLAlchemy driver (no pyarrow to
    import): the pages are the very frames connectorx gives — values, NULLs, zero dates and types."""
    engine, _ = _patients(mariadb_url)
    with engine.begin() as conn:  # every kind of column filled for some rows
        conn.execute(
            text(
                "UPDATE pacientes SET apellidos = 'Gómez 😀', fecha_nacimiento = '31/02/2001', sexo = 'F',"
                " email = 'a@b.co', telefono = '+57 300', profesional_id = 9, tipo_documento = 'CC',"
                " creado_en = '2020-05-06 07:08:09', eliminado = 1 WHERE MOD(id, 4) = 1"
            )
        )
    since = datetime(2024, 1, 20)
    light = LegacyReader(engine, "patients", "HSJ", 4)
    pages = [frame for frame, _ in light.pages(-1, since)]
    assert light.by_driver
    monkeypatch.setattr(source, "DRIVER_ROWS", -1)
    arrow = LegacyReader(engine, "patients", "HSJ", 4)
    expected = [frame for frame, _ in arrow.pages(-1, since)]
    assert not arrow.by_driver
    assert len(pages) == len(expected) > 2
    for got, want in zip(pages, expected, strict=True):
        assert got.schema == want.schema and got.equals(want)


def test_the_pages_of_a_run_that_changes_nothing_are_twice_as_long(mariadb_url: str, monkeypatch) -> None:
    """While the consumer says its pages change nothing (``quiet``), pages sized by memory are twice
    as long as the budget makes them, up to its longest; every row is still read once, in id order."""
    engine, rows = _patients(mariadb_url)
    monkeypatch.setattr(source, "MIGRATION_PAGES", source.PageBudget(bytes=2_000, min_rows=3, max_rows=60))
    quiet = threading.Event()
    quiet.set()
    pages = [frame for frame, _ in LegacyReader(engine, "patients", "HSJ", None).pages(-1, quiet=quiet)]
    assert [int(i) for frame in pages for i in frame["id"]] == [r["id"] for r in rows if r["sistema"] == "HSJ"]
    sizes = [frame.height for frame in pages]
    for before, page in pairwise(pages[:-1]):
        assert page.height == min(60, 2 * source.next_page_rows(before)) > source.next_page_rows(before), sizes


@pytest.mark.parametrize("writers", [1, 2, 3])
def test_a_short_list_of_changed_ids_is_read_in_a_page_for_each_writer(mariadb_url: str, writers: int) -> None:
    """Pages sized by memory, few changed rows: the listed ids are read in as many pages as the consumer
    has writers (each page a batch, all written at once), not in a first short page and a long one; one
    writer reads them as before (a first page of MIN_PAGE_ROWS, here all of them)."""
    engine, rows = _patients(mariadb_url)
    since = datetime(2024, 1, 20)
    changed, expected = _changed(rows, since, None), _changed(rows, since)
    sent = _statements(engine)
    reader = LegacyReader(engine, "patients", "HSJ", None, writers=writers)
    read = [int(i) for frame, _ in reader.pages(-1, since) for i in frame["id"]]
    assert read == expected and len(changed) > writers * 10
    pages = [statement for statement in sent if "pacientes.id IN (" in statement]
    assert len(pages) == writers


def test_memory_still_bounds_the_pages_of_a_list_shared_by_writers(mariadb_url: str, monkeypatch) -> None:
    """A page for each writer, unless memory makes pages shorter: then pages sized by memory, as many as
    it takes."""
    engine, rows = _patients(mariadb_url)
    monkeypatch.setattr(source, "MIGRATION_PAGES", source.PageBudget(bytes=1_500, min_rows=10, max_rows=60))
    since = datetime(2024, 1, 20)
    reader = LegacyReader(engine, "patients", "HSJ", None, writers=2)
    pages = [frame for frame, _ in reader.pages(-1, since)]
    assert [int(i) for frame in pages for i in frame["id"]] == _changed(rows, since)
    assert reader.changed_ids is not None and reader.listed_page == -(-len(reader.changed_ids) // 2)
    assert len(pages) > 2  # two pages of listed ids would each hold more than a page by memory
