"""Rolling back one run (issue 10 item 3): the plan, the clinical target and the app's Firestore + blobs.

Real services: MariaDB (the legacy clinical source), PostgreSQL (clinical target, control DB, Django DB),
Google's Firestore emulator. The plan's logic alone is also tested on a SQLite control DB.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, text

from demo.legacy_data import generate
from migration_assets import registry
from migration_assets.app.rollback import apply_app
from worker import app_rules, cli, schema
from worker.engine import Migration
from worker.params import RunParameters
from worker.rollback import (
    PARENTS,
    ROLLED_BACK,
    LedgerEntry,
    RollbackRefused,
    apply_clinical,
    plan_rollback,
    steps_of,
)

from .test_app import Setup, busiest_shard

SISTEMA = "HSJ"


# --- the plan as logic --------------------------------------------------------------------------------


def test_parents_agree_with_the_registry() -> None:
    assert {e.name: e.parents for e in registry.ENTITIES} == PARENTS


def test_a_record_touched_twice_goes_back_to_its_state_before_the_run() -> None:
    entries = [
        LedgerEntry(1, 10, "100", "updated", {"v": "before the run"}),
        LedgerEntry(2, 11, "101", "inserted"),
        LedgerEntry(3, 12, "102", "deleted", {"v": "deleted"}),
        LedgerEntry(4, 10, "100", "updated", {"v": "written by the run's first attempt"}),
        LedgerEntry(5, 11, "101", "deleted", {"v": "inserted by the run"}),
        LedgerEntry(6, 11, "105", "inserted"),
    ]
    steps = {s.legacy_id: s for s in steps_of(entries)}
    assert [s.legacy_id for s in steps_of(entries)] == [11, 10, 12]  # latest change first
    assert steps[10].undo == "restore" and steps[10].previous == {"v": "before the run"}
    assert steps[11].undo == "delete" and steps[11].target_ids == ("105", "101") and steps[11].previous is None
    assert steps[12].undo == "reinsert" and steps[12].previous == {"v": "deleted"}


def _control_db(tmp_path: Path) -> Engine:
    state = schema.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    schema.create_schemas(state, schema.state_metadata)
    return state


def _run(conn: Any, entity: str, run_id: str, started: datetime, status: str = "succeeded", dry: bool = False) -> None:
    conn.execute(
        insert(schema.runs).values(
            run_id=run_id, entity=entity, partition_key=SISTEMA, usuario="ana", parameters={}, mode="full",
            dry_run=dry, status=status, started_at=started,
        )
    )  # fmt: skip


def _ledger(conn: Any, entity: str, run_id: str, legacy_id: int, action: str, at: datetime) -> None:
    previous = None if action == "inserted" else {"id": legacy_id}
    conn.execute(
        insert(schema.ledger).values(
            entity=entity, partition_key=SISTEMA, legacy_id=legacy_id, target_id=str(legacy_id), action=action,
            previous=previous, run_id=run_id, at=at,
        )
    )  # fmt: skip


def test_the_plan_refuses_while_a_later_run_or_a_child_run_is_not_rolled_back(tmp_path: Path) -> None:
    state = _control_db(tmp_path)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with state.begin() as conn:
        _run(conn, "patients", "A", t0)
        _ledger(conn, "patients", "A", 1, "inserted", t0)
        _ledger(conn, "patients", "A", 2, "inserted", t0)
        _run(conn, "patients", "B", t0 + timedelta(hours=1))
        _ledger(conn, "patients", "B", 2, "updated", t0 + timedelta(hours=1))
        _ledger(conn, "patients", "B", 3, "inserted", t0 + timedelta(hours=1))
        _run(conn, "patients", "DRY", t0 + timedelta(hours=2), dry=True)
        _run(conn, "encounters", "E1", t0 + timedelta(minutes=30))
        _ledger(conn, "encounters", "E1", 7, "inserted", t0 + timedelta(minutes=30))
        _run(conn, "encounters", "E2", t0 + timedelta(hours=3))
        _ledger(conn, "encounters", "E2", 8, "inserted", t0 + timedelta(hours=3))
    latest = plan_rollback(state, "patients", SISTEMA, None)
    assert latest.run_id == "B"  # the dry run is not a candidate
    assert latest.counts == {"inserted": 1, "updated": 1, "deleted": 0}
    assert latest.refusal and "E2 (encounters)" in latest.refusal and "E1" not in latest.refusal
    first = plan_rollback(state, "patients", SISTEMA, "A")
    assert first.refusal and "B" in first.blocking_runs and "encounters:E2" in first.blocking_runs
    with state.begin() as conn:
        conn.execute(schema.runs.update().where(schema.runs.c.run_id == "E2").values(status=ROLLED_BACK))
    assert plan_rollback(state, "patients", SISTEMA, "B").refusal is None
    with state.begin() as conn:
        conn.execute(schema.runs.update().where(schema.runs.c.run_id == "B").values(status=ROLLED_BACK))
    blocked = plan_rollback(state, "patients", SISTEMA, "A")  # its encounters came after it, too
    assert blocked.blocking_runs == ("encounters:E1",)
    with state.begin() as conn:
        conn.execute(schema.runs.update().where(schema.runs.c.run_id == "E1").values(status=ROLLED_BACK))
    assert plan_rollback(state, "patients", SISTEMA, "A").refusal is None
    assert plan_rollback(state, "patients", SISTEMA, "B").already_rolled_back
    assert plan_rollback(state, "patients", SISTEMA, "DRY").refusal
    with pytest.raises(RollbackRefused, match="no run NOPE"):
        plan_rollback(state, "patients", SISTEMA, "NOPE")


# --- clinical: PostgreSQL target ----------------------------------------------------------------------


class FailingMigration(Migration):
    """A run that dies (like a killed worker) at its ``fail_at``-th batch, earlier batches committed."""

    fail_at = 3

    def _apply_batch(self, *args: Any, **kwargs: Any) -> bool:
        self.batches = getattr(self, "batches", 0) + 1
        if self.batches == self.fail_at:
            raise RuntimeError("killed mid-way")
        return super()._apply_batch(*args, **kwargs)


def _rows(engine: Engine, table: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table).order_by(table.c.id)).mappings()]


def _state(engine: Engine) -> dict[str, Any]:
    """Every control table, row for row (what a dry run must leave alone)."""
    return {t.name: _rows_any(engine, t) for t in schema.state_metadata.tables.values()}


def _rows_any(engine: Engine, table: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return sorted((dict(r) for r in conn.execute(select(table)).mappings()), key=repr)


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, *argv: str
) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"target_db_url": url})))
    code = cli.main(["rollback", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.integration
def test_clinical_rollback_restores_the_target_field_for_field(
    mariadb_url: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
    generate(legacy, patients_per_sistema=40, encounters_per_patient=1, sistemas=(SISTEMA,), seed=5)
    params = RunParameters(entity="patients", sistema=SISTEMA, usuario="ana", run_id="run-a", batch_size=5)
    Migration(params, legacy, target).run()
    patients, pacientes = schema.patients, schema.pacientes
    migrated = [r["legacy_id"] for r in _rows(target, patients)]
    changed, gone = migrated[:3], migrated[3]
    with legacy.begin() as conn:
        later = datetime(2030, 1, 1)
        for legacy_id in changed:
            conn.execute(
                pacientes.update().where(pacientes.c.id == legacy_id).values(nombres="Otro", actualizado_en=later)
            )
        conn.execute(pacientes.update().where(pacientes.c.id == gone).values(eliminado=1, actualizado_en=later))
        model = dict(conn.execute(select(pacientes).where(pacientes.c.id == migrated[4])).mappings().one())
        new_id = int(conn.scalar(text("SELECT max(id) FROM pacientes"))) + 1
        conn.execute(insert(pacientes).values({**model, "id": new_id, "documento": f"ZZ{new_id}"}))
    before = _rows(target, patients)
    result = Migration(replace(params, run_id="run-b"), legacy, target).run()
    assert (result.counts.updated, result.counts.deleted, result.counts.inserted) == (3, 1, 1)
    assert _rows(target, patients) != before

    # a manual rollback without --confirm: the plan, one JSON line, nothing written
    target_after_b, state_after_b = _rows(target, patients), _state(target)
    code, out, _ = _cli(monkeypatch, capsys, postgres_url, "--entity", "patients", "--sistema", SISTEMA)
    plan = json.loads(out)
    assert code == 0 and plan["dry_run"] and plan["run_id"] == "run-b" and plan["refusal"] is None
    assert plan["ledger_rows"] == {"inserted": 1, "updated": 3, "deleted": 1} and plan["records"] == 5
    assert _rows(target, patients) == target_after_b and _state(target) == state_after_b

    # run A cannot go while run B (which changed A's records) stands: the plan says why, then one error line
    code, out, err = _cli(monkeypatch, capsys, postgres_url, "--entity", "patients", "--sistema", SISTEMA,
                          "--run-id", "run-a")  # fmt: skip
    assert code == 2 and json.loads(out)["blocking_runs"] == ["run-b"] and err.startswith("VALIDATION_ERROR: ")
    code, out, err = _cli(monkeypatch, capsys, postgres_url, "--entity", "patients", "--sistema", SISTEMA,
                          "--run-id", "run-a", "--confirm")  # fmt: skip
    assert code == 2 and out == "" and err.startswith("VALIDATION_ERROR: ") and "run-b" in err
    assert len(err.strip().splitlines()) == 1
    assert _rows(target, patients) == target_after_b

    code, out, _ = _cli(monkeypatch, capsys, postgres_url, "--entity", "patients", "--sistema", SISTEMA,
                        "--run-id", "run-b", "--confirm")  # fmt: skip
    done = json.loads(out)
    assert code == 0 and done["status"] == ROLLED_BACK
    assert (done["deleted"], done["restored"], done["reinserted"]) == (1, 3, 1)
    assert _rows(target, patients) == before  # every column, content_hash, run_id, migrated_at included
    with target.connect() as conn:
        assert conn.scalar(text("SELECT status FROM migration.runs WHERE run_id = 'run-b'")) == ROLLED_BACK
        assert conn.scalar(text("SELECT count(*) FROM migration.checkpoints")) == 0

    # twice: a no-op
    again = apply_clinical(plan_rollback(target, "patients", SISTEMA, "run-b"), target, target)
    assert again.status == "already_rolled_back" and _rows(target, patients) == before

    # a run that fails mid-way, then a rollback of the latest run: the target as before that run
    with pytest.raises(RuntimeError, match="killed mid-way"):
        FailingMigration(replace(params, run_id="run-c"), legacy, target).run()
    assert _rows(target, patients) != before
    latest = plan_rollback(target, "patients", SISTEMA, None)
    assert latest.run_id == "run-c" and latest.status == "failed" and latest.refusal is None
    assert apply_clinical(latest, target).status == ROLLED_BACK
    assert _rows(target, patients) == before

    # with run B and C rolled back, run A may go: the partition is empty again
    assert apply_clinical(plan_rollback(target, "patients", SISTEMA, "run-a"), target).status == ROLLED_BACK
    assert _rows(target, patients) == []
    assert plan_rollback(target, "patients", SISTEMA, None).run_id is None


# --- app: Firestore documents and blobs ---------------------------------------------------------------


@pytest.fixture
def app(postgres_url: str, tmp_path: Path, firestore_emulator: str, firestore_project: str) -> Iterator[Setup]:
    yield Setup(postgres_url, tmp_path, firestore_emulator, firestore_project)


def _blobs(root: Path) -> dict[str, bytes]:
    """The blobs at their keys (the run's kept copies under previous/ aside)."""
    files = root / "files"
    return {str(p.relative_to(root)): p.read_bytes() for p in files.rglob("*") if p.is_file()} if files.exists() else {}


def _documents(app: Setup, shard: str) -> dict[int, dict[str, Any]]:
    return {i: {k: v for k, v in d.items() if k != "_updated"} for i, d in app.documents("files", shard).items()}


@pytest.mark.integration
def test_app_rollback_restores_documents_and_blobs(app: Setup) -> None:
    shard = busiest_shard(app.tally)
    app.run("users", shard, "users-a")
    app.run("files", shard, "files-a")
    documents = _documents(app, shard)
    ids = sorted(documents)
    changed, gone = ids[0], ids[1]
    f = "list_cutter_savedfile"
    with app.django.begin() as conn:
        path = conn.exec_driver_sql(f"SELECT file_path FROM {f} WHERE id = {changed}").scalar()
        (app.media_root / path).write_bytes(b"a,b\n1,2\n")  # new content, so a new blob
        conn.exec_driver_sql(f"UPDATE {f} SET sha256 = NULL WHERE id = {changed}")
        conn.exec_driver_sql(f"DELETE FROM {f} WHERE id = {gone}")
        model = dict(conn.execute(text(f"SELECT * FROM {f} WHERE id = {ids[2]}")).mappings().one())
        content = b"x,y\n3,4\n"
        (app.media_root / "uploads" / "rollback-new.csv").parent.mkdir(parents=True, exist_ok=True)
        (app.media_root / "uploads" / "rollback-new.csv").write_bytes(content)
        new_id = int(conn.exec_driver_sql(f"SELECT max(id) FROM {f}").scalar()) + 1
        model |= {"id": new_id, "file_id": uuid.uuid4(), "file_path": "uploads/rollback-new.csv",
                  "size_bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}  # fmt: skip
        model = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in model.items()}
        names = ", ".join(model)
        conn.execute(text(f"INSERT INTO {f} ({names}) VALUES ({', '.join(':' + k for k in model)})"), model)
    before, blobs_before = _documents(app, shard), _blobs(app.blob_root)
    result = app.run("files", shard, "files-b", allow_mass_delete=True)
    assert (result.counts.updated, result.counts.deleted, result.counts.inserted) == (1, 1, 1)
    assert _documents(app, shard) != before and _blobs(app.blob_root) != blobs_before

    # without confirm (the plan alone): nothing written
    after_b, blobs_after_b, state_after_b = _documents(app, shard), _blobs(app.blob_root), _state(app.state)
    plan = plan_rollback(app.state, "files", shard, None)
    assert plan.run_id == "files-b" and plan.refusal is None
    assert plan.counts == {"inserted": 1, "updated": 1, "deleted": 1}
    assert _documents(app, shard) == after_b and _blobs(app.blob_root) == blobs_after_b
    assert _state(app.state) == state_after_b
    # users cannot go before their files
    refused = plan_rollback(app.state, "users", shard, None)
    assert refused.refusal and "files-b (files)" in refused.refusal

    done = apply_app(plan, app.firestore, app.blobs, app.state)
    assert (done.status, done.deleted, done.restored, done.reinserted) == (ROLLED_BACK, 1, 1, 1)
    assert (done.blobs_restored, done.blobs_deleted) == (2, 1)  # kept copies back; the inserted file's blob gone
    assert _documents(app, shard) == before  # every field, timestamps included
    assert _blobs(app.blob_root) == blobs_before
    assert app_rules.blob_key(before[changed]["user_id"], before[changed]["file_id"]) in blobs_before
    assert apply_app(plan, app.firestore, app.blobs, app.state).status == "already_rolled_back"
    assert _documents(app, shard) == before and _blobs(app.blob_root) == blobs_before
