"""Undo one app run (users, files, filters of one shard) from the ledger: Firestore documents and blobs.

The plan is worker/rollback.py's (:func:`worker.rollback.plan_rollback`: the ledger is in the control DB),
and so are its refusals and what the control DB records afterwards (see that module). Here the steps
become Firestore writes and blob copies, under the shard's writer lock (re-checked before the commit):

- a record the run inserted: its document is deleted and, for ``files``, the blob at the document's key
  (the run wrote it: an inserted file's blob is copied without a backup);
- a record the run updated or deleted: the previous document (``from_ledger``) is set whole (a ``set``,
  never a merge), so every field is as it was; for ``files`` the blob the run kept under
  ``previous/<run_id>/<key>`` (the ledger's ``previous["blob"]``) is copied back over ``<key>``. An updated
  file with no kept blob whose content changed had no blob at that key before the run (``_file`` keeps
  whatever is there): the blob the run wrote is deleted.

Blobs are put back before documents, so a rollback that fails half-way can simply be run again (every
step is idempotent; the kept copies stay where they are, for a later run of the rollback).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine

from migration_assets.app.migrate import BACKUP_PREFIX, from_ledger
from resources.blobstore import BlobStore
from resources.firestore import DocumentWriter, FirestoreResource, Write
from worker import app_rules, locks
from worker.params import InvalidParameters
from worker.rollback import ROLLED_BACK, RollbackPlan, RollbackResult, Step, finish, no_op, plan_on

APP_ENTITIES = ("users", "files", "filters")


def apply_app(
    plan: RollbackPlan,
    firestore: FirestoreResource | DocumentWriter,
    blobs: BlobStore | None,
    state: Engine,
    *,
    lock_wait_seconds: float = 120.0,
) -> RollbackResult:
    """Undo ``plan``'s run in Firestore (and the blob store, for files), then record it in the control DB.
    The plan is made again under the shard's lock; a refusal raises :class:`worker.rollback.RollbackRefused`
    with nothing written."""
    if plan.entity not in APP_ENTITIES:
        raise InvalidParameters(f"entity must be one of {', '.join(APP_ENTITIES)}")
    if plan.entity == "files" and blobs is None:
        raise InvalidParameters("rolling back files needs the blob store")
    if (early := no_op(plan)) is not None:
        return early
    writer = firestore.writer() if isinstance(firestore, FirestoreResource) else firestore
    with state.connect() as conn, locks.exclusive(conn, plan.entity, plan.partition_key, lock_wait_seconds):
        fresh = plan_on(conn, plan.entity, plan.partition_key, plan.run_id)
        conn.rollback()
        if (late := no_op(fresh)) is not None:
            return late
        assert fresh.run_id is not None
        result = RollbackResult(plan.entity, plan.partition_key, fresh.run_id, ROLLED_BACK)
        paths = [path for step in fresh.steps for path in step.target_ids]
        current = writer.get_many(paths) if paths else {}
        writes: list[Write] = []
        for step in fresh.steps:
            if not step.target_ids:
                continue
            path = step.target_ids[0]  # a record's document path never changes
            if step.undo == "delete":
                if blobs is not None and plan.entity == "files":
                    _delete_written_blob(blobs, current.get(path), result)
                writes += [Write(p, None) for p in step.target_ids]
                result.deleted += 1
                continue
            previous = step.previous or {}
            document = from_ledger(previous.get("document"))
            if not isinstance(document, Mapping):
                raise RuntimeError(f"the ledger keeps no previous document for record {step.legacy_id}")
            if blobs is not None and plan.entity == "files":
                _restore_blob(blobs, fresh.run_id, step, document, current.get(path), result)
            writes.append(Write(path, dict(document)))
            if step.undo == "restore":
                result.restored += 1
            else:
                result.reinserted += 1
        if writes:
            locks.require_held(conn, plan.entity, plan.partition_key)
            writer.commit(writes)
        result.quarantine_deleted = finish(conn, fresh)
        conn.commit()
    return result


def _key(document: Mapping[str, Any]) -> str:
    return app_rules.blob_key(document["user_id"], document["file_id"])


def _delete_written_blob(blobs: BlobStore, document: Mapping[str, Any] | None, result: RollbackResult) -> None:
    """The blob an inserted file's document names (the run wrote it; gone already on a second attempt)."""
    if document is not None and blobs.delete(_key(document)):
        result.blobs_deleted += 1


def _restore_blob(
    blobs: BlobStore,
    run_id: str,
    step: Step,
    document: Mapping[str, Any],
    now: Mapping[str, Any] | None,
    result: RollbackResult,
) -> None:
    """Put back the blob of a file the run updated or deleted: its kept copy over its key; or, for an
    update whose content changed with nothing kept, delete the blob the run wrote where none was."""
    kept = (step.previous or {}).get("blob")
    if kept:
        prefix = f"{BACKUP_PREFIX}/{run_id}/"
        if not kept.startswith(prefix):
            raise RuntimeError(f"the kept blob of record {step.legacy_id} is not under this run's backups")
        if blobs.stat(kept) is not None:
            blobs.copy(kept, kept.removeprefix(prefix))
            result.blobs_restored += 1
        return
    if step.undo != "restore" or now is None or now.get("run_id") != run_id:
        return  # a deleted file whose blob was already gone, or a document already put back
    changed = _key(now) != _key(document) or now.get("sha256") != document.get("sha256")
    if changed and blobs.delete(_key(now)):
        result.blobs_deleted += 1
