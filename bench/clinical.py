"""Benchmark: N patients and 5·N encounters, MariaDB → PostgreSQL, the worker run over sshd.

    python -m bench.clinical --patients 100000

Creates throw-away databases on the local MariaDB and PostgreSQL, starts a loopback sshd, runs
the worker for patients then encounters, and prints rows/s per entity and the worker's peak
memory (max RSS reported by the worker itself). Not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from demo.databases import MARIADB_ADMIN, POSTGRES_ADMIN, throwaway_database
from demo.legacy_data import generate
from demo.sshd import running_sshd
from resources.ssh import SSHResource
from worker import schema

WORKER = str(Path(sys.executable).with_name("clinic-migrate"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--encounters-per-patient", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--keep", action="store_true", help="keep the databases afterwards")
    args = parser.parse_args()

    tag = uuid.uuid4().hex[:8]
    with (
        throwaway_database(MARIADB_ADMIN, "bench_legacy", keep=args.keep) as legacy_url,
        throwaway_database(POSTGRES_ADMIN, "bench_clinical", keep=args.keep) as target_url,
    ):
        started = time.monotonic()
        generate(
            schema.make_engine(legacy_url),
            patients_per_sistema=args.patients,
            encounters_per_patient=args.encounters_per_patient,
            sistemas=("BENCH",),
            chunk_size=10_000,
        )
        print(f"generated {args.patients} patients in MariaDB in {time.monotonic() - started:.1f} s", flush=True)
        secrets = json.dumps({"legacy_db_url": legacy_url, "target_db_url": target_url}).encode()
        with tempfile.TemporaryDirectory() as home, running_sshd(Path(home)) as server:
            ssh = SSHResource(**server.resource_kwargs())
            print(f"{'entity':<11} {'rows':>9} {'seconds':>8} {'rows/s':>8} {'peak RSS MB':>12}")
            for entity in ("patients", "encounters"):
                argv = [WORKER, "migrate", "--entity", entity, "--sistema", "BENCH", "--usuario", "bench",
                        "--run-id", f"bench-{tag}", "--batch-size", str(args.batch_size)]  # fmt: skip
                with ssh.connect() as client:
                    process = ssh.start(client, argv, secrets)
                    lines = list(process.lines(time.monotonic() + 7200))
                    out = [line for stream, line in lines if stream == "stdout"]
                    errors = [line for stream, line in lines if stream == "stderr"]
                    if process.wait() != 0:
                        raise SystemExit(f"{entity} failed: {errors[-5:]}")
                result = json.loads(out[-1])
                print(
                    f"{entity:<11} {result['rows_read']:>9} {result['duration_s']:>8.1f} "
                    f"{result['rows_per_s']:>8.0f} {result['worker_peak_rss_mb']:>12.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
