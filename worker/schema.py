"""Tables: the legacy clinical source (read only), the clinical target, the migration control DB.

The legacy tables mirror shared/legacy/clinical_mariadb.sql column for column; the project only
reads them, except the demo/test generator, which creates them where no legacy system exists.
On SQLite the ``clinical`` and ``migration`` schemas are mapped onto the one database file.
"""

from __future__ import annotations

import functools
import ssl
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Date,
    DateTime,
    Dialect,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import TypeDecorator, TypeEngine

from worker import rules, store


class LegacyDateTime(TypeDecorator[Any]):
    """A legacy DATETIME handed back raw: rules.coerce_datetime reads zero dates and text."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        # SQLite keeps DATETIME as text; reading it raw keeps MariaDB's zero dates readable.
        return dialect.type_descriptor(String(26) if dialect.name == "sqlite" else DateTime())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if dialect.name == "sqlite" and value is not None and not isinstance(value, str):
            return value.isoformat(sep=" ")
        return value


legacy_metadata = MetaData()

sistemas = Table(
    "sistemas",
    legacy_metadata,
    Column("codigo", String(16), primary_key=True),
    Column("nombre", String(120), nullable=False),
    Column("activo", Integer, nullable=False, default=1),
    mysql_charset="utf8mb4",
)

profesionales = Table(
    "profesionales",
    legacy_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("sistema", String(16), nullable=False),
    Column("nombre", String(120), nullable=False),
    Column("registro", String(32)),
    mysql_charset="utf8mb4",
)

pacientes = Table(
    "pacientes",
    legacy_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sistema", String(16), nullable=False, index=True),
    Column("documento", String(32)),
    Column("tipo_documento", String(8)),
    Column("nombres", String(120)),
    Column("apellidos", String(120)),
    Column("fecha_nacimiento", String(20)),
    Column("sexo", String(1)),
    Column("email", String(255)),
    Column("telefono", String(40)),
    Column("profesional_id", Integer),
    Column("creado_en", LegacyDateTime),
    Column("actualizado_en", LegacyDateTime, index=True),
    Column("eliminado", Integer, nullable=False, default=0),
    mysql_charset="utf8mb4",
)

atenciones = Table(
    "atenciones",
    legacy_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sistema", String(16), nullable=False, index=True),
    Column("paciente_id", Integer, index=True),
    Column("profesional_id", Integer),
    Column("fecha", LegacyDateTime),
    Column("tipo", String(20)),
    Column("diagnostico", String(10)),
    Column("notas", Text),
    Column("estado", String(12)),
    Column("actualizado_en", LegacyDateTime, index=True),
    Column("eliminado", Integer, nullable=False, default=0),
    mysql_charset="utf8mb4",
)

target_metadata = MetaData()
_P, _E = rules.PATIENT_WIDTHS, rules.ENCOUNTER_WIDTHS  # the §6 rules refuse what these cannot hold
_id = BigInteger().with_variant(Integer, "sqlite")  # SQLite only auto-increments INTEGER keys

patients = Table(
    "patients",
    target_metadata,
    Column("id", _id, primary_key=True, autoincrement=True),
    Column("sistema", String(_P["sistema"]), nullable=False),
    Column("legacy_id", BigInteger, nullable=False),
    Column("national_id", String(_P["national_id"]), nullable=False),
    Column("document_type", String(_P["document_type"])),
    Column("given_name", String(_P["given_name"])),
    Column("family_name", String(_P["family_name"])),
    Column("birth_date", Date),
    Column("sex", String(_P["sex"]), nullable=False),
    Column("email", String(_P["email"])),
    Column("phone", String(_P["phone"])),
    Column("practitioner_id", BigInteger),
    Column("source_updated_at", DateTime(timezone=True)),
    Column("content_hash", String(64), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("migrated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("sistema", "legacy_id", name="uq_patients_legacy"),
    # Deferred on PostgreSQL so two patients may swap documents inside one batch.
    UniqueConstraint(
        "sistema", "national_id", name="uq_patients_national_id", deferrable=True, initially="DEFERRED"
    ).ddl_if(dialect="postgresql"),
    Index("uq_patients_national_id_sqlite", "sistema", "national_id", unique=True).ddl_if(dialect="sqlite"),
    schema="clinical",
)

encounters = Table(
    "encounters",
    target_metadata,
    Column("id", _id, primary_key=True, autoincrement=True),
    Column("sistema", String(_E["sistema"]), nullable=False),
    Column("legacy_id", BigInteger, nullable=False),
    Column("patient_id", BigInteger, nullable=False, index=True),
    Column("practitioner_id", BigInteger),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("kind", String(_E["kind"]), nullable=False),
    Column("icd10", String(_E["icd10"])),
    Column("notes", Text),
    Column("status", String(_E["status"]), nullable=False),
    Column("source_updated_at", DateTime(timezone=True)),
    Column("content_hash", String(64), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("migrated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("sistema", "legacy_id", name="uq_encounters_legacy"),
    schema="clinical",
)

SOURCES: dict[str, Table] = {"patients": pacientes, "encounters": atenciones}  # each clinical entity's legacy table
TARGETS = {"patients": patients, "encounters": encounters}
# Target columns the worker writes from the rules; the rest are bookkeeping.
BOOKKEEPING = ("id", "content_hash", "run_id", "migrated_at")

state_metadata = MetaData()

quarantine = Table(
    "quarantine",
    state_metadata,
    Column("id", _id, primary_key=True, autoincrement=True),
    Column("entity", String(32), nullable=False),
    Column("partition_key", String(64), nullable=False),
    Column("legacy_id", BigInteger, nullable=False),
    Column("reason", String(32), nullable=False),
    Column("detail", String(255), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("entity", "partition_key", "legacy_id", name="uq_quarantine_record"),
    schema="migration",
)

ledger = Table(
    "ledger",
    state_metadata,
    Column("id", _id, primary_key=True, autoincrement=True),
    Column("entity", String(32), nullable=False),
    Column("partition_key", String(64), nullable=False),
    Column("legacy_id", BigInteger, nullable=False),
    Column("target_id", String(128)),
    Column("action", String(16), nullable=False),
    Column("content_hash", String(64)),
    Column("previous", JSON),
    Column("run_id", String(64), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    # Only what the ledger's readers need, and BRIN indexes: every index is written once per ledger row, and
    # a first run writes a row per record. The ledger is appended to in time order, a run's rows together
    # (a batch's rows are one COPY), so a BRIN index finds them, and costs next to nothing to keep: a row
    # appended to the table's end changes no index page until VACUUM summarizes its block range.
    # - A rollback, the retention clean-up and an app run settling a killed run's rows read one run's rows:
    #   a bloom filter of each block range's run ids, since runs of other partitions write at the same time
    #   (a min/max range of several run ids would match most runs). A B-tree on (run_id, legacy_id) took
    #   a third of PostgreSQL's time for a first run's ledger rows: 600k of them INSERTed in 2.6–2.7 s
    #   against 1.6–1.7 s with the bloom filter, the other indexes alike; a run's 20k rows among 1.2M are
    #   read in 13 ms against 11 ms.
    # - A rollback's search for the children's later runs reads by time.
    Index("ix_ledger_run_bloom", "run_id", postgresql_using="brin", postgresql_ops={"run_id": "text_bloom_ops"}),
    Index("ix_ledger_at", "at", postgresql_using="brin"),
    schema="migration",
)
# Indexes of earlier releases that create_schemas drops where it finds them, by table.
RETIRED_INDEXES: dict[str, tuple[str, ...]] = {
    "ledger": ("ix_ledger_record", "ix_migration_ledger_run_id", "ix_ledger_run")
}
# What the control tables need of PostgreSQL (the ledger's BRIN bloom index); the target's need less.
POSTGRESQL_MIN = (14,)

checkpoints = Table(
    "checkpoints",
    state_metadata,
    Column("entity", String(32), primary_key=True),
    Column("partition_key", String(64), primary_key=True),
    Column("run_id", String(64), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("parameters", JSON, nullable=False),
    Column("last_legacy_id", BigInteger, nullable=False),
    Column("counts", JSON, nullable=False),
    Column("watermark", DateTime(timezone=True)),
    Column("status", String(16), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    schema="migration",
)

runs = Table(
    "runs",
    state_metadata,
    Column("run_id", String(64), primary_key=True),
    Column("entity", String(32), primary_key=True),
    Column("partition_key", String(64), primary_key=True),
    Column("usuario", String(64), nullable=False),
    Column("parameters", JSON, nullable=False),
    Column("mode", String(16), nullable=False),
    Column("dry_run", Boolean, nullable=False),
    Column("status", String(16), nullable=False),
    Column("resumed_from", String(64)),
    Column("watermark", DateTime(timezone=True)),
    Column("counts", JSON),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    schema="migration",
)

# The app path's control tables (not created on the clinical worker's target).
app_state_metadata = MetaData()

app_shards_written = Table(
    "app_shards_written",
    app_state_metadata,
    # A run may have written documents of this entity and shard to this Firestore database; recorded
    # before its first write. A shard without a row is taken to be empty: its run skips the count and
    # writes with an exists=false precondition, which finds out if the control DB was wrong (runs of the
    # shard on record with no database recorded: a release that kept no such record wrote it).
    Column("database", String(255), primary_key=True),
    Column("entity", String(32), primary_key=True),
    Column("partition_key", String(64), primary_key=True),
    Column("run_id", String(64), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    schema="migration",
)


_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()  # every engine make_engine made, while it lives


def dispose_engines() -> None:
    """Close the pooled connections of every engine :func:`make_engine` made that is still alive:
    each server is told goodbye, as a process that is about to end should."""
    for engine in list(_ENGINES):
        engine.dispose()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine that never puts bound values (patient data) into exception messages."""
    if make_url(url).get_driver_name() == "psycopg":
        # Never switch to server-side generic plans: a range or IN list planned without its
        # values can turn every batch's index lookup into a scan of a growing table.
        kwargs.setdefault("connect_args", {}).setdefault("prepare_threshold", None)
    engine = create_engine(url, hide_parameters=True, pool_pre_ping=True, **kwargs)
    _ENGINES.add(engine)
    if engine.dialect.driver == "pymysql":
        event.listen(engine, "do_connect", _connect_pymysql)
    if engine.dialect.name == "sqlite":
        engine = engine.execution_options(schema_translate_map={"clinical": None, "migration": None})
    return engine


@functools.cache
def preferred_tls_context() -> ssl.SSLContext:
    """The TLS context of PyMySQL's *preferred* mode (no TLS option given: TLS when the server offers it,
    its certificate not verified), made once per process. PyMySQL makes it again for every connection,
    and loads the system's CA certificates into each (~20 ms, e.g. 3–5 connections of an incremental
    run) for a context that never verifies a certificate; this one has the same settings, no CA store."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT  # as PyMySQL: MySQL's self-signed certificates fail it
    return context


def _connect_pymysql(dialect: Dialect, record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]) -> Any:
    """SQLAlchemy's ``do_connect``: a PyMySQL connection whose preferred-mode TLS context is the shared one.
    Given TLS options (``ssl``, ``ssl_ca``, … in the URL or ``connect_args``), PyMySQL makes its own, as before."""
    return _shared_tls_connection_class()(*cargs, **cparams)


@functools.cache
def _shared_tls_connection_class() -> type:
    import pymysql  # only where a MariaDB/MySQL URL names it

    class SharedPreferredTLS(pymysql.connections.Connection):
        def _create_ssl_ctx(self, sslp: Any) -> ssl.SSLContext:
            if isinstance(sslp, dict) and not sslp:  # preferred mode: PyMySQL asks with no option
                return preferred_tls_context()
            return super()._create_ssl_ctx(sslp)  # type: ignore[no-any-return]

    return SharedPreferredTLS


def state_engine(secrets: Mapping[str, Any], target: Engine) -> Engine:
    """The control DB a command was given (``state_db_url``), or ``target`` when it is the same or none."""
    url = secrets.get("state_db_url")
    return make_engine(url) if url and url != secrets.get("target_db_url") else target


def has_table(bind: Engine, table: Table) -> bool:
    """Whether ``table`` exists (on SQLite, the demo's, its schema is mapped onto the one file)."""
    if bind.dialect.name == "sqlite":
        return inspect(bind).has_table(table.name)
    return inspect(bind).has_table(table.name, schema=table.schema)


def unique_within(bind: Engine | Connection, table: Table, columns: tuple[str, ...]) -> bool:
    """Whether PostgreSQL holds ``columns`` of ``table`` unique now: a valid unique index, not partial
    and on plain columns, whose key is some of ``columns``. Asked of the catalog, not of this module's
    metadata (an index dropped on the server is not there). Other databases: False (not asked)."""
    if bind.dialect.name != "postgresql":
        return False
    found = text(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = :schema AND c.relname = :table AND i.indisunique AND i.indisvalid AND i.indisready "
        "AND i.indpred IS NULL AND i.indexprs IS NULL AND i.indnkeyatts > 0 "
        "AND (SELECT bool_and(a.attname = ANY(CAST(:columns AS text[]))) FROM pg_attribute a "
        "WHERE a.attrelid = c.oid AND a.attnum = ANY((i.indkey::int2[])[0:i.indnkeyatts - 1])))"
    )
    params = {"schema": table.schema or "public", "table": table.name, "columns": list(columns)}
    if isinstance(bind, Connection):
        return bool(bind.execute(found, params).scalar())
    with bind.connect() as conn:
        return bool(conn.execute(found, params).scalar())


def create_schemas(engine: Engine, *metadatas: MetaData, log: Callable[[str], None] = lambda _: None) -> None:
    """Create the named schemas (PostgreSQL) and any missing table; existing ones are kept, their indexes
    brought to these tables' (``log`` says so where this role may not change them)."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            version = conn.dialect.server_version_info or ()
            if version < POSTGRESQL_MIN and any(ledger in m.tables.values() for m in metadatas):
                raise RuntimeError(
                    f"PostgreSQL {'.'.join(map(str, POSTGRESQL_MIN))} or newer is needed (the ledger's index by run is "
                    f"a BRIN bloom index); this server is {'.'.join(map(str, version))}"
                )
            # Two workers starting at once must not race on CREATE: one waits for the other.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
            for schema in sorted({t.schema for m in metadatas for t in m.tables.values() if t.schema}):
                conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        for metadata in metadatas:
            metadata.create_all(conn, checkfirst=True)
        if engine.dialect.name == "postgresql":
            changed = [t for m in metadatas for t in m.tables.values() if t.name in RETIRED_INDEXES]
            if changed:
                _upgrade_indexes(conn, changed, log)


def _upgrade_indexes(conn: Connection, tables: list[Table], log: Callable[[str], None]) -> None:
    """The tables whose indexes changed since an earlier release (``RETIRED_INDEXES``) brought to theirs:
    the retired ones dropped, missing ones built (once; one catalog query when nothing is to do). Under
    create_schemas' lock. A role that does not own a table may not change its indexes: the runs work with
    those it has (the old ones cost only speed), and ``log`` says which index is left as it is."""
    found = conn.execute(
        text("SELECT schemaname, tablename, indexname FROM pg_indexes WHERE tablename = ANY(:tables)"),
        {"tables": sorted({t.name for t in tables})},
    )
    existing = {(row.schemaname, row.tablename, row.indexname) for row in found}
    for table in tables:
        where = (table.schema or "public", table.name)
        steps: list[tuple[str, Callable[[], Any]]] = [
            (name, functools.partial(conn.exec_driver_sql, f'DROP INDEX "{where[0]}"."{name}"'))
            for name in RETIRED_INDEXES[table.name]
            if (*where, name) in existing
        ]
        steps += [
            (str(index.name), functools.partial(index.create, conn))
            for index in sorted(table.indexes, key=lambda i: str(i.name))
            if (*where, str(index.name)) not in existing
        ]
        for name, step in steps:
            try:
                with store.savepoint(conn):
                    step()
            except DBAPIError as problem:
                if not store.is_not_owner(problem):
                    raise
                log(f"index {name} of {where[0]}.{table.name} left as an earlier release made it: this database "
                    "role does not own the table (runs work; its owner's next run replaces it)")  # fmt: skip
