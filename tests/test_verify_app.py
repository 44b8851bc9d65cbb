"""The app side of the ``coverage`` and ``integrity`` checks (checks/app_verify.py) against what the real
migration wrote: a real PostgreSQL Django DB and control DB, Google's Firestore emulator, a media folder
and a local blob store (test_app's ``Setup``).

The shards are migrated once per module; each tampering test changes one thing, verifies, and puts it
back, and the ``shard`` fixture then checks that the shard verifies clean again, so the tests stay
independent. The verifications read in pages of ``PAGE`` to go through every stream's paging.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, select, update

from checks.app_verify import (
    BLOB_CHANGED,
    BLOB_MISSING,
    DANGLING_FILE,
    DANGLING_USER,
    blob_verdict,
    record_key,
    stored_record,
    verify_app_partition,
)
from demo.app_data import MIGRATED, AppTally
from resources.media import LocalMediaSource
from tests.conftest import POSTGRES_ADMIN, _fresh_database
from tests.test_app import ENTITIES, Setup
from worker import app_rules, django_schema, schema
from worker.verify import Report

MIN_COVERAGE = 0.6
PAGE = 4  # small pages: tens of rows go through several of them (and a last one that is empty)
integration = pytest.mark.integration


# --- which shards ------------------------------------------------------------------------------


def reasons_in(tally: AppTally, shard: int) -> set[str]:
    return {reason for entity in ENTITIES for reason in tally.expected(entity, shard)["quarantined"]}


def covered(tally: AppTally, shard: int) -> bool:
    """Every entity of the shard has at least MIN_COVERAGE of its records migrated."""
    counts = [tally.expected(entity, shard) for entity in ENTITIES]
    return all(c["eligible"] and c["migrated"] >= MIN_COVERAGE * c["eligible"] for c in counts)


def chosen_shards(tally: AppTally) -> list[int]:
    """Few shards, coverage ≥ MIN_COVERAGE in each, that between them hold every quarantine reason such
    shards hold; the first one holds the most."""
    candidates = [shard for shard in range(app_rules.SHARDS) if covered(tally, shard)]
    wanted = set().union(*(reasons_in(tally, shard) for shard in candidates))
    chosen: list[int] = []
    while wanted:
        best = max(candidates, key=lambda shard: len(reasons_in(tally, shard) & wanted))
        chosen.append(best)
        wanted -= reasons_in(tally, best)
    return chosen


# --- the world: migrated once per module -------------------------------------------------------


@dataclass
class World:
    setup: Setup
    shards: list[str]

    @property
    def shard(self) -> str:
        return self.shards[0]

    def verify(self, entity: str, shard: str | None = None, page_size: int = PAGE) -> Report:
        s = self.setup
        with LocalMediaSource(str(s.media_root)) as media:
            return verify_app_partition(
                entity,
                shard or self.shard,
                django=s.django,
                firestore_client=s.client,
                state=s.state,
                media=media,
                blobs=s.blobs,
                page_size=page_size,
            )

    def documents(self, entity: str) -> dict[int, dict[str, Any]]:
        return {
            i: {k: v for k, v in d.items() if k != "_updated"}
            for i, d in self.setup.documents(entity, self.shard).items()
        }

    def blob_path(self, document: dict[str, Any]) -> Path:
        return Path(self.setup.blobs.root) / app_rules.blob_key(document["user_id"], document["file_id"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, firestore_emulator: str) -> Iterator[World]:
    from demo.firestore_emulator import clear_documents

    project = f"verify-{uuid.uuid4().hex[:8]}"
    with contextmanager(_fresh_database)(POSTGRES_ADMIN, "verify") as url:
        setup = Setup(url, tmp_path_factory.mktemp("verify"), firestore_emulator, project)
        try:
            shards = [app_rules.shard_key(number) for number in chosen_shards(setup.tally)]
            for shard in shards:
                setup.run_shard(shard, f"migrate-{shard}")
            yield World(setup, shards)
        finally:
            setup.django.dispose()
            clear_documents(firestore_emulator, project)


def outcomes(report: Report) -> dict[str, tuple[bool, str, dict[str, Any]]]:
    return {
        o.check: (o.passed, o.severity, o.metadata) for o in report.outcomes(["coverage", "integrity"], MIN_COVERAGE)
    }


def assert_clean(report: Report) -> None:
    result = outcomes(report)
    assert result["coverage"][:2] == (True, "ERROR"), result["coverage"][2]
    assert result["integrity"][:2] == (True, "ERROR"), result["integrity"][2]


FINDINGS = ("mismatched", "unexpected", "duplicates")


def integrity_findings(report: Report) -> dict[str, list[int]]:
    """Each integrity finding with a count, as its sample ids (the count must equal the sample's length:
    the tamperings here are smaller than a sample)."""
    metadata = report.integrity_metadata()
    found = {}
    for name in (*FINDINGS, *(problem.replace(":", "_") for problem in report.problems)):
        if metadata[name]:
            assert metadata[name] == len(metadata[f"{name}_sample_ids"])
            found[name] = metadata[f"{name}_sample_ids"]
    return found


@pytest.fixture
def shard(world: World) -> Iterator[World]:
    """The world for one tampering; afterwards its shard must verify clean again (the tampering undone)."""
    yield world
    for entity in ENTITIES:
        assert_clean(world.verify(entity))


# --- tampering, undone on the way out -----------------------------------------------------------


@contextmanager
def document_set(world: World, path: str, data: dict[str, Any] | None) -> Iterator[dict[str, Any] | None]:
    """The document at ``path`` replaced by ``data`` (deleted when None); what was there is put back."""
    reference = world.setup.client.document(path)
    before = reference.get().to_dict()
    if data is None:
        reference.delete()
    else:
        reference.set(data)
    try:
        yield before
    finally:
        if before is None:
            reference.delete()
        else:
            reference.set(before)


@contextmanager
def blob_replaced(path: Path, data: bytes | None) -> Iterator[None]:
    before = path.read_bytes()
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)
    try:
        yield
    finally:
        path.write_bytes(before)


@contextmanager
def source_updated(world: World, entity: str, legacy_id: int, column: str, value: Any) -> Iterator[None]:
    table = django_schema.SOURCES[entity]
    with world.setup.django.begin() as conn:
        before = conn.scalar(select(table.c[column]).where(table.c.id == legacy_id))
        conn.execute(update(table).where(table.c.id == legacy_id).values({column: value}))
    try:
        yield
    finally:
        with world.setup.django.begin() as conn:
            conn.execute(update(table).where(table.c.id == legacy_id).values({column: before}))


@contextmanager
def quarantine_row_deleted(world: World, entity: str, legacy_id: int) -> Iterator[None]:
    q = schema.quarantine
    mine = (q.c.entity == entity, q.c.partition_key == world.shard, q.c.legacy_id == legacy_id)
    with world.setup.state.begin() as conn:
        row = dict(conn.execute(select(q).where(*mine)).mappings().one())
        conn.execute(delete(q).where(*mine))
    try:
        yield
    finally:
        with world.setup.state.begin() as conn:
            conn.execute(insert(q).values(**row))


def first(documents: dict[int, dict[str, Any]], where: Callable[[dict[str, Any]], bool] = lambda _: True) -> int:
    found = sorted(i for i, document in documents.items() if where(document))
    assert found, "the generated shard has no such document"
    return found[0]


# --- a clean migration -------------------------------------------------------------------------


@integration
def test_a_clean_migration_passes_coverage_and_integrity_with_the_built_counts(world: World) -> None:
    tally = world.setup.tally
    assert {*app_rules.FILE_REASONS, app_rules.INVALID_USERNAME, app_rules.ORPHAN_FILE} <= set().union(
        *(reasons_in(tally, app_rules.shard_number(shard)) for shard in world.shards)
    )  # between them the shards quarantine for every file reason, and for users and filters
    for shard in world.shards:
        for entity in ENTITIES:
            report = world.verify(entity, shard)
            assert_clean(report)
            expected = tally.expected(entity, app_rules.shard_number(shard))
            coverage = report.coverage_metadata(MIN_COVERAGE)
            assert (coverage["eligible"], coverage["migrated"], coverage["missing"]) == (
                expected["eligible"], expected["migrated"], 0,
            )  # fmt: skip
            assert coverage["quarantined_by_reason"] == expected["quarantined"]
            assert report.stored == expected["migrated"] and not report.problems
            whole = world.verify(entity, shard, page_size=1000)  # one page: the same report
            assert whole.coverage_metadata() == report.coverage_metadata()
            assert whole.integrity_metadata() == report.integrity_metadata()
    files = world.verify("files")
    assert files.coverage < 0.99
    [coverage] = files.outcomes(["coverage"], 0.99)  # below the minimum: a warning, not an error
    assert (coverage.passed, coverage.severity) == (False, "WARN")


# --- each tampering, and what it makes ---------------------------------------------------------


@integration
def test_a_document_field_changed_under_its_stored_hash_is_a_mismatch(shard: World) -> None:
    documents = shard.documents("files")
    legacy_id = first(documents)
    tampered = {**documents[legacy_id], "file_name": "renamed in firestore.csv"}  # content_hash left alone
    with document_set(shard, f"files/{legacy_id}", tampered):
        result = outcomes(report := shard.verify("files"))
    assert result["coverage"][:2] == (True, "ERROR")
    assert result["integrity"][:2] == (False, "ERROR")
    assert integrity_findings(report) == {"mismatched": [legacy_id]}


@integration
def test_a_deleted_document_is_missing_from_coverage(shard: World) -> None:
    legacy_id = first(shard.documents("files"))
    with document_set(shard, f"files/{legacy_id}", None):
        result = outcomes(report := shard.verify("files"))
    passed, severity, metadata = result["coverage"]
    assert (passed, severity, metadata["missing"], metadata["missing_sample_ids"]) == (False, "ERROR", 1, [legacy_id])
    assert result["integrity"][0] and integrity_findings(report) == {}


@integration
def test_an_extra_document_in_the_shard_is_unexpected(shard: World) -> None:
    documents = shard.documents("files")
    extra = 9_000_000 + first(documents)  # no such row: the same user's file, under another legacy id
    copy = {**documents[first(documents)], "legacy_id": extra}
    with document_set(shard, f"files/{extra}", copy):
        result = outcomes(report := shard.verify("files"))
    assert result["coverage"][0]
    assert not result["integrity"][0] and integrity_findings(report) == {"unexpected": [extra]}
    assert report.stored == len(documents) + 1


@integration
def test_documents_that_are_not_where_their_legacy_id_says_are_malformed(shard: World) -> None:
    documents = shard.documents("files")
    legacy_id = first(documents)
    elsewhere = 9_100_000 + legacy_id
    nameless = {k: v for k, v in documents[legacy_id].items() if k != "legacy_id"}
    with (
        document_set(shard, f"files/{elsewhere}", documents[legacy_id]),  # a copy under another id
        document_set(shard, "files/no-legacy-id", nameless),  # not in the ordered query: counted
    ):
        result = outcomes(report := shard.verify("files"))
    assert result["coverage"][0] and not result["integrity"][0]
    metadata = result["integrity"][2]
    assert (metadata["malformed_id"], metadata["malformed_id_sample_ids"]) == (2, [elsewhere])
    assert metadata["failures"] == 2 and report.stored == len(documents)


@integration
def test_files_of_a_user_whose_document_is_gone_dangle(shard: World) -> None:
    documents = shard.documents("files")
    user_id = documents[first(documents)]["user_id"]
    theirs = sorted(i for i, document in documents.items() if document["user_id"] == user_id)
    with document_set(shard, f"users/{user_id}", None):
        result = outcomes(report := shard.verify("files"))
    assert result["coverage"][0] and not result["integrity"][0]
    # the source now quarantines them too (ORPHAN_USER): stored although §6 would not migrate them
    assert integrity_findings(report) == {"dangling_user": theirs, "unexpected": theirs}


@integration
def test_a_file_pointing_to_a_user_that_does_not_exist_dangles(shard: World) -> None:
    documents = shard.documents("files")
    legacy_id = first(documents)
    tampered = {**documents[legacy_id], "user_id": 9_999_984}  # same shard, no such user
    with document_set(shard, f"files/{legacy_id}", tampered):
        report = shard.verify("files")
    # its blob is looked for under the user it names, so it is missing too
    assert integrity_findings(report) == {
        "mismatched": [legacy_id], "dangling_user": [legacy_id], "blob_missing": [legacy_id],
    }  # fmt: skip


@integration
def test_a_filter_whose_file_document_is_gone_dangles(shard: World) -> None:
    filters = shard.documents("filters")
    file_id = filters[first(filters, lambda d: d["file_id"] is not None)]["file_id"]
    theirs = sorted(i for i, document in filters.items() if document["file_id"] == file_id)
    with document_set(shard, f"files/{file_id}", None):
        result = outcomes(report := shard.verify("filters"))
    assert result["coverage"][0] and not result["integrity"][0]
    assert integrity_findings(report) == {"dangling_file": theirs, "unexpected": theirs}


@integration
def test_a_blob_whose_bytes_changed_is_reported(shard: World) -> None:
    documents = shard.documents("files")
    legacy_id = first(documents)
    path = shard.blob_path(documents[legacy_id])
    original = path.read_bytes()
    same_size = bytes([original[0] ^ 1]) + original[1:]
    for changed in (same_size, original + b"x\n"):
        with blob_replaced(path, changed):
            result = outcomes(report := shard.verify("files"))
        assert result["coverage"][0] and not result["integrity"][0]
        assert integrity_findings(report) == {"blob_changed": [legacy_id]}


@integration
def test_a_deleted_blob_is_missing(shard: World) -> None:
    documents = shard.documents("files")
    legacy_id = first(documents)
    with blob_replaced(shard.blob_path(documents[legacy_id]), None):
        result = outcomes(report := shard.verify("files"))
    assert result["coverage"][0] and not result["integrity"][0]
    assert integrity_findings(report) == {"blob_missing": [legacy_id]}


@integration
def test_a_blob_url_that_does_not_name_the_blob_is_reported(shard: World) -> None:
    documents = shard.documents("files")
    legacy_id = first(documents)
    moved = {**documents[legacy_id], "blob_url": documents[legacy_id]["blob_url"] + ".old"}
    with document_set(shard, f"files/{legacy_id}", moved):
        result = outcomes(report := shard.verify("files"))
    assert result["coverage"][0] and not result["integrity"][0]
    assert integrity_findings(report) == {"blob_url": [legacy_id]}  # blob_url is not hashed: only this says it


@integration
@pytest.mark.parametrize(("entity", "column"), [("users", "first_name"), ("files", "file_name"), ("filters", "name")])
def test_a_source_row_updated_after_the_migration_is_a_mismatch(shard: World, entity: str, column: str) -> None:
    legacy_id = first(shard.documents(entity))
    with source_updated(shard, entity, legacy_id, column, "Changed After Migration"):
        result = outcomes(report := shard.verify(entity))
    assert result["coverage"][0] and not result["integrity"][0]
    assert integrity_findings(report) == {"mismatched": [legacy_id]}


@integration
def test_a_deleted_quarantine_row_is_missing_from_coverage(shard: World) -> None:
    built = shard.setup.expected_fates("files", shard.shard)
    legacy_id = min(i for i, fate in built.items() if fate != MIGRATED)
    with quarantine_row_deleted(shard, "files", legacy_id):
        result = outcomes(report := shard.verify("files"))
    passed, severity, metadata = result["coverage"]
    assert (passed, severity, metadata["missing_sample_ids"]) == (False, "ERROR", [legacy_id])
    assert result["integrity"][0] and integrity_findings(report) == {}


@integration
def test_a_blank_recorded_sha256_is_computed_by_the_run_as_by_the_check(world: World) -> None:
    """§6: a NULL (here blank: CHAR(64) hands back spaces) recorded sha256 is computed, not a mismatch —
    in a real run's copy as in the dry-run reading the check shares."""
    s = world.setup
    number = next(n for n in range(app_rules.SHARDS) if app_rules.shard_key(n) not in world.shards)
    other = app_rules.shard_key(number)
    user_id = min(i for i, fate in s.expected_fates("users", other).items() if fate == MIGRATED)
    (s.media_root / "uploads" / "blank-sha.csv").write_bytes(b"a,b\n1,2\n")
    savedfile = django_schema.savedfile
    with s.django.begin() as conn:
        legacy_id = conn.scalar(
            insert(savedfile)
            .values(user_id=user_id, file_id=str(uuid.uuid4()), file_name="blank.csv",
                    file_path="uploads/blank-sha.csv", uploaded_at=datetime.now(UTC), system_tags=[], user_tags=[],
                    metadata={}, size_bytes=None, sha256="", updated_at=datetime.now(UTC))
            .returning(savedfile.c.id)
        )  # fmt: skip
    s.run("users", other, f"users-{other}")
    s.run("files", other, f"files-{other}")
    assert legacy_id in s.documents("files", other) and legacy_id not in s.quarantine("files", other)
    report = world.verify("files", other)
    assert report.missing.count == 0 and report.integrity_failures == 0
    assert report.migrated == len(s.documents("files", other))


# --- the pure parts ------------------------------------------------------------------------------


def test_a_record_key_is_an_integer_legacy_id_that_is_also_the_document_id() -> None:
    assert record_key("12", {"legacy_id": 12}) == 12
    assert record_key("13", {"legacy_id": 12}) is None  # stored elsewhere than its id says
    assert record_key("12", {"legacy_id": "12"}) is None
    assert record_key("1", {"legacy_id": True}) is None
    assert record_key("12", {"legacy_id": 12.0}) is None
    assert record_key("12", {}) is None


def test_a_stored_record_names_its_dangling_references_and_hashes_its_fields() -> None:
    document = {"legacy_id": 5, "user_id": 3, "file_id": 9, "name": "a", "definition": {}, "created_at": None,
                "updated_at": None, "content_hash": "not trusted", "shard": "shard-03"}  # fmt: skip
    record = stored_record("filters", 5, document, users={3}, files={9})
    assert record == (5, app_rules.document_hash("filters", document), ())
    assert stored_record("filters", 5, document, users=set(), files={9}).problems == (DANGLING_USER,)
    assert stored_record("filters", 5, document, users={3}, files=set()).problems == (DANGLING_FILE,)
    assert stored_record("filters", 5, {**document, "file_id": None}, users={3}).problems == ()
    assert stored_record("filters", 5, {**document, "user_id": "3"}, users={3}, files={9}).problems == (DANGLING_USER,)
    assert stored_record("users", 3, {"legacy_id": 3, "user_id": 77}).problems == ()  # users have no parents
    file = stored_record("files", 7, {"legacy_id": 7, "user_id": 3}, users={3}, blob=BLOB_CHANGED)
    assert file.problems == (BLOB_CHANGED,)
    assert stored_record("files", 7, {"legacy_id": 7, "user_id": 3, "x": b"?"}, users={3}).digest is None


def test_a_blob_verdict_reads_the_bytes_only_when_the_size_agrees() -> None:
    document = {"size_bytes": 4, "sha256": "ab" * 32}

    def unread() -> str:
        raise AssertionError("the bytes were read")

    assert blob_verdict(document, None, unread) == BLOB_MISSING
    assert blob_verdict(document, 5, unread) == BLOB_CHANGED
    assert blob_verdict({**document, "size_bytes": "4"}, 4, unread) == BLOB_CHANGED
    assert blob_verdict(document, 4, lambda: "ab" * 32) is None
    assert blob_verdict(document, 4, lambda: "cd" * 32) == BLOB_CHANGED
    assert blob_verdict(document, 4, lambda: None) == BLOB_MISSING  # gone between the two looks


@pytest.mark.parametrize(("entity", "shard"), [("patients", "shard-01"), ("files", "shard-16"), ("users", "HSJ")])
def test_a_bad_entity_or_shard_is_refused_before_anything_is_read(entity: str, shard: str) -> None:
    with pytest.raises(ValueError) as refused:
        verify_app_partition(entity, shard, django=None, firestore_client=None, state=None)  # type: ignore[arg-type]
    assert shard not in str(refused.value)  # a partition key from outside is never echoed
    with pytest.raises(ValueError, match="media source and a blob store"):
        verify_app_partition("files", "shard-01", django=None, firestore_client=None, state=None)  # type: ignore[arg-type]
