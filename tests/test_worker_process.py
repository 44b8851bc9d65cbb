"""worker/launch.py: how ``clinic-migrate``'s process starts (its allocators' arenas capped before polars
loads) and ends (connections closed and output flushed, then no interpreter teardown)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from worker import schema
from worker.launch import POLARS_ALLOCATOR_SETTINGS, limit_malloc_arenas

from .conftest import WORKER_COMMAND


def test_the_worker_caps_its_allocators_arenas_before_polars_loads() -> None:
    """RSS stays flat over a partition only with few malloc arenas (worker/launch.py): glibc's cap is
    taken (mallopt says so), and polars' jemalloc runs with one arena — asked of jemalloc itself, in a
    fresh process, whatever a parent that loaded polars passed on — unless the environment names a
    number of arenas or polars is already loaded. The worker's
    executable goes through that set-up."""
    assert limit_malloc_arenas() is (platform.libc_ver()[0] == "glibc")
    probe = (
        "import os; from worker.launch import POLARS_ALLOCATOR_SETTINGS as S, limit_polars_arenas as limit; "
        "took = limit(); os.environ[S] += ',stats_print:true'; import polars as pl; pl.DataFrame({'a': [1]}).sum(); "
        "assert not limit(); print(took)"
    )
    clean = {k: v for k, v in os.environ.items() if k != POLARS_ALLOCATOR_SETTINGS}
    inherited = "dirty_decay_ms:500,muzzy_decay_ms:1000"  # what a parent that loaded polars passes on
    for chosen, took, arenas in ((None, True, 1), (inherited, True, 1), (f"{inherited},narenas:3", False, 3)):
        env = clean if chosen is None else {**clean, POLARS_ALLOCATOR_SETTINGS: chosen}
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == str(took)
        assert f"opt.narenas: {arenas}\n" in done.stderr
    assert "from worker.launch import main" in Path(WORKER_COMMAND).read_text()


def test_leaving_flushes_what_was_written_and_keeps_the_exit_code() -> None:
    """``leave`` skips the interpreter's teardown, which would have flushed the buffered output: it
    flushes it first (on a pipe, stdout is block-buffered)."""
    probe = "import sys; from worker.launch import leave; print('partial', end=''); sys.stderr.write('err'); leave(3)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (3, "partial", "err")


@pytest.mark.integration
def test_leaving_closes_every_pooled_database_connection(postgres_url: str) -> None:
    """A connection back in its engine's pool is closed when the process leaves — the server is told
    goodbye (no connection dropped mid-session) — and no longer in PostgreSQL's list of backends."""
    name = f"leave-probe-{os.getpid()}"
    probe = (
        "import sys; from sqlalchemy import event, text; from worker import schema; from worker.launch import leave; "
        f"engine = schema.make_engine(sys.argv[1], connect_args={{'application_name': '{name}'}}); "
        "event.listen(engine.pool, 'close', lambda *_: print('closed by the driver')); "
        "conn = engine.connect(); conn.execute(text('SELECT 1')); conn.close(); "
        "print(engine.pool.checkedin(), 'pooled'); leave(0)"
    )
    done = subprocess.run([sys.executable, "-c", probe, postgres_url], capture_output=True, text=True, check=True)
    # Pooled and open when the process left, then closed through the driver (its goodbye sent).
    assert done.stdout.splitlines() == ["1 pooled", "closed by the driver"]
    engine = schema.make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            left = conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"), {"n": name}
            ).scalar()
        assert left == 0
    finally:
        engine.dispose()
