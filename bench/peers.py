"""The yardsticks bench/clinical.py measures the worker against, in the same run and on the same copy.

- the *floor*: ``mariadb --batch … | psql -c "\\copy … FROM STDIN"`` into a plain table with a primary
  key and the same columns — no transform, no hash, no bookkeeping: what moving the bytes costs;
- the *peer*: Sling (sling-cli from the ``sling-linux-amd64`` wheel), full refresh of the same rows.

Sling is installed by the benchmark into its own venv (``.bench/sling-venv``); it is not a dependency
of the project. Both are timed as whole processes, start-up included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, Integer, Table, text
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from worker.source import Columns


ROOT = Path(__file__).resolve().parent.parent
SLING_VENV = ROOT / ".bench" / "sling-venv"
SLING_PACKAGES = ("sling", "sling-linux-amd64")


@dataclass(frozen=True)
class Timed:
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _columns(entity: str) -> Columns:
    """The worker's legacy columns of ``entity``, imported when first asked for: worker.source loads polars,
    which the benchmark process must not map before it drops the worker's libraries from the page cache
    (bench/pagecache.py)."""
    from worker.source import COLUMNS

    return COLUMNS[entity]


def select_sql(entity: str, sistema: str) -> str:
    """The legacy rows of one sistema, the columns the worker reads, DATETIMEs as text as the worker
    reads them (zero dates cannot be timestamps). Only ``sistema`` filters, as in issue 7's floor."""
    columns = _columns(entity)
    picked = ", ".join(f"CAST({n} AS CHAR) AS {n}" if n in columns.datetimes else n for n in columns.names)
    if not sistema.replace("_", "").isalnum():
        raise ValueError(f"unexpected sistema {sistema!r}")
    return f"SELECT {picked} FROM {columns.table.name} WHERE sistema = '{sistema}'"


def _pg_columns(table: Table, names: tuple[str, ...], datetimes: tuple[str, ...]) -> str:
    parts = []
    for name in names:
        kind = "bigint" if isinstance(table.c[name].type, Integer) and name not in datetimes else "text"
        parts.append(f"{name} {kind}" + (" PRIMARY KEY" if name == "id" else ""))
    return ", ".join(parts)


def _env_with_password(password: str | None, variable: str) -> dict[str, str]:
    env = dict(os.environ)
    if password:
        env[variable] = password
    return env


def floor(legacy_url: str, target: Engine, entity: str, sistema: str, schema_name: str = "bench_floor") -> Timed:
    """``mariadb --batch --skip-column-names --quick -e SELECT … | psql -c "\\copy … FROM STDIN"``,
    into a fresh table with a primary key; timed from the client start to psql's exit."""
    columns = _columns(entity)
    table = f"{schema_name}.{columns.table.name}"
    with target.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema_name}"))
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(text(f"CREATE TABLE {table} ({_pg_columns(columns.table, columns.names, columns.datetimes)})"))
    src = make_url(legacy_url)
    tgt = target.url
    mariadb = ["mariadb", f"--host={src.host or '127.0.0.1'}", f"--port={src.port or 3306}",
               f"--user={src.username}", "--batch", "--skip-column-names", "--quick",
               str(src.database), "-e", select_sql(entity, sistema)]  # fmt: skip
    copy = f"\\copy {table} ({', '.join(columns.names)}) FROM STDIN WITH (FORMAT text, NULL 'NULL')"
    psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", tgt.host or "127.0.0.1", "-p", str(tgt.port or 5432),
            "-U", str(tgt.username), "-d", str(tgt.database), "-c", copy]  # fmt: skip
    started = time.monotonic()
    reader = subprocess.Popen(mariadb, stdout=subprocess.PIPE, env=_env_with_password(src.password, "MYSQL_PWD"))
    writer = subprocess.run(psql, stdin=reader.stdout, capture_output=True, text=True,
                            env=_env_with_password(tgt.password, "PGPASSWORD"), check=False)  # fmt: skip
    assert reader.stdout is not None
    reader.stdout.close()
    if reader.wait() != 0 or writer.returncode != 0:
        raise RuntimeError(f"floor of {entity} failed: {writer.stderr.strip()[-500:]}")
    seconds = time.monotonic() - started
    with target.connect() as conn:
        rows = int(conn.scalar(text(f"SELECT count(*) FROM {table}")) or 0)
    return Timed(rows, seconds)


def sling_binary(log: Callable[[str], None] = print) -> Path:
    """The sling-cli binary of the ``sling-linux-amd64`` wheel in the benchmark's own venv, installed
    there on first use (``python -m venv`` + ``pip install sling sling-linux-amd64``). The binary is
    run directly: the ``sling`` package's launcher would try to download a newer one."""
    python = SLING_VENV / "bin" / "python"
    locate = [str(python), "-c", "import sling_linux_amd64 as s; print(s.SLING_BIN)"]
    found = subprocess.run(locate, capture_output=True, text=True, check=False) if python.exists() else None
    if found is None or found.returncode != 0:
        log(f"installing {' '.join(SLING_PACKAGES)} into {SLING_VENV} (not a project dependency)")
        subprocess.run([sys.executable, "-m", "venv", str(SLING_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SLING_PACKAGES], check=True)
        found = subprocess.run(locate, capture_output=True, text=True, check=True)
    binary = Path(found.stdout.strip())
    if not binary.exists():
        raise RuntimeError(f"sling-linux-amd64 wheel has no binary at {binary}")
    return binary


def sling_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[-1].removeprefix("Version:").strip() if out.strip() else "?"


def sling(
    binary: Path, legacy_url: str, target: Engine, entity: str, sistema: str, schema_name: str = "bench_sling"
) -> Timed:
    """``sling run --mode full-refresh`` of the same SELECT into ``schema_name``; the whole process timed."""
    columns = _columns(entity)
    table = f"{schema_name}.{columns.table.name}"
    with target.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema_name}"))
    src = make_url(legacy_url)
    tgt = target.url
    auth = f"{src.username}" + (f":{src.password}" if src.password else "")
    pg_auth = f"{tgt.username}" + (f":{tgt.password}" if tgt.password else "")
    env = dict(os.environ)
    env |= {
        "BENCH_LEGACY": f"mysql://{auth}@{src.host or '127.0.0.1'}:{src.port or 3306}/{src.database}",
        "BENCH_TARGET": f"postgresql://{pg_auth}@{tgt.host or '127.0.0.1'}:{tgt.port or 5432}/{tgt.database}"
        "?sslmode=disable",
        "SLING_HOME_DIR": str(SLING_VENV.parent / "sling-home"),
        "SLING_DISABLE_TELEMETRY": "true",
        "DISABLE_TELEMETRY": "true",
        "SLING_LOADED_AT_COLUMN": "false",
    }
    argv = [str(binary), "run", "--src-conn", "BENCH_LEGACY", "--src-stream", select_sql(entity, sistema),
            "--tgt-conn", "BENCH_TARGET", "--tgt-object", table, "--mode", "full-refresh"]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"sling {entity} failed: {(done.stdout + done.stderr).strip()[-800:]}")
    with target.connect() as conn:
        rows = int(conn.scalar(text(f"SELECT count(*) FROM {table}")) or 0)
    return Timed(rows, seconds)
