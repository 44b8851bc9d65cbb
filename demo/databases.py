"""Throw-away databases on a MariaDB or PostgreSQL server, for the tests and the benchmarks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

MARIADB_ADMIN = "mysql+pymysql://root@127.0.0.1:3306/mysql"
POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextmanager
def throwaway_database(admin_url: str, prefix: str, *, keep: bool = False) -> Iterator[str]:
    """Create a uniquely named database and yield its URL; drop it afterwards unless ``keep``."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        yield admin.url.set(database=name).render_as_string(hide_password=False)
        if not keep:
            with admin.connect() as conn:
                if admin.dialect.name == "postgresql":
                    conn.execute(
                        text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name}
                    )
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
    finally:
        admin.dispose()
