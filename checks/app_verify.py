"""The app side of the ``coverage`` and ``integrity`` checks (DESIGN §7): the three streams of one entity
(``users``, ``files``, ``filters``) and one shard, compared by :func:`worker.verify.compare`.

- **source** (:func:`expected_records`): the shard's Django rows in id order, keyset pages of
  ``page_size``, each decided by the migration's own code (``migrate.source_page``, ``migrate.decide_row``;
  a file's content is read and hashed from the media source as a dry run reads it, nothing written); the
  parents a row names are looked up in Firestore, as the migration looks them up;
- **target** (:func:`stored_records`): the shard's Firestore documents in legacy-id order, pages of
  ``page_size`` (a query ``shard == …`` ordered by ``legacy_id``, continued with ``start_after``); each
  document's hash is recomputed from its stored fields (never its ``content_hash``), its references looked
  up a page at a time (``dangling:user``, ``dangling:file``) and, for files, its blob read back
  (``blob:missing``, ``blob:changed``);
- **quarantine** (worker/counts.py :func:`quarantine_frames`, as the clinical side reads it): the shard's
  ``migration.quarantine`` rows in legacy-id order.

A document the comparison cannot place — its ``legacy_id`` missing or not an integer, or its document id
not that integer (§6: "document ids are the legacy ids as strings") — is counted apart as
``malformed:id`` (an integrity failure) and the record it should be is then missing.

Memory is a page of each stream and the report's samples, whatever the shard's size. Nothing here logs;
the report holds counts and legacy ids only.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import islice
from typing import Any

from google.cloud import firestore
from sqlalchemy import Engine

from migration_assets.app.migrate import (
    Decision,
    Parents,
    decide_row,
    read_file_document,
    source_page,
)
from resources.blobstore import BlobStore
from resources.firestore import StoredDocument, count_shard, get_many, stream_collection
from resources.media import MediaSource, MissingBlob
from worker import app_rules, rules
from worker.counts import quarantine_frames
from worker.verify import SAMPLE, Expected, Finding, Report, Stored, compare_frames, expected_frames, stored_frames

PAGE_SIZE = 1000  # source rows, documents and quarantine rows read at a time
READERS = 2  # files hashed at once, from a media source that can open several (a local folder) and the blob store

DANGLING_USER = "dangling:user"
DANGLING_FILE = "dangling:file"
BLOB_MISSING = "blob:missing"
BLOB_CHANGED = "blob:changed"
BLOB_URL = "blob:url"
MALFORMED = "malformed:id"


def verify_app_partition(
    entity: str,
    shard: str,
    *,
    django: Engine,
    firestore_client: firestore.Client,
    state: Engine,
    media: MediaSource | None = None,
    blobs: BlobStore | None = None,
    page_size: int = PAGE_SIZE,
) -> Report:
    """Compare one app entity's shard: the Django DB through §6, Firestore (and the blob store), and the
    quarantine. ``media`` and ``blobs`` are needed for ``files`` only.

    Against real Firestore the target query needs the composite index (``shard`` ASC, ``legacy_id`` ASC)
    on each of the ``users``, ``files`` and ``filters`` collections; the emulator needs none."""
    if entity not in app_rules.APP_ENTITIES:
        raise ValueError(f"entity must be one of {', '.join(app_rules.APP_ENTITIES)}")
    number = app_rules.shard_number(shard)  # refuses anything but shard-00 … shard-15, without echoing it
    if entity == "files" and (media is None or blobs is None):
        raise ValueError("files need a media source and a blob store")
    if page_size < 1:
        raise ValueError("page_size must be positive")
    malformed = Finding()
    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="verify-read") as pool:
        report = compare_frames(
            expected_frames(
                expected_records(
                    entity, number, django, firestore_client, media=media, blobs=blobs, pool=pool, page_size=page_size
                )
            ),
            stored_frames(
                stored_records(
                    entity, shard, firestore_client, blobs=blobs, pool=pool, page_size=page_size, malformed=malformed
                )
            ),
            quarantine_frames(state, entity, shard, rows=page_size),
        )
    if malformed.count:
        report.problems[MALFORMED] = malformed
    return report


# --- the source ----------------------------------------------------------------------------------


def present(client: firestore.Client, collection: str, ids: Iterable[Any]) -> set[int]:
    """Which of ``ids`` have a document ``{collection}/{id}`` (only integer ids can: §6 document ids)."""
    wanted = sorted({i for i in ids if _is_int(i)})
    if not wanted:
        return set()
    found = get_many(client, [f"{collection}/{i}" for i in wanted], fields=["legacy_id"])
    return {i for i in wanted if found.get(f"{collection}/{i}") is not None}


def expected_records(
    entity: str,
    shard_number: int,
    django: Engine,
    client: firestore.Client,
    *,
    media: MediaSource | None,
    blobs: BlobStore | None,
    pool: ThreadPoolExecutor,
    page_size: int = PAGE_SIZE,
) -> Iterator[Expected]:
    """The shard's eligible rows through §6, in id order: each row's document hash, or its quarantine
    reason — the migration's decisions (``decide_row``; files as a dry run reads them, nothing written).
    A migrated parent is one whose document exists now, looked up once per page."""
    after = -1
    while rows := source_page(django, entity, shard_number, after, page_size):
        after = int(rows[-1]["id"])
        users = present(client, "users", (row["user_id"] for row in rows)) if entity != "users" else set()
        files = present(client, "files", (row["file_id"] for row in rows)) if entity == "filters" else set()
        parents = Parents(users, files)
        file: Callable[[Mapping[str, Any], Decision], dict[str, Any]] | None = None
        if entity == "files":
            assert media is not None and blobs is not None
            file = partial(_read_file, users=users, media=media, blobs=blobs)
        decide = partial(decide_row, entity, parents=parents, file=file)
        concurrent = entity == "files" and getattr(media, "concurrent_opens", False)
        decisions = pool.map(decide, rows) if concurrent else map(decide, rows)
        for decision in decisions:
            if decision.document is None:
                yield Expected(decision.legacy_id, None, decision.reason)
            else:
                yield Expected(decision.legacy_id, decision.digest)


def _read_file(
    row: Mapping[str, Any], _: Decision, *, users: set[int], media: MediaSource, blobs: BlobStore
) -> dict[str, Any]:
    return read_file_document(row, users, media, blobs)


# --- the target ----------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not a float that looks whole: Firestore keeps integers as such


def record_key(document_id: str, document: Mapping[str, Any]) -> int | None:
    """The legacy id a stored document is the record of, or None when it is malformed: its ``legacy_id``
    missing or not an integer, or its document id not that integer's decimal form."""
    key = document.get("legacy_id")
    return key if _is_int(key) and document_id == str(key) else None


def stored_record(
    entity: str,
    key: int,
    document: Mapping[str, Any],
    *,
    users: Container[int] = (),
    files: Container[int] = (),
    blob: str | None = None,
) -> Stored:
    """One stored document as the comparison sees it: the hash of its stored fields (None when a stored
    value cannot be hashed), and its problems — a reference to a user (files, filters) or a file (filters,
    when given) with no document (``users``/``files``: the referenced ids that have one), and ``blob``,
    what is wrong with a file's blob (:func:`blob_problem`)."""
    problems: list[str] = []
    if entity in ("files", "filters"):
        user_id = document.get("user_id")
        if not (_is_int(user_id) and user_id in users):
            problems.append(DANGLING_USER)
    if entity == "filters":
        file_id = document.get("file_id")
        if file_id is not None and not (_is_int(file_id) and file_id in files):
            problems.append(DANGLING_FILE)
    if blob is not None:
        problems.append(blob)
    try:
        digest: str | None = app_rules.document_hash(entity, document)
    except (TypeError, ValueError):  # a value the target was never given (bytes, a reference …)
        digest = None
    return Stored(key, digest, tuple(problems))


def blob_verdict(document: Mapping[str, Any], size: int | None, sha256: Callable[[], str | None]) -> str | None:
    """What is wrong with a file's blob: missing (``size`` None), or its bytes not those the document
    describes (a size other than ``size_bytes``; else ``sha256()``, read only then, other than ``sha256``
    or None when the blob went away meanwhile)."""
    if size is None:
        return BLOB_MISSING
    if not _is_int(document.get("size_bytes")) or size != document["size_bytes"]:
        return BLOB_CHANGED
    actual = sha256()
    if actual is None:
        return BLOB_MISSING
    return None if actual == document.get("sha256") else BLOB_CHANGED


def blob_problem(blobs: BlobStore, document: Mapping[str, Any]) -> str | None:
    """Look at the blob a file document names (``files/{user_id}/{file_id}``), streaming its bytes; when
    the blob is right but the document's ``blob_url`` does not say where it is, ``blob:url``."""
    try:
        key = app_rules.blob_key(document.get("user_id"), document.get("file_id"))
    except (rules.Quarantined, TypeError, ValueError):  # the document names no blob that could exist
        return BLOB_MISSING
    found = blobs.stat(key)

    def sha256() -> str | None:
        try:
            return blobs.sha256(key)
        except MissingBlob:
            return None

    verdict = blob_verdict(document, None if found is None else found.size, sha256)
    if verdict is None and document.get("blob_url") != blobs.url(key):  # not hashed: it names this target's store
        return BLOB_URL
    return verdict


def shard_pages(
    client: firestore.Client, collection: str, shard: str, page_size: int = PAGE_SIZE
) -> Iterator[list[StoredDocument]]:
    """The shard's documents of ``collection`` ordered by ``legacy_id``, ``page_size`` at a time (the cursor
    paging of :func:`resources.firestore.stream_collection`). Real Firestore needs the composite index
    (``shard`` ASC, ``legacy_id`` ASC) for this query; documents without a ``legacy_id`` field are not in
    it (:func:`stored_records` counts them)."""
    documents = stream_collection(client, collection, shard, order_by="legacy_id", page_size=page_size)
    while page := list(islice(documents, page_size)):
        yield page


def stored_records(
    entity: str,
    shard: str,
    client: firestore.Client,
    *,
    blobs: BlobStore | None,
    pool: ThreadPoolExecutor,
    malformed: Finding,
    page_size: int = PAGE_SIZE,
) -> Iterator[Stored]:
    """The shard's documents in legacy-id order as :func:`stored_record` sees them; the malformed ones
    (:func:`record_key`; those without ``legacy_id``, which the ordered query leaves out, by a count of
    the shard at the end) go to ``malformed`` instead."""
    if entity == "files" and blobs is None:
        raise ValueError("files need a blob store")
    listed = 0
    for page in shard_pages(client, entity, shard, page_size):
        listed += len(page)
        keyed: list[tuple[int, dict[str, Any]]] = []
        for stored in page:
            document = stored.data
            key = record_key(stored.id, document)
            if key is None:
                malformed.count += 1
                if stored.id.isdecimal() and len(malformed.sample) < SAMPLE:
                    malformed.sample.append(int(stored.id))
                continue
            keyed.append((key, document))
        documents = [document for _, document in keyed]
        users = present(client, "users", (d.get("user_id") for d in documents)) if entity != "users" else set()
        files = present(client, "files", (d.get("file_id") for d in documents)) if entity == "filters" else set()
        if entity == "files":
            assert blobs is not None
            verdicts: Iterable[str | None] = pool.map(partial(blob_problem, blobs), documents)
        else:
            verdicts = [None] * len(documents)
        for (key, document), blob in zip(keyed, verdicts, strict=True):
            yield stored_record(entity, key, document, users=users, files=files, blob=blob)
    unlisted = count_shard(client, entity, shard) - listed
    if unlisted > 0:
        malformed.count += unlisted
