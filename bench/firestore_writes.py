"""Benchmark: WriteBatch commits against BulkWriter, N documents each, on the Firestore emulator.

    python -m bench.firestore_writes --documents 20000

Starts Google's Cloud Firestore emulator, then writes the same N documents (shaped like the
``files`` documents of DESIGN §6) into a fresh collection of a fresh project, once through
``DocumentWriter`` (sequential WriteBatch commits of up to 500 writes / 3 MiB, no rate limiter:
what ``FirestoreResource.writer()`` gives for the emulator) and once through the client's
``BulkWriter`` (parallel BatchWrite requests, its ramp-up limiter lifted so only the emulator
bounds it), counting the per-document success callbacks. Prints docs/s of each and the ratio,
and checks that every document arrived. Not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from google.cloud.firestore_v1.bulk_writer import BulkWriterOptions, SendMode

from demo.firestore_emulator import clear_documents, running_emulator
from resources.firestore import FirestoreResource, Write

UNLIMITED = 1_000_000


def document(number: int) -> dict[str, Any]:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    return {
        "legacy_id": number,
        "user_id": number % 997,
        "file_id": str(uuid.UUID(int=number)),
        "file_name": f"report-{number:07d}.csv",
        "size_bytes": 1000 + number,
        "sha256": f"{number:064x}",
        "uploaded_at": base + timedelta(seconds=number),
        "system_tags": ["csv", "imported"],
        "user_tags": ["q1"] if number % 2 else [],
        "metadata": {"rows": number % 500, "delimiter": ",", "header": True},
        "blob_url": f"files/{number % 997}/{uuid.UUID(int=number)}",
        "shard": f"s{number % 8}",
        "content_hash": f"{number:064x}",
        "run_id": "bench",
        "migrated_at": base,
    }


def count_documents(resource: FirestoreResource, collection: str) -> int:
    query = resource.client().collection(collection).count()
    return int(query.get()[0][0].value)


def bench_write_batch(resource: FirestoreResource, collection: str, total: int) -> float:
    writes = [Write(f"{collection}/{number}", document(number)) for number in range(total)]
    writer = resource.writer()
    started = time.perf_counter()
    result = writer.commit(writes)
    elapsed = time.perf_counter() - started
    assert result.writes == total, result
    return elapsed


def bench_bulk_writer(resource: FirestoreResource, collection: str, total: int) -> float:
    client = resource.client()
    succeeded = 0
    failed: list[str] = []
    lock = threading.Lock()

    def on_result(_writer: Any, _reference: Any, _result: Any) -> None:
        nonlocal succeeded
        with lock:
            succeeded += 1

    def on_error(failure: Any, _writer: Any) -> bool:
        with lock:
            failed.append(failure.operation.reference.path)
        return False  # no retry: report it

    options = BulkWriterOptions(initial_ops_per_second=UNLIMITED, max_ops_per_second=UNLIMITED, mode=SendMode.parallel)
    data = [document(number) for number in range(total)]
    started = time.perf_counter()
    writer = client.bulk_writer(options=options)
    writer.on_write_result(on_result)
    writer.on_write_error(on_error)
    for number in range(total):
        writer.set(client.document(f"{collection}/{number}"), data[number])
    writer.close()
    elapsed = time.perf_counter() - started
    assert succeeded == total and not failed, (succeeded, len(failed))
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two methods this many times")
    args = parser.parse_args()

    with running_emulator() as host:
        print(f"emulator at {host}; {args.documents} documents per run", flush=True)
        for round_number in range(1, args.rounds + 1):
            project = f"bench-{uuid.uuid4().hex[:8]}"
            resource = FirestoreResource(project=project, emulator_host=host)
            # warm the emulator and the client's channel so neither method pays the JVM's start
            resource.writer().commit([Write(f"warmup/{n}", document(n)) for n in range(500)])
            # alternate which method goes first, so neither always meets a warmer (or busier) emulator
            if round_number % 2:
                batch_seconds = bench_write_batch(resource, "batch_files", args.documents)
                bulk_seconds = bench_bulk_writer(resource, "bulk_files", args.documents)
            else:
                bulk_seconds = bench_bulk_writer(resource, "bulk_files", args.documents)
                batch_seconds = bench_write_batch(resource, "batch_files", args.documents)
            for collection in ("batch_files", "bulk_files"):
                stored = count_documents(resource, collection)
                assert stored == args.documents, (collection, stored)
            clear_documents(host, project)
            batch_rate = args.documents / batch_seconds
            bulk_rate = args.documents / bulk_seconds
            print(
                f"round {round_number}: WriteBatch {batch_rate:,.0f} docs/s ({batch_seconds:.2f} s), "
                f"BulkWriter {bulk_rate:,.0f} docs/s ({bulk_seconds:.2f} s), "
                f"WriteBatch/BulkWriter {batch_rate / bulk_rate:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
