"""Clinical path hardening on real MariaDB, PostgreSQL and sshd: the lock, reproducible hashes, the
mass-delete guard. Each test fails on the code before its fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, delete, event, func, insert, select, text, update

from demo.legacy_data import generate
from demo.sshd import SSHServer
from worker import engine as engine_module
from worker import rules, schema, store
from worker.engine import Migration
from worker.params import RunParameters, validate

from .conftest import WORKER_COMMAND, patients_snapshot
from .test_clinical import Clinical, metadata

pytestmark = pytest.mark.integration

# Advisory locks of this test's own database: other databases on the same server (another test, a
# benchmark) may hold advisory locks of their own at the same time.
THIS_DATABASE = "locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"


def worker_argv(entity: str, run_id: str, batch_size: int = 20, *extra: str) -> list[str]:
    return [WORKER_COMMAND, "migrate", "--entity", entity, "--sistema", "HSJ", "--usuario", "ana",
            "--run-id", run_id, "--batch-size", str(batch_size), *extra]  # fmt: skip


def start_worker(argv: list[str], legacy_url: str, target_url: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    assert process.stdin is not None
    process.stdin.write(json.dumps({"legacy_db_url": legacy_url, "target_db_url": target_url}))
    process.stdin.close()
    return process


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        try:
            return conn.execute(text(sql), params).scalar()
        except Exception:  # the table may not exist yet
            return None


def wait_for(condition: Any, seconds: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def end_the_lock_holders_session(target: Engine) -> int:
    """Terminate every session holding an advisory lock of this database (the lock dies with its
    session); returns how many there were."""
    with target.connect() as conn:
        return len(
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a WHERE a.pid IN "
                    f"(SELECT pid FROM pg_locks WHERE {THIS_DATABASE} AND granted) AND a.pid <> pg_backend_pid()"
                )
            ).all()
        )


@pytest.fixture
def big(mariadb_url: str, postgres_url: str) -> Iterator[tuple[Engine, Engine, Any]]:
    legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
    tally = generate(legacy, patients_per_sistema=6000, encounters_per_patient=0, sistemas=("HSJ",), seed=5)
    yield legacy, target, tally


def test_a_second_worker_never_interleaves_when_the_lock_holders_session_dies(
    big: tuple[Engine, Engine, Any], mariadb_url: str, postgres_url: str
) -> None:
    _, target, tally = big
    holder = start_worker(worker_argv("patients", "holder"), mariadb_url, postgres_url)
    wait_for(lambda: (scalar(target, "SELECT last_legacy_id FROM migration.checkpoints") or 0) > 500, what="progress")
    waiter = start_worker(worker_argv("patients", "waiter"), mariadb_url, postgres_url)
    wait_for(
        lambda: scalar(target, f"SELECT count(*) FROM pg_locks WHERE {THIS_DATABASE} AND NOT granted") == 1,
        what="the second worker to wait for the lock",
    )
    time.sleep(0.5)
    # Waiting, it has touched no run state: no run row of its own, the live run not marked interrupted.
    with target.connect() as conn:
        runs = dict(conn.execute(text("SELECT run_id, status FROM migration.runs")).all())
    assert runs == {"holder": "running"}
    assert end_the_lock_holders_session(target) == 1
    assert holder.wait(timeout=60) != 0, "the holder must stop once its session is gone"
    assert waiter.wait(timeout=120) == 0, waiter.stderr.read() if waiter.stderr else ""
    expected = tally.expected("HSJ", "patients")
    with target.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.patients)).scalar() == expected["migrated"]
        inserted = dict(
            conn.execute(
                text("SELECT legacy_id, count(*) FROM migration.ledger WHERE action = 'inserted' GROUP BY legacy_id")
            ).all()
        )
        stored = set(conn.execute(select(schema.patients.c.legacy_id)).scalars())
        runs = dict(conn.execute(text("SELECT run_id, status FROM migration.runs")).all())
        resumed = conn.execute(text("SELECT resumed_from FROM migration.runs WHERE run_id = 'waiter'")).scalar()
    assert max(inserted.values()) == 1, "a row was recorded as inserted twice"
    assert set(inserted) == stored, "the ledger and the target disagree"
    assert runs["waiter"] == "succeeded" and runs["holder"] in ("failed", "interrupted")
    assert resumed == "holder"


def _hashes(engine: Engine, table: Any) -> set[tuple[str, int, str]]:
    with engine.connect() as conn:
        return set(conn.execute(select(table.c.sistema, table.c.legacy_id, table.c.content_hash)).all())


def test_the_same_source_gives_the_same_hashes_in_any_target(
    sshd: SSHServer, mariadb_url: str, postgres_url: str, tmp_path: Any
) -> None:
    from demo.databases import POSTGRES_ADMIN, throwaway_database

    clinical = Clinical(sshd, mariadb_url, postgres_url, patients_per_sistema=3000, encounters=2)
    assert clinical.materialize("HSJ").success
    with throwaway_database(POSTGRES_ADMIN, "second") as second_url:
        second = schema.make_engine(second_url)
        schema.create_schemas(second, schema.target_metadata, schema.state_metadata)
        with second.begin() as conn:  # another target's sequences are somewhere else
            conn.execute(text("SELECT setval('clinical.patients_id_seq', 100000)"))
        killed = start_worker(worker_argv("patients", "killed"), mariadb_url, second_url)
        wait_for(lambda: (scalar(second, "SELECT last_legacy_id FROM migration.checkpoints") or 0) > 200)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        assert 0 < scalar(second, "SELECT count(*) FROM clinical.patients") < 2900, "the kill must land mid-run"
        result = clinical.materialize("HSJ", _target_url=second_url)
        assert result.success and metadata(result, "patients")["resumed_from_run"] == "killed"
        first_ids = scalar(clinical.target, "SELECT array_agg(id ORDER BY legacy_id) FROM clinical.patients")
        second_ids = scalar(second, "SELECT array_agg(id ORDER BY legacy_id) FROM clinical.patients")
        assert first_ids != second_ids, "the targets' surrogate ids must differ for this test to mean anything"
        for table in (schema.patients, schema.encounters):
            assert _hashes(clinical.target, table) == _hashes(second, table), table.name


def test_hashes_stored_by_the_earlier_scheme_converge_without_reporting_changes(clinical: Clinical) -> None:
    assert clinical.materialize("HSJ").success
    enc = schema.encounters
    with clinical.target.begin() as conn:
        current = dict(conn.execute(select(enc.c.id, enc.c.content_hash)).all())
        rows = conn.execute(select(enc)).mappings().all()
        # What a release before 0.2 stored: the hash of the target fields, surrogate patient_id included.
        for row in rows:
            fields = {k: v for k, v in row.items() if k not in schema.BOOKKEEPING}
            conn.execute(update(enc).where(enc.c.id == row["id"]).values(content_hash=rules.content_hash(fields)))
        run_ids = dict(conn.execute(select(enc.c.id, enc.c.run_id)).all())
        ledger_before = conn.execute(text("SELECT count(*) FROM migration.ledger")).scalar()
    assert len(rows) > 100
    result = clinical.materialize("HSJ")
    assert result.success
    meta = metadata(result, "encounters")
    assert (meta["inserted"], meta["updated"], meta["deleted"]) == (0, 0, 0)
    assert meta["unchanged"] == len(rows) and meta["rehashed"] == len(rows)
    with clinical.target.connect() as conn:
        assert dict(conn.execute(select(enc.c.id, enc.c.content_hash)).all()) == current
        assert dict(conn.execute(select(enc.c.id, enc.c.run_id)).all()) == run_ids
        assert conn.execute(text("SELECT count(*) FROM migration.ledger")).scalar() == ledger_before
    again = clinical.materialize("HSJ")
    assert metadata(again, "encounters")["rehashed"] == 0


def test_a_full_run_against_an_emptied_partition_stops_before_deleting(clinical: Clinical) -> None:
    assert clinical.materialize("HSJ", assets=(clinical_patients(),)).success
    before = patients_snapshot(clinical.target)
    migrated = scalar(clinical.target, "SELECT count(*) FROM clinical.patients WHERE sistema = 'HSJ'")
    with clinical.legacy.begin() as conn:  # a wrong or emptied legacy partition
        conn.execute(delete(schema.pacientes).where(schema.pacientes.c.sistema == "HSJ"))
    refused = clinical.materialize("HSJ", assets=(clinical_patients(),))
    assert not refused.success
    failure = next(e for e in refused.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.step_failure_data.error.message)
    assert "VALIDATION_ERROR" in message and "allow_mass_delete" in message and "\n" not in message.strip()
    assert f"would delete {migrated} patients of sistema HSJ" in message
    assert not [e for e in refused.all_events if e.event_type_value == "STEP_RESTARTED"]
    assert patients_snapshot(clinical.target) == before
    assert scalar(clinical.target, "SELECT count(*) FROM migration.ledger WHERE action = 'deleted'") == 0

    allowed = clinical.materialize("HSJ", assets=(clinical_patients(),), allow_mass_delete=True)
    assert allowed.success and metadata(allowed, "patients")["deleted"] == migrated
    assert scalar(clinical.target, "SELECT count(*) FROM clinical.patients") == 0
    # The ledger can restore every row exactly as it was.
    with clinical.target.begin() as conn:
        previous = conn.execute(
            text("SELECT previous FROM migration.ledger WHERE action = 'deleted' AND run_id = :r"),
            {"r": allowed.run_id},
        ).scalars()
        conn.execute(insert(schema.patients), [store.from_jsonable(schema.patients, p) for p in previous])
    assert patients_snapshot(clinical.target) == before


def test_rules_driven_deletions_beyond_the_share_stop_the_run(clinical: Clinical) -> None:
    """Rows quarantined now (not gone) are only known as the run reads them: the batch that would
    cross the share is rolled back, so a run never deletes more than its share."""
    assert clinical.materialize("HSJ", assets=(clinical_patients(),), batch_size=20).success
    migrated = scalar(clinical.target, "SELECT count(*) FROM clinical.patients WHERE sistema = 'HSJ'")
    with clinical.legacy.begin() as conn:  # every document blanked: everything would be quarantined
        conn.execute(update(schema.pacientes).where(schema.pacientes.c.sistema == "HSJ").values(documento=None))
    result = clinical.materialize("HSJ", assets=(clinical_patients(),), batch_size=20)
    assert not result.success
    remaining = scalar(clinical.target, "SELECT count(*) FROM clinical.patients WHERE sistema = 'HSJ'")
    deleted = scalar(clinical.target, "SELECT count(*) FROM migration.ledger WHERE action = 'deleted'")
    assert migrated - remaining == deleted <= int(migrated * 0.10)


def clinical_patients() -> Any:
    from migration_assets.clinical.assets import patients

    return patients


@pytest.fixture
def clinical(sshd: SSHServer, mariadb_url: str, postgres_url: str) -> Clinical:
    return Clinical(sshd, mariadb_url, postgres_url)


# --- encounters: batches written two at a time, committed one at a time --------------------------------


def _last_checkpoint(engine: Engine, entity: str) -> int:
    return int(scalar(engine, f"SELECT last_legacy_id FROM migration.checkpoints WHERE entity = '{entity}'") or 0)


class ThirdWrittenBesideSecond(Migration):
    """Batch 2 goes on only once batch 3, written beside it, is decided and written (not committed):
    then it commits, or, with ``second_fails``, fails without being written. ``ends``: each batch's end,
    in the order the batches began."""

    def __init__(self, *args: Any, second_fails: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.second_fails = second_fails
        self.ends: list[int] = []
        self.lock, self.third_written = threading.Lock(), threading.Event()

    def _apply_batch(self, *args: Any, **kwargs: Any) -> bool:
        with self.lock:
            self.ends.append(args[5])  # the batch's hi
            number = len(self.ends)
        if number == 2 and self.second_fails:
            assert self.third_written.wait(30), "batch 3 must be written while batch 2 still is"
            raise RuntimeError("batch 2 failed")
        wrote = super()._apply_batch(*args, **kwargs)
        if number == 2:
            assert self.third_written.wait(30), "batch 3 must be written while batch 2 is not committed"
        if number == 3:
            self.third_written.set()
        return wrote


def _with_patients(mariadb_url: str, postgres_url: str, encounters_per_patient: int) -> tuple[Engine, Engine]:
    legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
    generate(legacy, patients_per_sistema=2000, encounters_per_patient=encounters_per_patient, sistemas=("HSJ",))
    patients = RunParameters(entity="patients", sistema="HSJ", usuario="ana", run_id="p", batch_size=5000)
    assert Migration(validate(patients), legacy, target).run().counts.inserted > 0
    return legacy, target


def test_an_encounter_batch_written_beside_a_failing_one_is_never_committed(
    mariadb_url: str, postgres_url: str
) -> None:
    legacy, target = _with_patients(mariadb_url, postgres_url, encounters_per_patient=1)
    encounters = RunParameters(entity="encounters", sistema="HSJ", usuario="ana", run_id="e", batch_size=100)
    run = ThirdWrittenBesideSecond(validate(encounters), legacy, target, second_fails=True)
    with pytest.raises(RuntimeError, match="batch 2 failed"):
        run.run()
    first = run.ends[0]
    assert _last_checkpoint(target, "encounters") == first
    assert scalar(target, "SELECT max(legacy_id) FROM clinical.encounters") <= first
    assert scalar(target, "SELECT max(legacy_id) FROM migration.ledger WHERE entity = 'encounters'") <= first
    assert scalar(target, "SELECT count(*) FROM clinical.encounters WHERE legacy_id > :f", f=first) == 0
    # The failed run resumes after batch 1, and every row is then written once.
    resumed = Migration(validate(replace(encounters, run_id="e2")), legacy, target).run()
    assert resumed.resumed_from == "e"
    inserted = scalar(
        target, "SELECT count(*) - count(DISTINCT legacy_id) FROM migration.ledger WHERE entity = 'encounters'"
    )
    assert inserted == 0, "a row was recorded as inserted twice"


def test_a_first_run_analyzes_its_tables_once_while_it_writes_and_once_at_its_end(
    mariadb_url: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statistics of the columns a batch looks rows up by are made once the run has written (so
    that a table that was empty gets its look-ups priced by index), not again and again as it grows: a
    first run of 727k encounters made seven of each table in the run (0.58 s of PostgreSQL's statement
    time with the closing ones), while the look-ups' plans stayed the same. The run's end analyzes again."""
    legacy, target = _with_patients(mariadb_url, postgres_url, encounters_per_patient=4)
    monkeypatch.setattr(engine_module, "ANALYZE_FIRST", 1000)  # 8k encounters: 1k, 2k, 4k … rows
    analyzed: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("ANALYZE"):
            analyzed.append(statement.split("(")[0].strip())

    event.listen(target, "before_cursor_execute", seen)
    try:
        encounters = RunParameters(entity="encounters", sistema="HSJ", usuario="ana", run_id="e", batch_size=500)
        result = Migration(validate(encounters), legacy, target).run()
    finally:
        event.remove(target, "before_cursor_execute", seen)
    assert result.counts.read > 4 * 1000
    assert analyzed == ['ANALYZE "clinical"."encounters"', 'ANALYZE "migration"."quarantine"'] * 2


def test_encounter_writers_stop_once_the_lock_holders_session_dies(mariadb_url: str, postgres_url: str) -> None:
    _, target = _with_patients(mariadb_url, postgres_url, encounters_per_patient=4)
    holder = start_worker(worker_argv("encounters", "holder", 50), mariadb_url, postgres_url)
    wait_for(lambda: _last_checkpoint(target, "encounters") > 1000, what="progress")
    assert end_the_lock_holders_session(target) == 1
    at_kill = _last_checkpoint(target, "encounters")
    assert holder.wait(timeout=60) != 0, "the run must fail once its lock is gone"
    # Batches of 50 rows: at most the two being written when the lock went may still commit.
    assert _last_checkpoint(target, "encounters") - at_kill <= 300


@pytest.mark.parametrize("entity", ["patients", "encounters"])
def test_a_first_runs_values_the_target_refuses_are_quarantined(
    mariadb_url: str, postgres_url: str, entity: str
) -> None:
    """A value every §6 rule passes but the target refuses (here a DBA's CHECK) is INVALID_VALUE and the
    run goes on — in a first run too, whose batches are copied straight into the table (the driver's own
    error was not recognised there, and the run failed) — in whichever writer's batch it falls; the rest
    of each batch is written once."""
    table = f"clinical.{entity}"
    if entity == "patients":
        legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
        generate(legacy, patients_per_sistema=2000, encounters_per_patient=0, sistemas=("HSJ",))
    else:
        legacy, target = _with_patients(mariadb_url, postgres_url, encounters_per_patient=1)
    schema.create_schemas(target, schema.target_metadata)
    with target.begin() as conn:
        conn.execute(text(f"ALTER TABLE {table} ADD CONSTRAINT refused CHECK (legacy_id % 97 <> 5)"))
    params = RunParameters(entity=entity, sistema="HSJ", usuario="ana", run_id="r", batch_size=100)
    result = Migration(validate(params), legacy, target).run()
    with target.connect() as conn:
        quarantined = dict(
            conn.execute(
                text("SELECT legacy_id, reason FROM migration.quarantine WHERE entity = :e AND legacy_id % 97 = 5"),
                {"e": entity},
            ).all()
        )
        stored = conn.scalar(text(f"SELECT count(*) FROM {table}"))
        ledger = conn.execute(
            text("SELECT count(*), count(DISTINCT legacy_id) FROM migration.ledger WHERE entity = :e"), {"e": entity}
        ).one()
    invalid = [i for i, reason in quarantined.items() if reason == rules.INVALID_VALUE]
    assert len(invalid) >= 5 and result.counts.quarantined[rules.INVALID_VALUE] == len(invalid)
    assert stored == result.counts.inserted == ledger[0] == ledger[1]
    assert _last_checkpoint(target, entity) > max(invalid)


# --- patients: a batch written beside the one before, that one's documents handed over ------------------

SAME_DOCUMENT = {"documento": "71234567", "tipo_documento": "CC", "nombres": "Ana", "apellidos": "Pérez",
                 "fecha_nacimiento": "1980-05-05", "sexo": "F", "eliminado": 0}  # fmt: skip
FIRST, SECOND = 150, 250  # in the second and third page of 100 patients


def _two_claims_of_one_document(mariadb_url: str, postgres_url: str) -> tuple[Engine, Engine, RunParameters]:
    legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
    generate(legacy, patients_per_sistema=600, encounters_per_patient=0, sistemas=("HSJ",))
    with legacy.begin() as conn:
        conn.execute(update(schema.pacientes).where(schema.pacientes.c.id.in_([FIRST, SECOND])).values(SAME_DOCUMENT))
    schema.create_schemas(target, schema.target_metadata)
    return legacy, target, RunParameters(entity="patients", sistema="HSJ", usuario="ana", run_id="p", batch_size=100)


def _fate(target: Engine, legacy_id: int) -> str:
    with target.connect() as conn:
        if conn.scalar(text("SELECT count(*) FROM clinical.patients WHERE legacy_id = :i"), {"i": legacy_id}):
            return "migrated"
        reason = conn.scalar(text("SELECT reason FROM migration.quarantine WHERE legacy_id = :i"), {"i": legacy_id})
        return str(reason)


@pytest.mark.timeout(180)
def test_a_document_claimed_by_the_batch_written_beside_is_held_by_it(mariadb_url: str, postgres_url: str) -> None:
    """Patients 150 and 250 claim one document in the pages of 101–200 and 201–300, written at once: the
    lower one holds it (as one writer would decide), the other is DUPLICATE_DOCUMENT; without the
    handover both were written and the first batch's deferred unique check waited for the second."""
    legacy, target, params = _two_claims_of_one_document(mariadb_url, postgres_url)
    run = ThirdWrittenBesideSecond(validate(params), legacy, target)
    result = run.run()
    assert len(run.ends) > 3 and (_fate(target, FIRST), _fate(target, SECOND)) == ("migrated", rules.DUPLICATE_DOCUMENT)
    assert result.counts.inserted == scalar(target, "SELECT count(*) FROM clinical.patients")


@pytest.mark.timeout(180)
def test_a_batch_decided_on_documents_the_batch_before_gave_up_is_decided_again(
    mariadb_url: str, postgres_url: str
) -> None:
    """Patient 150's value is refused by the target after its batch handed its documents over: the batch
    written beside it, which had found patient 250's document held, decides again on it committed, and
    250 holds the document, as one writer would decide."""
    legacy, target, params = _two_claims_of_one_document(mariadb_url, postgres_url)
    with target.begin() as conn:
        conn.execute(text(f"ALTER TABLE clinical.patients ADD CONSTRAINT refused CHECK (legacy_id <> {FIRST})"))
    result = ThirdWrittenBesideSecond(validate(params), legacy, target).run()
    assert (_fate(target, FIRST), _fate(target, SECOND)) == (rules.INVALID_VALUE, "migrated")
    assert result.counts.inserted == scalar(target, "SELECT count(*) FROM clinical.patients")
    assert scalar(target, "SELECT count(*) - count(DISTINCT legacy_id) FROM migration.ledger") == 0


# --- patients, incremental: the batch before rewrites rows that hold documents now ----------------------

RELEASER, CLAIMANT = 150, 250  # in the incremental run's second and third page of 100 changed patients


def _all_changed(mariadb_url: str, postgres_url: str) -> tuple[Engine, Engine, RunParameters]:
    """600 patients migrated, then every one of them changed (so an incremental run reads pages of 100, as a
    full run would): the legacy DB, the target and the incremental run's parameters."""
    legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
    generate(legacy, patients_per_sistema=600, encounters_per_patient=0, sistemas=("HSJ",))
    schema.create_schemas(target, schema.target_metadata)
    full = RunParameters(entity="patients", sistema="HSJ", usuario="ana", run_id="full", batch_size=100)
    Migration(validate(full), legacy, target).run()
    p = schema.pacientes
    with legacy.begin() as conn:
        later = conn.scalar(select(func.max(p.c.actualizado_en))) + timedelta(days=1)
        conn.execute(update(p).values(actualizado_en=later))
    return legacy, target, replace(full, run_id="incremental", mode="incremental")


def _new_documents(legacy: Engine, documents: dict[int, str]) -> None:
    with legacy.begin() as conn:
        for legacy_id, document in documents.items():
            conn.execute(update(schema.pacientes).where(schema.pacientes.c.id == legacy_id).values(documento=document))


def _document_of(target: Engine, legacy_id: int) -> str | None:
    with target.connect() as conn:
        return conn.scalar(text("SELECT national_id FROM clinical.patients WHERE legacy_id = :i"), {"i": legacy_id})


@pytest.mark.timeout(180)
def test_a_document_released_by_the_batch_written_beside_goes_to_its_next_claimant(
    mariadb_url: str, postgres_url: str
) -> None:
    """An incremental run: patient 150 (second page) gives its document up for a new one, and patient 250
    (third page) takes it, while the second page is not committed. The third page is decided beside it on
    what the second will hold, not on what patient 150's row holds now: 250 holds the document, as one
    writer would decide. Before, a batch that rewrote target rows made the next one wait for its commit."""
    legacy, target, params = _all_changed(mariadb_url, postgres_url)
    released = _document_of(target, RELEASER)
    assert released is not None and released != _document_of(target, CLAIMANT)
    _new_documents(legacy, {RELEASER: "99000150", CLAIMANT: released})
    run = ThirdWrittenBesideSecond(validate(params), legacy, target)
    result = run.run()
    assert result.mode == "incremental" and len(run.ends) > 3
    assert (_fate(target, RELEASER), _fate(target, CLAIMANT)) == ("migrated", "migrated")
    assert (_document_of(target, RELEASER), _document_of(target, CLAIMANT)) == ("99000150", released)


@pytest.mark.timeout(180)
def test_documents_swapped_across_batches_end_where_one_writer_puts_them(mariadb_url: str, postgres_url: str) -> None:
    """Patients 150 and 250 swap documents in one incremental run: the second page takes 250's document for
    150 and evicts 250's row (it holds it now); the third, decided on the second committed, gives 250 the
    document 150 gave up. Both are migrated with each other's document, the eviction in the ledger."""
    legacy, target, params = _all_changed(mariadb_url, postgres_url)
    first, second = _document_of(target, RELEASER), _document_of(target, CLAIMANT)
    assert first and second and first != second
    _new_documents(legacy, {RELEASER: second, CLAIMANT: first})
    Migration(validate(params), legacy, target).run()
    assert (_document_of(target, RELEASER), _document_of(target, CLAIMANT)) == (second, first)
    actions = "SELECT action FROM migration.ledger WHERE run_id = 'incremental' AND legacy_id = :i ORDER BY id"
    with target.connect() as conn:
        assert [a for (a,) in conn.execute(text(actions), {"i": CLAIMANT})] == ["deleted", "inserted"]
