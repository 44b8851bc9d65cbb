"""Benchmark: the app path (users, files, filters) against a plain WriteBatch loop, and SFTP blob copies.

    python -m bench.app --users 8000

In one run, on a throw-away PostgreSQL Django DB (``demo.app_data``), Google's Firestore emulator and a
loopback sshd, all started here and removed afterwards:

1. every app entity migrated over all 16 shards with ``AppMigration`` (a local blob store folder and
   ``LocalMediaSource`` for files): documents written / seconds, summed over the shards; beside it the
   same documents committed with plain ``client.batch()`` commits of 500 into fresh collections of the
   same emulator (the "raw loop"), once just before and once just after the migration, and the ratio to
   their mean; in ``--rounds`` rounds (default 3), each into a fresh project, and the median of the
   rounds' ratios beside their range. A warm-up pass (every entity migrated once into a project of its
   own, whose documents the raw loops commit) comes first: the emulator's JVM runs what it has not done
   yet slower, and the side measured first would pay for it. Beside each side's time, the CPU seconds it cost this
   process (the client, every thread) and the emulator (its JVM): where a ratio comes from;
2. MB/s of ``copy_blob(SFTPMediaSource, ...)`` into a local ``BlobStore`` beside a plain paramiko
   ``SFTPClient.get`` of the same files (N × 10 MB + one 200 MB), interleaved file by file;
3. the peak RSS growth of this process while ``copy_blob`` copies the 200 MB file over SFTP (and, for
   reference, while ``SFTPClient.get`` does).
4. µs a document of looking documents up by id, as a run looks up the parents its rows name: the writer's
   ``get_many`` beside the client library's ``get_all`` of the same ~37,000 paths (every users and files
   document of the warm-up project, and as many ids that have none).

``--work-dir`` chooses the file system the media folder and the blob stores are on (default: the system's
temporary folder). A files pass makes ~19,000 inodes (10,636 blobs and their 8,000 folders), and how long
that takes depends on the file system's state: on this machine's journal-less ext4 each new inode is found
by skipping every inode deleted there in the last minutes, so two runs back to back on ``/tmp`` (the first
one's clean-up deletes ~40,000 files) measured 0.61–0.62× with 3.1–3.6 s of the files pass's CPU in the
kernel, against 1.03× and 0.73 s on a quiet ``/tmp``; the CPU table prints that kernel share. On
``/dev/shm`` (tmpfs) the file system's work is steady.

``--profile`` then migrates shard-00 of each entity again into a fresh project under cProfile and prints
where the time goes. Not a test: it asserts only that the documents arrived.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import psutil
from sqlalchemy import Engine

from demo.app_data import generate_app
from demo.databases import POSTGRES_ADMIN, throwaway_database
from demo.firestore_emulator import running_emulator
from demo.sshd import running_sshd
from migration_assets.app.migrate import ENTITIES, AppMigration, AppRunParameters
from resources.blobstore import BlobStore, copy_blob
from resources.firestore import FirestoreResource, get_many
from resources.media import LocalMediaSource, SFTPMediaSource
from resources.ssh import SSHResource
from worker import app_rules, schema

MB = 1024 * 1024
RAW_BATCH = 500
TARGET_APP = 0.8
TARGET_SFTP = 0.7


# --- 1. the app assets against a raw WriteBatch loop -------------------------------------------------


@dataclass(frozen=True)
class CPU:
    """CPU seconds (user + system) spent by this process (the client side, every thread), the part of it
    spent in the kernel (system calls: the files pass's file system work), and the emulator's (its JVM
    and any process under it) over one measured step."""

    here: float
    emulator: float
    kernel: float = 0.0

    def __sub__(self, other: CPU) -> CPU:
        return CPU(self.here - other.here, self.emulator - other.emulator, self.kernel - other.kernel)

    @staticmethod
    def mean(a: CPU, b: CPU) -> CPU:
        return CPU((a.here + b.here) / 2, (a.emulator + b.emulator) / 2, (a.kernel + b.kernel) / 2)


def emulator_processes(host: str) -> list[psutil.Process]:
    """The process listening on the emulator's port and every process under it (none when not found)."""
    port = int(host.rsplit(":", 1)[1])
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            listener = psutil.Process(connection.pid)
            return [listener, *listener.children(recursive=True)]
    return []


def cpu_now(emulator: list[psutil.Process]) -> CPU:
    here = psutil.Process().cpu_times()
    spent = 0.0
    for process in emulator:
        try:
            times = process.cpu_times()
        except psutil.Error:  # gone: its time is lost with it, which the emulator's JVM never is
            continue
        spent += times.user + times.system
    return CPU(here.user + here.system, spent, here.system)


@dataclass(frozen=True)
class AssetFigures:
    round: int
    entity: str
    read: int
    written: int
    seconds: float  # AppMigration, summed over the 16 shards
    raw_seconds: tuple[float, float]  # the raw loop before and after the migration
    cpu: CPU  # CPU seconds of this process and of the emulator during the migration
    raw_cpu: CPU  # the same for the raw loop: the mean of its two runs

    @property
    def raw_rate(self) -> float:
        """Documents/s of the raw loop: the mean of its two runs' times."""
        return self.written / (sum(self.raw_seconds) / 2)

    @property
    def ratio(self) -> float:
        """AppMigration's documents/s over the raw loop's."""
        return self.written / self.seconds / self.raw_rate


def migrate(
    entity: str,
    shard: str,
    run_id: str,
    django: Engine,
    resource: FirestoreResource,
    media_root: Path,
    blobs: BlobStore,
) -> tuple[int, int, float]:
    """One ``AppMigration`` run: (rows read, documents written, seconds)."""
    params = AppRunParameters(entity=entity, shard=shard, usuario="bench", run_id=run_id)
    files = entity == "files"
    migration = AppMigration(
        params,
        django,
        django,  # the control tables beside the Django tables (their own schema), as the tests do
        resource.writer(),
        media=LocalMediaSource(str(media_root)) if files else None,
        blobs=blobs if files else None,
    )
    started = time.perf_counter()
    result = migration.run()
    elapsed = time.perf_counter() - started
    counts = result.counts
    return counts.read, counts.inserted + counts.updated + counts.deleted, elapsed


def read_back(client: Any, entity: str) -> list[tuple[str, dict[str, Any]]]:
    return [(snapshot.id, snapshot.to_dict() or {}) for snapshot in client.collection(entity).stream()]


def raw_loop(client: Any, collection: str, documents: list[tuple[str, dict[str, Any]]]) -> float:
    """Plain ``client.batch()`` commits of 500 documents; seconds."""
    started = time.perf_counter()
    for start in range(0, len(documents), RAW_BATCH):
        batch = client.batch()
        for document_id, data in documents[start : start + RAW_BATCH]:
            batch.set(client.collection(collection).document(document_id), data)
        batch.commit()
    return time.perf_counter() - started


def count(client: Any, collection: str) -> int:
    return int(client.collection(collection).count().get()[0][0].value)


def migrate_entity(
    entity: str, tag: str, django: Engine, resource: FirestoreResource, media_root: Path, blobs: BlobStore
) -> tuple[int, int, float]:
    """``entity`` over all 16 shards: (rows read, documents written, seconds), summed over the shards."""
    read = written = 0
    seconds = 0.0
    for number in range(app_rules.SHARDS):
        shard = app_rules.shard_key(number)
        r, w, s = migrate(entity, shard, f"{tag}-{entity}-{number}", django, resource, media_root, blobs)
        read, written, seconds = read + r, written + w, seconds + s
    return read, written, seconds


@dataclass(frozen=True)
class LookUpFigures:
    """Documents looked up by id: the writer's ``get_many`` beside the client library's ``get_all``."""

    documents: int
    seconds: dict[str, float]  # "writer" / "library": the median wall time of the repeats
    cpu: dict[str, float]  # the same, this process's CPU seconds


def bench_look_ups(resource: FirestoreResource, paths: list[str], repeats: int = 3) -> LookUpFigures:
    """Every path looked up by id for its ``legacy_id`` only, as a run looks up the parents its rows name, in
    the writer's requests of 300: ``DocumentWriter.get_many`` (raw BatchGetDocuments messages, read on the
    calling thread) and the client library's ``get_all`` (snapshots), alternating, ``repeats`` times each."""
    writer, client = resource.writer(), resource.client()
    sides: dict[str, Callable[[], Any]] = {
        "writer": lambda: writer.get_many(paths, fields=["legacy_id"]),
        "library": lambda: get_many(client, paths, fields=["legacy_id"]),
    }
    walls: dict[str, list[float]] = {side: [] for side in sides}
    cpus: dict[str, list[float]] = {side: [] for side in sides}
    results = {}
    for _ in range(repeats):
        for side, look_up in sides.items():
            started, cpu = time.perf_counter(), time.process_time()
            results[side] = look_up()
            walls[side].append(time.perf_counter() - started)
            cpus[side].append(time.process_time() - cpu)
    assert results["writer"] == results["library"]
    return LookUpFigures(
        len(paths),
        {side: statistics.median(values) for side, values in walls.items()},
        {side: statistics.median(values) for side, values in cpus.items()},
    )


def bench_assets(
    django: Engine, host: str, media_root: Path, blob_root: Path, rounds: int
) -> tuple[list[AssetFigures], LookUpFigures]:
    """Per round and entity, the raw loop before and after its migration, in the same warm emulator.

    The emulator is a JVM: what it has not done yet runs slower until its JIT has compiled it. So every
    entity is first migrated once into a project of its own (the warm-up pass, printed, not compared),
    whose documents the raw loops then commit; each measured round migrates them again into a fresh
    project, each entity between two raw loops of its documents (its own fresh collections of that
    project), and is compared with their mean: neither side always meets the warmer emulator. Rounds
    repeat that whole pass, so that a ratio is read as the median of several, not from one noisy pair.
    Last, the look-ups of every users and files document of the warm-up project, and of as many ids again
    that have none (``bench_look_ups``)."""
    suffix = uuid.uuid4().hex[:8]
    warm = FirestoreResource(project=f"bench-app-warm-{suffix}", emulator_host=host)
    documents: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for entity in ENTITIES:  # users, then files (need users), then filters (need files)
        _, written, seconds = migrate_entity(
            entity, "warm", django, warm, media_root, BlobStore(str(blob_root / "warm"))
        )
        documents[entity] = read_back(warm.client(), entity)
        assert len(documents[entity]) == written, (entity, len(documents[entity]), written)
        print(f"  warm-up pass, {entity}: {written} documents in {seconds:.2f} s", flush=True)
    emulator = emulator_processes(host)
    if not emulator:
        print("  (the emulator's process was not found: its CPU seconds below are 0)", flush=True)
    rows: list[AssetFigures] = []
    for number in range(1, rounds + 1):
        resource = FirestoreResource(project=f"bench-app-{suffix}-{number}", emulator_host=host)
        blobs = BlobStore(str(blob_root / f"measured-{number}"))
        rows += measure_round(number, django, resource, media_root, blobs, documents, emulator)
    paths = [f"{entity}/{prefix}{document_id}" for entity in ("users", "files") for prefix in ("", "9")
             for document_id, _ in documents[entity]]  # fmt: skip
    return rows, bench_look_ups(warm, paths)


def measure_round(
    number: int,
    django: Engine,
    resource: FirestoreResource,
    media_root: Path,
    blobs: BlobStore,
    documents: dict[str, list[tuple[str, dict[str, Any]]]],
    emulator: list[psutil.Process],
) -> list[AssetFigures]:
    """One measured round: each entity into ``resource``'s fresh project between two raw loops."""
    client = resource.client()
    rows: list[AssetFigures] = []
    for entity in ENTITIES:
        start = cpu_now(emulator)
        before = raw_loop(client, f"raw_before_{entity}", documents[entity])
        between = cpu_now(emulator)
        read, written, seconds = migrate_entity(entity, f"bench{number}", django, resource, media_root, blobs)
        migrated = cpu_now(emulator)
        after = raw_loop(client, f"raw_after_{entity}", documents[entity])
        end = cpu_now(emulator)
        assert written == len(documents[entity]) == count(client, entity), entity
        assert count(client, f"raw_before_{entity}") == count(client, f"raw_after_{entity}") == written, entity
        print(
            f"  round {number}, {entity}: {read} rows, {written} documents; raw loop {before:.2f} s, "
            f"AppMigration {seconds:.2f} s, raw loop {after:.2f} s",
            flush=True,
        )
        raw_cpu = CPU.mean(between - start, end - migrated)
        figures = AssetFigures(number, entity, read, written, seconds, (before, after), migrated - between, raw_cpu)
        rows.append(figures)
    return rows


def profile_shard(django: Engine, host: str, media_root: Path, blob_root: Path, top: int) -> None:
    """shard-00 of each entity again, into a fresh project (so every document is written again), under cProfile."""
    resource = FirestoreResource(project=f"bench-prof-{uuid.uuid4().hex[:8]}", emulator_host=host)
    blobs = BlobStore(str(blob_root))
    for entity in ENTITIES:
        profiler = cProfile.Profile()
        profiler.enable()
        read, written, seconds = migrate(entity, "shard-00", f"prof-{entity}", django, resource, media_root, blobs)
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).strip_dirs()
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
        print(f"\n### cProfile: {entity} shard-00, {read} rows, {written} documents, {seconds:.2f} s\n", flush=True)
        print(out.getvalue(), flush=True)


# --- 2. and 3. blobs over SFTP --------------------------------------------------------------------


def make_files(root: Path, small: int, small_mb: int, large_mb: int) -> list[str]:
    """Random content (incompressible), written in 1 MiB chunks; relative paths, the large one last."""
    root.mkdir(parents=True)
    names = [f"small-{n:02d}.bin" for n in range(small)] + ["large.bin"]
    sizes = [small_mb] * small + [large_mb]
    for name, size in zip(names, sizes, strict=True):
        with (root / name).open("wb") as out:
            for _ in range(size):
                out.write(os.urandom(MB))
    return names


@contextmanager
def peak_rss(interval: float = 0.002) -> Iterator[dict[str, int]]:
    """Sample this process's RSS on a thread; ``result['growth']`` is the peak minus the RSS at entry."""
    gc.collect()
    process = psutil.Process()
    result = {"base": process.memory_info().rss, "peak": 0, "growth": 0}
    result["peak"] = result["base"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], process.memory_info().rss)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result["peak"] = max(result["peak"], process.memory_info().rss)
        result["growth"] = result["peak"] - result["base"]


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def plain_sftp(server: Any) -> tuple[paramiko.SSHClient, paramiko.SFTPClient]:
    kw = server.resource_kwargs()
    client = paramiko.SSHClient()
    client.load_host_keys(kw["known_hosts_file"])
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        kw["host"],
        port=kw["port"],
        username=kw["username"],
        key_filename=kw["key_file"],
        look_for_keys=False,
        allow_agent=False,
    )
    return client, client.open_sftp()


def bench_sftp(server: Any, media: Path, names: list[str], work: Path) -> dict[str, Any]:
    """Seconds and bytes of each method over all files, and the RSS growth of each on the large file."""
    store_root, plain_root = work / "sftp-blobs", work / "sftp-plain"
    plain_root.mkdir()
    store = BlobStore(str(store_root))
    totals = {"copy_blob": 0.0, "get": 0.0}
    rss: dict[str, int] = {}
    size = 0
    client, sftp = plain_sftp(server)
    try:
        with SFTPMediaSource(SSHResource(**server.resource_kwargs()), str(media)) as source:
            # warm both connections (and the page cache of the first file) outside the timing
            copy_blob(source, names[0], store, "warmup", expected_sha256=None)
            sftp.get(str(media / names[0]), str(plain_root / "warmup"))
            store.delete("warmup")
            (plain_root / "warmup").unlink()
            for number, name in enumerate(names):
                key, local = f"bench/{name}", plain_root / name
                large = name == names[-1]

                def ours(key: str = key, name: str = name) -> None:
                    copy_blob(source, name, store, key, expected_sha256=None)

                def plain(local: Path = local, name: str = name) -> None:
                    sftp.get(str(media / name), str(local))

                # alternate which goes first, so neither always meets the warmer cache
                order = [("copy_blob", ours), ("get", plain)]
                for label, action in order if number % 2 == 0 else reversed(order):
                    if large:
                        with peak_rss() as memory:
                            totals[label] += timed(action)
                        rss[label] = memory["growth"]
                    else:
                        totals[label] += timed(action)
                blob = store.stat(key)
                assert blob is not None and blob.size == local.stat().st_size == (media / name).stat().st_size
                size += blob.size
                store.delete(key)
                local.unlink()
    finally:
        sftp.close()
        client.close()
    return {"bytes": size, "seconds": totals, "rss": rss}


# --- the run --------------------------------------------------------------------------------------


def file_system(path: Path) -> str:
    """The type of the file system ``path`` is on (its longest mount point), e.g. ``ext4`` or ``tmpfs``."""
    mounts = [(len(part.mountpoint), part.fstype) for part in psutil.disk_partitions(all=True)
              if path.resolve().is_relative_to(part.mountpoint)]  # fmt: skip
    return max(mounts)[1] if mounts else "unknown file system"


def run_all(args: argparse.Namespace, work: Path, url: str) -> tuple[list[AssetFigures], LookUpFigures, Any]:
    """Sections 1 (with the emulator) and 2-3 (with sshd); each server is stopped when its section ends."""
    print(f"media and blobs under {work} ({file_system(work)})", flush=True)
    with running_emulator() as host:
        django = schema.make_engine(url)
        try:
            started = time.perf_counter()
            tally = generate_app(django, work / "media", users=args.users, outside_dir=work / "outside")
            totals = {entity: tally.totals(entity)["migrated"] for entity in ENTITIES}
            took = time.perf_counter() - started
            print(f"generated {args.users} users in {took:.1f} s; migratable: {totals}", flush=True)
            print(f"emulator at {host}; migrating 16 shards of each entity", flush=True)
            assets, look_ups = bench_assets(django, host, work / "media", work / "blobs", args.rounds)
            if args.profile:
                profile_shard(django, host, work / "media", work / "blobs-profile", args.top)
        finally:
            django.dispose()
    (work / "sshd").mkdir()
    names = make_files(work / "sftp-media", args.small_files, args.small_mb, args.large_mb)
    print(f"SFTP: {args.small_files} × {args.small_mb} MB + 1 × {args.large_mb} MB", flush=True)
    with running_sshd(work / "sshd") as server:
        sftp = bench_sftp(server, work / "sftp-media", names, work)
    return assets, look_ups, sftp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of every entity (median reported)")
    parser.add_argument("--small-files", type=int, default=20, help="SFTP: this many files of --small-mb")
    parser.add_argument("--small-mb", type=int, default=10)
    parser.add_argument("--large-mb", type=int, default=200, help="SFTP: one file of this size (RSS measured)")
    parser.add_argument("--profile", action="store_true", help="then cProfile shard-00 of each entity")
    parser.add_argument("--top", type=int, default=25, help="cProfile: functions listed")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where the media folder and the blob stores go (default: the system's temporary folder)",
    )
    args = parser.parse_args()
    wall = time.perf_counter()

    failure: BaseException | None = None
    with (
        tempfile.TemporaryDirectory(prefix="bench-app-", dir=args.work_dir) as tmp,
        throwaway_database(POSTGRES_ADMIN, "bench_app") as url,
    ):
        try:
            assets, look_ups, sftp = run_all(args, Path(tmp), url)
        except BaseException as problem:  # re-raised below: throwaway_database drops only on a normal exit
            failure = problem
    if failure is not None:
        raise failure

    print()
    print("| measure | AppMigration / ours | raw loop / plain paramiko | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    for figures in assets:
        ours, raw = figures.written / figures.seconds, figures.raw_rate
        before, after = figures.raw_seconds
        print(
            f"| round {figures.round}: `{figures.entity}` docs/s ({figures.written} docs of {figures.read} rows, "
            f"{figures.seconds:.2f} s vs {before:.2f} s before / {after:.2f} s after) | {ours:,.0f} | {raw:,.0f} "
            f"| {figures.ratio:.2f}× | |"
        )
    for entity in ENTITIES:
        ratios = sorted(figures.ratio for figures in assets if figures.entity == entity)
        print(
            f"| `{entity}`: the median of {len(ratios)} rounds (range {ratios[0]:.2f}–{ratios[-1]:.2f}×) | | "
            f"| {statistics.median(ratios):.2f}× | ≥ {TARGET_APP}× |"
        )
    per_document = {side: seconds / look_ups.documents * 1e6 for side, seconds in look_ups.seconds.items()}
    cpu_per_document = {side: seconds / look_ups.documents * 1e6 for side, seconds in look_ups.cpu.items()}
    print(
        f"| look-ups by id, µs a document, wall (this process's CPU) ({look_ups.documents:,} paths, half of them "
        f"missing: writer.get_many vs the library's get_all) | {per_document['writer']:,.1f} "
        f"({cpu_per_document['writer']:,.1f}) | {per_document['library']:,.1f} ({cpu_per_document['library']:,.1f}) "
        f"| {per_document['library'] / per_document['writer']:.2f}× as fast | |"
    )
    megabytes = sftp["bytes"] / MB
    copy_rate = megabytes / sftp["seconds"]["copy_blob"]
    get_rate = megabytes / sftp["seconds"]["get"]
    print(
        f"| SFTP blob copy MB/s ({megabytes:,.0f} MB: copy_blob {sftp['seconds']['copy_blob']:.2f} s "
        f"vs get {sftp['seconds']['get']:.2f} s) | {copy_rate:,.1f} | {get_rate:,.1f} "
        f"| {copy_rate / get_rate:.2f}× | ≥ {TARGET_SFTP}× |"
    )
    print(
        f"| peak RSS growth, {args.large_mb} MB file over SFTP (MB) | {sftp['rss']['copy_blob'] / MB:,.1f} "
        f"| {sftp['rss']['get'] / MB:,.1f} | | |"
    )
    print()
    print(
        "| CPU seconds (user + system) | AppMigration: this process (in the kernel) | emulator "
        "| raw loop: this process | emulator |"
    )
    print("|---|---:|---:|---:|---:|")
    for figures in assets:
        spent, loop = figures.cpu, figures.raw_cpu
        raw_mean = sum(figures.raw_seconds) / 2
        print(
            f"| round {figures.round}: `{figures.entity}` ({figures.seconds:.2f} s vs {raw_mean:.2f} s) "
            f"| {spent.here:.2f} ({spent.kernel:.2f}) | {spent.emulator:.2f} | {loop.here:.2f} | {loop.emulator:.2f} |"
        )
    print(f"\nwall time {time.perf_counter() - wall:.1f} s")


if __name__ == "__main__":
    main()
