"""The app path end to end (issue 8): a real PostgreSQL Django DB, Google's Firestore emulator, a media
folder with real files (and over SFTP through a real sshd), a local and an S3-compatible blob store.

The demo generator builds every §6 case and records each record's fate (migrated, or its quarantine
reason); a shard's run must end exactly there, document for document.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from dagster import DagsterInstance, materialize
from google.cloud.firestore_v1.base_query import FieldFilter
from sqlalchemy import Engine, func, select

from demo.app_data import MIGRATED, AppTally, generate_app
from migration_assets.app.assets import files as files_asset
from migration_assets.app.assets import filters as filters_asset
from migration_assets.app.assets import users as users_asset
from migration_assets.app.migrate import (
    PAGE_ROWS,
    AppMigration,
    AppRunParameters,
    from_ledger,
    shared_pool,
    to_ledger,
)
from resources import app_resources
from resources.blobstore import BlobStore
from resources.firestore import MAX_WRITES_PER_REQUEST, DocumentWriter, FirestoreResource, PartialCommit, Write
from resources.media import LocalMediaSource, SFTPMediaSource
from resources.ssh import SSHResource
from tests.test_firestore import CommitSpy
from worker import app_rules, django_schema, schema
from worker.engine import MassDeleteRefused

pytestmark = pytest.mark.integration
SOURCE_FILES = django_schema.SOURCES["files"]
ENTITIES = ("users", "files", "filters")


class Setup:
    def __init__(self, django_url: str, tmp: Path, emulator: str, project: str) -> None:
        self.django_url = django_url
        self.django: Engine = schema.make_engine(django_url)
        self.state: Engine = self.django  # the control tables beside the Django tables: another schema
        self.media_root = tmp / "media"
        self.outside = tmp / "outside"
        self.blob_root = tmp / "blobs"
        self.tally: AppTally = generate_app(self.django, self.media_root, users=120, outside_dir=self.outside)
        self.firestore = FirestoreResource(project=project, emulator_host=emulator)
        self.client = self.firestore.client()
        self.blobs = BlobStore(str(self.blob_root))
        self.logs: list[str] = []

    def run(self, entity: str, shard: str, run_id: str, writer: DocumentWriter | None = None, **kw: Any) -> Any:
        params = AppRunParameters(entity=entity, shard=shard, usuario="tester", run_id=run_id, **kw)
        media = LocalMediaSource(str(self.media_root)) if entity == "files" else None
        migration = AppMigration(
            params,
            self.django,
            self.state,
            writer or self.firestore.writer(),
            media=media,
            blobs=self.blobs if entity == "files" else None,
            log=self.logs.append,
        )
        return migration.run()

    def run_shard(self, shard: str, run_id: str, **kw: Any) -> dict[str, Any]:
        return {entity: self.run(entity, shard, f"{run_id}-{entity}", **kw) for entity in ENTITIES}

    def documents(self, entity: str, shard: str) -> dict[int, dict[str, Any]]:
        query = self.client.collection(entity).where(filter=FieldFilter("shard", "==", shard))
        return {int(doc.id): {**(doc.to_dict() or {}), "_updated": doc.update_time} for doc in query.stream()}

    def quarantine(self, entity: str, shard: str) -> dict[int, str]:
        q = schema.quarantine
        with self.state.connect() as conn:
            rows = conn.execute(
                select(q.c.legacy_id, q.c.reason).where(q.c.entity == entity, q.c.partition_key == shard)
            ).all()
        return {legacy_id: reason for legacy_id, reason in rows}

    def ledger_count(self, run_id: str) -> int:
        ledger = schema.ledger
        with self.state.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(ledger).where(ledger.c.run_id == run_id)) or 0)

    def expected_fates(self, entity: str, shard: str) -> dict[int, str]:
        return self.tally.fates_in(entity, app_rules.shard_number(shard))


@pytest.fixture
def setup(postgres_url: str, tmp_path: Path, firestore_emulator: str, firestore_project: str) -> Iterator[Setup]:
    yield Setup(postgres_url, tmp_path, firestore_emulator, firestore_project)


def assert_resumed_run_is_whole(setup: Setup, shard: str) -> dict[int, dict[str, Any]]:
    """After a killed run and its resumption: every file where it was built to end, and each
    document's insert in the ledger exactly once. Returns the documents."""
    documents = setup.documents("files", shard)
    assert {**{i: MIGRATED for i in documents}, **setup.quarantine("files", shard)} == setup.expected_fates(
        "files", shard
    )
    ledger = schema.ledger
    with setup.state.connect() as conn:
        inserted = Counter(
            conn.scalars(select(ledger.c.legacy_id).where(ledger.c.entity == "files", ledger.c.action == "inserted"))
        )
    assert set(inserted) == set(documents) and max(inserted.values()) == 1
    return documents


def busiest_shard(tally: AppTally) -> str:
    """The shard with the most quarantine cases, so one shard shows many reasons."""
    scores = {
        shard: sum(
            count for entity in ENTITIES for reason, count in tally.fates[entity][shard].items() if reason != MIGRATED
        )
        for shard in range(app_rules.SHARDS)
    }
    return app_rules.shard_key(max(scores, key=lambda shard: scores[shard]))


def test_every_record_of_every_shard_is_migrated_or_quarantined_as_built(setup: Setup) -> None:
    seen: Counter[str] = Counter()
    for number in range(app_rules.SHARDS):
        shard = app_rules.shard_key(number)
        results = setup.run_shard(shard, f"first-{number}")
        for entity in ENTITIES:
            expected = setup.expected_fates(entity, shard)
            documents = setup.documents(entity, shard)
            quarantine = setup.quarantine(entity, shard)
            got = {**{i: MIGRATED for i in documents}, **quarantine}
            assert got == expected, (entity, shard)
            assert not set(documents) & set(quarantine)
            counts = results[entity].counts
            assert counts.read == len(expected)
            assert counts.inserted == sum(1 for fate in expected.values() if fate == MIGRATED)
            assert dict(counts.quarantined) == dict(Counter(f for f in expected.values() if f != MIGRATED))
            seen.update(expected.values())
    # the generator placed every reason of §6 somewhere
    for reason in {*app_rules.USER_REASONS, *app_rules.FILE_REASONS, *app_rules.FILTER_REASONS}:
        assert seen[reason] > 0, reason
    # what the unsafe paths point at was never copied
    assert not any("outside" in str(p) for p in setup.blob_root.rglob("*"))


def test_documents_have_the_exact_fields_and_firestore_types(setup: Setup) -> None:
    shard = busiest_shard(setup.tally)
    setup.run_shard(shard, "types")
    user = next(iter(setup.documents("users", shard).values()))
    assert set(user) - {"_updated"} == {
        "legacy_id", "username", "email", "first_name", "last_name", "is_active", "is_staff", "is_superuser",
        "date_joined", "last_login", "password_hash", "shard", "content_hash", "run_id", "migrated_at",
    }  # fmt: skip
    assert isinstance(user["legacy_id"], int) and isinstance(user["is_active"], bool)
    assert isinstance(user["date_joined"], datetime) and user["date_joined"].utcoffset().total_seconds() == 0
    assert user["shard"] == shard and user["run_id"] == "types-users" and len(user["content_hash"]) == 64
    with setup.django.connect() as conn:
        password = conn.exec_driver_sql(f"SELECT password FROM auth_user WHERE id = {user['legacy_id']}").scalar()
    assert user["password_hash"] == password
    assert not any(password in line for line in setup.logs)

    file = next(iter(setup.documents("files", shard).values()))
    assert isinstance(file["user_id"], int) and isinstance(file["size_bytes"], int)
    assert isinstance(file["metadata"], dict) and isinstance(file["system_tags"], list)
    key = app_rules.blob_key(file["user_id"], file["file_id"])
    blob = setup.blobs.stat(key)
    assert blob is not None and blob.size == file["size_bytes"]
    assert setup.blobs.sha256(key) == file["sha256"] and file["blob_url"] == setup.blobs.url(key)
    stored = {k: v for k, v in file.items() if k != "_updated"}  # recomputed from the fields stored
    assert app_rules.document_hash("files", stored) == file["content_hash"]

    for document in setup.documents("filters", shard).values():
        assert isinstance(document["definition"], dict)
        assert document["file_id"] is None or isinstance(document["file_id"], int)


def test_a_second_run_changes_nothing(setup: Setup) -> None:
    shard = busiest_shard(setup.tally)
    setup.run_shard(shard, "one")
    before = {entity: setup.documents(entity, shard) for entity in ENTITIES}
    blobs = {p: p.stat().st_mtime_ns for p in setup.blob_root.rglob("*") if p.is_file()}
    results = setup.run_shard(shard, "two")
    for entity in ENTITIES:
        assert setup.documents(entity, shard) == before[entity], entity  # update_time included
        counts = results[entity].counts
        assert counts.inserted == counts.updated == counts.deleted == 0
        assert counts.unchanged == len(before[entity])
        assert setup.ledger_count(f"two-{entity}") == 0
    assert {p: p.stat().st_mtime_ns for p in setup.blob_root.rglob("*") if p.is_file()} == blobs


class FailingWriter(DocumentWriter):
    """The real writer, which dies (like a killed process) at its ``fail_at``-th commit."""

    def __init__(self, inner: DocumentWriter, fail_at: int) -> None:
        super().__init__(inner.client)
        self.calls = 0
        self.fail_at = fail_at

    def commit(self, writes: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return super().commit(writes)


def test_a_killed_run_resumes_without_duplicates_or_gaps(setup: Setup) -> None:
    shard = busiest_shard(setup.tally)
    setup.run("users", shard, "u")
    with pytest.raises(KeyboardInterrupt):
        setup.run("files", shard, "killed", writer=FailingWriter(setup.firestore.writer(), 2), batch_size=3)
    result = setup.run("files", shard, "resumed", batch_size=3)
    assert result.resumed_from == "killed"
    assert_resumed_run_is_whole(setup, shard)


class CountingWriter(DocumentWriter):
    """The real writer, counting the shard counts it is asked for."""

    def __init__(self, inner: DocumentWriter) -> None:
        super().__init__(inner.client, channel=inner.channel)
        self.counts = 0

    def count(self, collection: str, shard: str) -> int:
        self.counts += 1
        return super().count(collection, shard)


def forget_what_was_written(setup: Setup) -> None:
    """A new control DB (or documents written by another tool): no record of the shards written, of runs or
    checkpoints; Firestore still holds the documents."""
    with setup.state.begin() as conn:
        for table in (schema.app_shards_written, schema.runs, schema.checkpoints):
            conn.execute(table.delete())


def test_a_shard_never_written_is_not_counted_and_a_written_one_is(setup: Setup) -> None:
    """The emulator scans the whole collection to count a shard: a first run skips it."""
    shard = busiest_shard(setup.tally)
    first = CountingWriter(setup.firestore.writer())
    assert setup.run("users", shard, "first", writer=first).counts.inserted > 0
    second = CountingWriter(setup.firestore.writer())
    result = setup.run("users", shard, "second", writer=second)
    assert (first.counts, second.counts) == (0, 1)
    assert result.counts.inserted == 0 and result.counts.unchanged == len(setup.documents("users", shard))


def test_a_dry_run_never_takes_a_shard_to_be_empty(setup: Setup) -> None:
    """A dry run writes nothing, so no create could find the documents: it counts and reads them."""
    shard = busiest_shard(setup.tally)
    setup.run("users", shard, "old")
    forget_what_was_written(setup)
    counting = CountingWriter(setup.firestore.writer())
    result = setup.run("users", shard, "dry", writer=counting, dry_run=True)
    assert counting.counts == 1
    assert result.counts.inserted == 0 and result.counts.unchanged == len(setup.documents("users", shard))
    with setup.state.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(schema.app_shards_written)) == 0


def test_a_shard_written_by_a_release_that_kept_no_record_is_counted(setup: Setup) -> None:
    """Runs of the shard on record, but no database recorded for it: an earlier release wrote it."""
    shard = busiest_shard(setup.tally)
    setup.run("users", shard, "old")
    with setup.state.begin() as conn:
        conn.execute(schema.app_shards_written.delete())
    counting = CountingWriter(setup.firestore.writer())
    result = setup.run("users", shard, "new", writer=counting)
    assert counting.counts == 1 and not any("exists already" in line for line in setup.logs)
    assert result.counts.inserted == 0 and result.counts.unchanged == len(setup.documents("users", shard))


def test_documents_the_control_db_did_not_know_of_are_found_and_their_previous_version_kept(setup: Setup) -> None:
    shard = busiest_shard(setup.tally)
    setup.run("users", shard, "old")
    before = setup.documents("users", shard)
    changed = sorted(before)[4]  # in the second page of three
    with setup.django.begin() as conn:
        conn.exec_driver_sql(f"UPDATE auth_user SET first_name = 'Renamed' WHERE id = {changed}")
    forget_what_was_written(setup)
    result = setup.run("users", shard, "new", batch_size=3)
    assert any("exists already" in line for line in setup.logs)
    counts = result.counts
    assert (counts.inserted, counts.updated, counts.unchanged) == (0, 1, len(before) - 1)
    assert result.resumed_from is None
    ledger = schema.ledger
    with setup.state.connect() as conn:
        rows = conn.execute(select(ledger.c.legacy_id, ledger.c.action, ledger.c.previous).where(
            ledger.c.run_id == "new")).all()  # fmt: skip
        status = conn.scalar(select(schema.runs.c.status).where(schema.runs.c.run_id == "new"))
    assert [(legacy_id, action) for legacy_id, action, _ in rows] == [(changed, "updated")]
    kept = from_ledger(rows[0].previous["document"])
    assert kept == {key: value for key, value in before[changed].items() if key != "_updated"}
    assert status == "succeeded"
    after = setup.documents("users", shard)
    assert after[changed]["first_name"] == "Renamed"
    assert all(after[i]["_updated"] == before[i]["_updated"] for i in before if i != changed)


def test_a_blob_the_control_db_did_not_know_of_is_kept_before_it_is_overwritten(setup: Setup) -> None:
    shard = busiest_shard(setup.tally)
    setup.run("users", shard, "u")
    setup.run("files", shard, "f1")
    documents = setup.documents("files", shard)
    changed = min(documents)  # in the first page
    key = app_rules.blob_key(documents[changed]["user_id"], documents[changed]["file_id"])
    old_content = (setup.blob_root / key).read_bytes()
    new_content = old_content + b"\nanother line\n"
    with setup.django.connect() as conn:
        path = conn.scalar(select(SOURCE_FILES.c.file_path).where(SOURCE_FILES.c.id == changed))
    (setup.media_root / path).write_bytes(new_content)
    with setup.django.begin() as conn:
        conn.execute(
            SOURCE_FILES.update()
            .where(SOURCE_FILES.c.id == changed)
            .values(sha256=hashlib.sha256(new_content).hexdigest(), updated_at=func.now())
        )
    forget_what_was_written(setup)
    result = setup.run("files", shard, "f2", batch_size=3)
    assert (result.counts.inserted, result.counts.updated) == (0, 1)
    ledger = schema.ledger
    with setup.state.connect() as conn:
        previous = conn.scalar(select(ledger.c.previous).where(ledger.c.run_id == "f2"))
    assert (setup.blob_root / previous["blob"]).read_bytes() == old_content
    assert (setup.blob_root / key).read_bytes() == new_content


def test_full_run_deletes_documents_whose_source_is_gone_and_the_guard_holds(setup: Setup) -> None:
    shard = busiest_shard(setup.tally)
    setup.run("users", shard, "u1")
    migrated = sorted(setup.documents("users", shard))
    with setup.django.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM auth_user WHERE id = {migrated[0]}")
    result = setup.run("users", shard, "u2", allow_mass_delete=False, max_delete_share=0.5)
    assert result.counts.deleted == 1 and migrated[0] not in setup.documents("users", shard)
    ledger = schema.ledger
    with setup.state.connect() as conn:
        previous = conn.scalar(select(ledger.c.previous).where(ledger.c.run_id == "u2", ledger.c.action == "deleted"))
    assert from_ledger(previous["document"])["legacy_id"] == migrated[0]
    with setup.django.begin() as conn:
        conn.exec_driver_sql("DELETE FROM auth_user")
    with pytest.raises(MassDeleteRefused, match="stopped before deleting"):
        setup.run("users", shard, "u3")
    assert sorted(setup.documents("users", shard)) == migrated[1:]


def test_sftp_media_source_through_sshd(setup: Setup, sshd: Any) -> None:
    shard = busiest_shard(setup.tally)
    setup.run("users", shard, "u")
    params = AppRunParameters(entity="files", shard=shard, usuario="tester", run_id="sftp")
    with SFTPMediaSource(SSHResource(**sshd.resource_kwargs()), str(setup.media_root)) as media:
        AppMigration(params, setup.django, setup.state, setup.firestore.writer(), media=media, blobs=setup.blobs).run()
    expected = setup.expected_fates("files", shard)
    documents = setup.documents("files", shard)
    assert {**{i: MIGRATED for i in documents}, **setup.quarantine("files", shard)} == expected


class OneAtATime(LocalMediaSource):
    """A media source that, like an SFTP session, must not be used by two threads at once: it records the
    most files open at the same time and the threads that opened them."""

    concurrent_opens = False

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.guard = threading.Lock()
        self.open_now = self.most_open = 0
        self.threads: set[int] = set()

    @contextmanager
    def open(self, relative_path: str) -> Iterator[BinaryIO]:
        with self.guard:
            self.open_now += 1
            self.most_open = max(self.most_open, self.open_now)
            self.threads.add(threading.get_ident())
        try:
            time.sleep(0.005)  # a network round trip: pages prepared at once would meet here
            with super().open(relative_path) as reader:
                yield reader
        finally:
            with self.guard:
                self.open_now -= 1


def test_files_are_read_from_the_media_source_by_one_thread_at_a_time(setup: Setup) -> None:
    """Pages are prepared ahead on several threads, but an SFTP session serves one file at a time: every
    file of a run is read on the run's one blob-copy thread."""
    shard = busiest_shard(setup.tally)
    setup.run("users", shard, "u")
    media = OneAtATime(str(setup.media_root))
    params = AppRunParameters(entity="files", shard=shard, usuario="tester", run_id="one", batch_size=2)
    AppMigration(params, setup.django, setup.state, setup.firestore.writer(), media=media, blobs=setup.blobs).run()
    assert media.threads and media.most_open == 1 and len(media.threads) == 1
    documents = setup.documents("files", shard)
    assert {**{i: MIGRATED for i in documents}, **setup.quarantine("files", shard)} == setup.expected_fates(
        "files", shard
    )


def test_a_forked_child_starts_threads_of_its_own_in_a_shared_pool() -> None:
    """The commit and look-up pools live from run to run; a child forked with one idle thread in the parent
    has no such thread, and must not wait for it."""
    shared_pool("fork-test", 1).submit(int).result()  # one thread, idle, in this process
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's outcome is its exit code
        try:
            ran = shared_pool("fork-test", 1).submit(lambda: 7).result(timeout=10) == 7
        except BaseException:
            ran = False
        os._exit(0 if ran else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_ledger_json_round_trips_timestamps() -> None:
    document = {"a": datetime.fromisoformat("2024-01-02T03:04:05.123456+00:00"), "b": [{"c": None}], "d": 1}
    assert from_ledger(json.loads(json.dumps(to_ledger(document)))) == document


def test_the_assets_run_through_dagster_with_resources_from_the_environment(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, firestore_emulator: str
) -> None:
    shard = busiest_shard(setup.tally)
    env = {
        "DJANGO_DB_URL": setup.django_url,
        "STATE_DB_URL": setup.django_url,
        "FIRESTORE_PROJECT": setup.firestore.project,
        "FIRESTORE_EMULATOR_HOST": firestore_emulator,
        "MEDIA_TRANSPORT": "local",
        "MEDIA_ROOT": str(setup.media_root),
        "BLOB_STORE_URL": str(setup.blob_root),
    }
    for name in ("CLINICAL_DB_URL", "LEGACY_DB_URL", "WORKER_TRANSPORT", "SSH_HOST"):
        monkeypatch.delenv(name, raising=False)  # the app group needs none of the clinical variables
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = {"ops": {e: {"config": {"usuario": "ana"}} for e in ENTITIES}}
    result = materialize(
        [users_asset, files_asset, filters_asset],
        partition_key=shard,
        resources=app_resources(),
        run_config=config,
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    for entity in ENTITIES:
        [materialization] = result.asset_materializations_for_node(entity)
        metadata = {k: v.value for k, v in materialization.metadata.items()}
        expected = setup.tally.expected(entity, app_rules.shard_number(shard))
        assert metadata["migrated"] == expected["migrated"] and metadata["shard"] == shard
        assert metadata["quarantined"] == sum(expected["quarantined"].values())
        assert metadata["quarantined_by_reason"] == expected["quarantined"]  # a JSON value, not its Pipes form
    text = json.dumps([str(e) for e in result.all_events])
    with setup.django.connect() as conn:
        passwords = conn.exec_driver_sql("SELECT password FROM auth_user").scalars().all()
    assert not any(p in text for p in passwords)
    # a bad shard key is refused before anything connects, in one line
    bad = materialize(
        [users_asset], partition_key=shard, resources=app_resources(), raise_on_error=False,
        run_config={"ops": {"users": {"config": {"usuario": "bad user"}}}}, instance=DagsterInstance.ephemeral(),
    )  # fmt: skip
    assert not bad.success
    [failure] = [e for e in bad.all_events if e.is_step_failure]
    assert "VALIDATION_ERROR" in failure.step_failure_data.error.message
    assert os.environ["MEDIA_TRANSPORT"] == "local"


def test_writes_go_in_requests_within_the_byte_limit(setup: Setup) -> None:
    writer = setup.firestore.writer()
    big = {"blob": "x" * (900 * 1024)}
    requests = writer.plan([Write(f"sizes/{i}", big) for i in range(8)])
    assert len(requests) >= 3 and all(len(r) * 900 * 1024 < 3 * 1024 * 1024 + 1024 for r in requests)
    with pytest.raises(PartialCommit):
        writer.commit([Write("sizes/1", {"ok": 1}), Write("sizes/2", {"bad": [[1]]})])


def test_a_page_is_committed_in_the_requests_its_writer_may_send(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page holds more source rows than a Firestore request may carry writes: a run hands each page's
    writes to the writer, which sends them in requests within its limit (2 here, 500 at most)."""
    assert PAGE_ROWS["users"] > MAX_WRITES_PER_REQUEST
    spy = CommitSpy(monkeypatch)
    shard = busiest_shard(setup.tally)
    result = setup.run("users", shard, "u", writer=setup.firestore.writer(max_writes=2))
    documents = setup.documents("users", shard)
    assert result.counts.inserted == len(documents) > 2
    assert max(spy.sizes) == 2 and sum(spy.sizes) == len(documents)


def test_incremental_reads_only_files_changed_since_the_watermark(setup: Setup) -> None:
    shard = busiest_shard(setup.tally)
    setup.run("users", shard, "u")
    setup.run("files", shard, "f1")
    migrated = sorted(setup.documents("files", shard))
    with setup.django.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE list_cutter_savedfile SET metadata = '{\"rows\": 7}', updated_at = now() + interval '1 day' "
            f"WHERE id = {migrated[0]}"
        )
    result = setup.run("files", shard, "f2", mode="incremental")
    assert result.mode == "incremental" and result.counts.read == 1 and result.counts.updated == 1
    assert setup.documents("files", shard)[migrated[0]]["metadata"] == {"rows": 7}
    users = setup.run("users", shard, "u2", mode="incremental")  # auth_user has no updated_at: read whole
    assert users.counts.read == len(setup.expected_fates("users", shard)) and users.counts.deleted == 0


def test_a_dry_run_writes_nothing(setup: Setup) -> None:
    shard = busiest_shard(setup.tally)
    setup.run("users", shard, "u")
    result = setup.run("files", shard, "dry", dry_run=True)
    assert result.counts.inserted == sum(1 for f in setup.expected_fates("files", shard).values() if f == MIGRATED)
    assert setup.documents("files", shard) == {} and setup.quarantine("files", shard) == {}
    assert setup.ledger_count("dry") == 0
    assert not [p for p in setup.blob_root.rglob("*") if p.is_file()]


def test_an_overwritten_blob_and_document_are_kept_in_the_ledger(setup: Setup) -> None:
    shard = busiest_shard(setup.tally)
    setup.run("users", shard, "u")
    setup.run("files", shard, "f1")
    legacy_id, document = next(iter(sorted(setup.documents("files", shard).items())))
    key = app_rules.blob_key(document["user_id"], document["file_id"])
    with setup.django.connect() as conn:
        path = conn.exec_driver_sql(f"SELECT file_path FROM list_cutter_savedfile WHERE id = {legacy_id}").scalar()
    (setup.media_root / path).write_bytes(b"a,b\n1,2\n")  # new content; the recorded sha256 no longer matches
    with setup.django.begin() as conn:
        conn.exec_driver_sql(f"UPDATE list_cutter_savedfile SET sha256 = NULL WHERE id = {legacy_id}")
    result = setup.run("files", shard, "f2")
    assert result.counts.updated == 1
    ledger = schema.ledger
    with setup.state.connect() as conn:
        previous = conn.scalar(select(ledger.c.previous).where(ledger.c.run_id == "f2", ledger.c.action == "updated"))
    assert from_ledger(previous["document"])["sha256"] == document["sha256"]
    assert setup.blobs.sha256(previous["blob"]) == document["sha256"]  # the old bytes, kept for a rollback
    assert setup.blobs.sha256(key) == setup.documents("files", shard)[legacy_id]["sha256"] != document["sha256"]


KILLABLE = """
import sys
import threading
from migration_assets.app.migrate import AppMigration, AppRunParameters
from resources.blobstore import BlobStore
from resources.firestore import FirestoreResource
from resources.media import LocalMediaSource
from worker import schema
url, project, emulator, media, blobs, shard = sys.argv[1:]
engine = schema.make_engine(url)
params = AppRunParameters(entity="files", shard=shard, usuario="tester", run_id="killed", batch_size=2)
writer = FirestoreResource(project=project, emulator_host=emulator).writer()
commit, commits = writer.commit, []


def held_after_the_second(writes):  # deterministic: the run cannot end before the test kills it
    result = commit(writes)
    commits.append(len(writes))
    if len(commits) >= 2:  # written to Firestore, not yet checkpointed: the kill lands here at the latest
        threading.Event().wait()
    return result


writer.commit = held_after_the_second
AppMigration(params, engine, engine, writer, media=LocalMediaSource(media), blobs=BlobStore(blobs)).run()
"""


def test_a_process_killed_with_sigkill_mid_run_resumes_without_duplicates_or_gaps(setup: Setup) -> None:
    import signal
    import subprocess
    import sys
    import time

    shard = busiest_shard(setup.tally)
    setup.run("users", shard, "u")
    argv = [sys.executable, "-c", KILLABLE, setup.django_url, setup.firestore.project,
            setup.firestore.emulator_host or "", str(setup.media_root), str(setup.blob_root), shard]  # fmt: skip
    process = subprocess.Popen(argv, cwd=Path(__file__).resolve().parent.parent)
    checkpoints = schema.checkpoints
    deadline = time.monotonic() + 120
    while True:  # kill it once it has checkpointed a few batches, while it is still running
        with setup.state.connect() as conn:
            last = conn.scalar(
                select(checkpoints.c.last_legacy_id).where(
                    checkpoints.c.entity == "files", checkpoints.c.status == "running"
                )
            )
        if last is not None and last > 0:
            break
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    result = setup.run("files", shard, "resumed", batch_size=2)
    assert result.resumed_from == "killed"
    documents = assert_resumed_run_is_whole(setup, shard)
    for document in documents.values():  # every blob in place, whole
        assert setup.blobs.sha256(app_rules.blob_key(document["user_id"], document["file_id"])) == document["sha256"]
