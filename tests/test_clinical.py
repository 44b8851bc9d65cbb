"""patients and encounters end to end: Dagster → sshd → worker → MariaDB → PostgreSQL.

Expected numbers come from the generator's tally of the fate it gave each row, not from the
transform rules under test.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, materialize
from sqlalchemy import Engine, func, select, text, update

from demo.legacy_data import Tally, generate
from demo.sshd import SSHServer
from migration_assets.clinical.assets import encounters, patients
from resources.databases import DatabaseResource
from resources.policy import MigrationPolicy
from resources.ssh import SSHResource
from resources.worker import WorkerResource
from worker import counts as counts_module
from worker import engine as engine_module
from worker import locks, schema
from worker.counts import count_eligible
from worker.engine import MassDeleteRefused, Migration
from worker.launch import RESIDENT_ENV
from worker.locks import PartitionBusy
from worker.params import RunParameters
from worker.resident import DIR_ENV

from .conftest import WORKER_COMMAND, patients_snapshot

pytestmark = pytest.mark.integration
SISTEMAS = ("HSJ", "CLN01")


class Clinical:
    """A generated legacy DB, a target, an sshd, and a way to materialize a sistema."""

    def __init__(
        self,
        sshd: SSHServer,
        legacy_url: str,
        target_url: str,
        patients_per_sistema: int = 300,
        encounters: int = 5,
        worker: WorkerResource | None = None,
    ) -> None:
        self.sshd = sshd
        self.worker = worker or WorkerResource(
            transport="ssh", command=WORKER_COMMAND, ssh=SSHResource(**sshd.resource_kwargs())
        )
        self.legacy_url = legacy_url
        self.target_url = target_url
        self.legacy = schema.make_engine(legacy_url)
        self.target = schema.make_engine(target_url)
        self.tally: Tally = generate(
            self.legacy,
            patients_per_sistema=patients_per_sistema,
            encounters_per_patient=encounters,
            sistemas=SISTEMAS,
            seed=11,
        )
        self.instance = DagsterInstance.ephemeral()
        self.instance.add_dynamic_partitions("sistemas", list(SISTEMAS))

    def resources(self, target_url: str | None = None) -> dict[str, Any]:
        url = target_url or self.target_url
        return {
            "worker": self.worker,
            "legacy_db": DatabaseResource(url=self.legacy_url),
            "clinical_db": DatabaseResource(url=url),
            "state_db": DatabaseResource(url=url),
            "policy": MigrationPolicy(),
        }

    def materialize(self, sistema: str = "HSJ", assets: tuple[Any, ...] = (patients, encounters), **config: Any):
        target_url = config.pop("_target_url", None)
        cfg = {"usuario": "ana", **config}
        return materialize(
            list(assets),
            partition_key=sistema,
            resources=self.resources(target_url),
            instance=self.instance,
            run_config={"ops": {a.key.path[-1]: {"config": cfg} for a in assets}},
            raise_on_error=False,
        )

    def scalar(self, engine: Engine, sql: str, **params: Any) -> Any:
        with engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()


def metadata(result: Any, entity: str) -> dict[str, Any]:
    (event,) = result.asset_materializations_for_node(entity)
    return {k: v.value for k, v in event.metadata.items()}


@pytest.fixture
def clinical(sshd: SSHServer, mariadb_url: str, postgres_url: str) -> Clinical:
    return Clinical(sshd, mariadb_url, postgres_url)


def test_full_run_accounts_for_every_row_exactly(clinical: Clinical) -> None:
    result = clinical.materialize("HSJ")
    assert result.success
    for entity in ("patients", "encounters"):
        expected = clinical.tally.expected("HSJ", entity)
        meta = metadata(result, entity)
        assert meta["rows_read"] == expected["eligible"]
        assert meta["inserted"] == expected["migrated"]
        assert meta["quarantined_by_reason"] == expected["quarantined"]
        assert (meta["updated"], meta["unchanged"], meta["deleted"]) == (0, 0, 0)
        assert meta["duration_s"] > 0 and meta["rows_per_s"] > 0 and meta["worker_cpu_s"] > 0
        table = f"clinical.{entity}"
        assert (
            clinical.scalar(clinical.target, f"SELECT count(*) FROM {table} WHERE sistema = 'HSJ'")
            == expected["migrated"]
        )
        assert clinical.scalar(clinical.target, f"SELECT count(*) FROM {table} WHERE sistema <> 'HSJ'") == 0
        with clinical.target.connect() as conn:
            by_reason = dict(
                conn.execute(
                    text(
                        "SELECT reason, count(*) FROM migration.quarantine WHERE entity = :e AND partition_key = 'HSJ' "
                        "GROUP BY reason"
                    ),
                    {"e": entity},
                ).all()
            )
        assert by_reason == expected["quarantined"]
    assert set(clinical.tally.expected("HSJ", "patients")["quarantined"]) == {
        "MISSING_DOCUMENT", "DUPLICATE_DOCUMENT", "MISSING_NAME", "INVALID_BIRTH_DATE",
    }  # fmt: skip
    assert set(clinical.tally.expected("HSJ", "encounters")["quarantined"]) == {
        "ORPHAN_PATIENT", "MISSING_DATE", "INVALID_ICD10",
    }  # fmt: skip
    # who ran it, with which parameters
    with clinical.target.connect() as conn:
        run = conn.execute(text("SELECT usuario, status, mode FROM migration.runs WHERE entity = 'patients'")).one()
    assert tuple(run) == ("ana", "succeeded", "full")


def test_second_full_run_changes_nothing(clinical: Clinical) -> None:
    assert clinical.materialize("HSJ").success
    before = clinical.scalar(
        clinical.target, "SELECT md5(string_agg(content_hash || run_id, ',' ORDER BY legacy_id)) FROM clinical.patients"
    )
    # Quarantine rows as they stand are not rewritten (same row ids, run ids and times); no ledger row.
    quarantine = "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM migration.quarantine t"
    quarantine_before = clinical.scalar(clinical.target, quarantine)
    ledger_before = clinical.scalar(clinical.target, "SELECT count(*) FROM migration.ledger")
    result = clinical.materialize("HSJ")
    assert clinical.scalar(clinical.target, quarantine) == quarantine_before
    assert clinical.scalar(clinical.target, "SELECT count(*) FROM migration.ledger") == ledger_before
    assert result.success
    for entity in ("patients", "encounters"):
        meta = metadata(result, entity)
        expected = clinical.tally.expected("HSJ", entity)
        assert meta["unchanged"] == expected["migrated"]
        assert (meta["inserted"], meta["updated"], meta["deleted"]) == (0, 0, 0)
    after = clinical.scalar(
        clinical.target, "SELECT md5(string_agg(content_hash || run_id, ',' ORDER BY legacy_id)) FROM clinical.patients"
    )
    assert before == after


def _snapshot(clinical: Clinical) -> tuple[Any, ...]:
    return tuple(
        clinical.scalar(clinical.target, sql)
        for sql in (
            "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM clinical.patients t",
            "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM clinical.encounters t",
            "SELECT count(*) FROM migration.ledger",
            "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM migration.quarantine t",
        )
    )


def test_dry_run_writes_nothing(clinical: Clinical) -> None:
    dry = clinical.materialize("HSJ", dry_run=True)
    assert dry.success
    assert metadata(dry, "patients")["inserted"] == clinical.tally.expected("HSJ", "patients")["migrated"]
    assert clinical.scalar(clinical.target, "SELECT count(*) FROM clinical.patients") == 0
    assert clinical.scalar(clinical.target, "SELECT count(*) FROM migration.ledger") == 0
    assert clinical.scalar(clinical.target, "SELECT count(*) FROM migration.quarantine") == 0

    assert clinical.materialize("HSJ").success
    first = clinical.scalar(clinical.target, "SELECT min(legacy_id) FROM clinical.patients")
    with clinical.legacy.begin() as conn:
        conn.execute(update(schema.pacientes).where(schema.pacientes.c.id == first).values(nombres="Cambiado"))
    before = _snapshot(clinical)
    dry = clinical.materialize("HSJ", assets=(patients,), dry_run=True)
    assert dry.success and metadata(dry, "patients")["updated"] == 1
    assert _snapshot(clinical) == before


def test_soft_deleted_row_is_removed_by_the_next_full_run(clinical: Clinical) -> None:
    assert clinical.materialize("HSJ").success
    victim = clinical.scalar(clinical.target, "SELECT max(legacy_id) FROM clinical.patients")
    with clinical.legacy.begin() as conn:
        conn.execute(update(schema.pacientes).where(schema.pacientes.c.id == victim).values(eliminado=1))
    result = clinical.materialize("HSJ", assets=(patients,))
    assert result.success
    meta = metadata(result, "patients")
    assert meta["deleted"] == 1 and meta["unchanged"] == clinical.tally.expected("HSJ", "patients")["migrated"] - 1
    assert (
        clinical.scalar(clinical.target, "SELECT count(*) FROM clinical.patients WHERE legacy_id = :v", v=victim) == 0
    )
    with clinical.target.connect() as conn:
        entry = conn.execute(
            text("SELECT previous FROM migration.ledger WHERE action = 'deleted' AND legacy_id = :v"), {"v": victim}
        ).scalar_one()
    previous = entry if isinstance(entry, dict) else json.loads(entry)
    assert previous["legacy_id"] == victim and previous["sistema"] == "HSJ"


def test_incremental_picks_only_rows_changed_since_the_watermark(clinical: Clinical) -> None:
    assert clinical.materialize("HSJ").success
    watermark = clinical.scalar(clinical.legacy, "SELECT max(actualizado_en) FROM pacientes WHERE sistema = 'HSJ'")
    at_watermark = clinical.scalar(
        clinical.legacy, "SELECT count(*) FROM pacientes WHERE sistema = 'HSJ' AND actualizado_en = :w", w=watermark
    )
    ids = list(
        clinical.scalar(clinical.target, "SELECT array_agg(legacy_id ORDER BY legacy_id) FROM clinical.patients")[:3]
    )
    with clinical.legacy.begin() as conn:
        conn.execute(
            update(schema.pacientes)
            .where(schema.pacientes.c.id.in_(ids))
            .values(apellidos="Nuevo Apellido", actualizado_en=watermark + timedelta(hours=1))
        )
    result = clinical.materialize("HSJ", assets=(patients,), mode="incremental")
    assert result.success
    meta = metadata(result, "patients")
    assert meta["mode"] == "incremental"
    assert meta["rows_read"] == 3 + at_watermark
    assert meta["updated"] == 3 and meta["inserted"] == 0 and meta["deleted"] == 0
    with clinical.target.connect() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM clinical.patients WHERE family_name = 'Nuevo Apellido'")).scalar()
            == 3
        )


def test_practitioner_mapping_is_applied(clinical: Clinical) -> None:
    assert clinical.materialize("HSJ", pract_source=101, pract_target=900).success
    with clinical.legacy.connect() as conn:
        source = dict(conn.execute(select(schema.pacientes.c.id, schema.pacientes.c.profesional_id)).all())
    with clinical.target.connect() as conn:
        target = dict(conn.execute(select(schema.patients.c.legacy_id, schema.patients.c.practitioner_id)).all())
    assert target and any(source[i] == 101 for i in target)
    for legacy_id, practitioner in target.items():
        assert practitioner == (900 if source[legacy_id] == 101 else source[legacy_id])


def test_a_resident_worker_over_ssh_migrates_as_a_worker_of_its_own_does(
    sshd: SSHServer, mariadb_url: str, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``resident_seconds`` (WORKER_RESIDENT_SECONDS): every command after the first runs in a spare the
    legacy host kept ready (worker/resident.py), reached through its SSH channel once the first command
    offered it (resources/resident.py), with the same results."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "resident"
    ssh = SSHResource(**sshd.resource_kwargs())
    worker = WorkerResource(
        transport="ssh", command=f"env {DIR_ENV}={folder} {WORKER_COMMAND}", ssh=ssh, resident_seconds=60
    )
    assert worker.invocation[:2] == ["env", f"{RESIDENT_ENV}=60"]
    clinical = Clinical(sshd, mariadb_url, postgres_url, worker=worker)
    try:
        first = clinical.materialize("HSJ")
        assert first.success
        assert list(folder.glob("*.sock")), "no resident worker was started"
        assert list((tmp_path / "cache" / "clinic-migrate").glob("channel-*")), "no channel was offered"
        again = clinical.materialize("HSJ")
        assert again.success
    finally:
        for leftover in folder.glob("*.sock"):
            leftover.unlink()  # its server leaves within a second
    for entity in ("patients", "encounters"):
        expected = clinical.tally.expected("HSJ", entity)
        meta, unchanged = metadata(first, entity), metadata(again, entity)
        assert meta["inserted"] == expected["migrated"]
        assert meta["quarantined_by_reason"] == expected["quarantined"]
        assert unchanged["unchanged"] == expected["migrated"] and unchanged["inserted"] == 0
        assert meta["worker_cpu_s"] > 0 and unchanged["worker_cpu_s"] > 0


def test_killed_worker_resumes_without_duplicates(sshd: SSHServer, mariadb_url: str, postgres_url: str) -> None:
    clinical = Clinical(sshd, mariadb_url, postgres_url, patients_per_sistema=20000, encounters=0)
    ssh = SSHResource(**sshd.resource_kwargs())
    argv = [WORKER_COMMAND, "migrate", "--entity", "patients", "--sistema", "HSJ", "--usuario", "ana",
            "--run-id", "killed-run", "--batch-size", "20"]  # fmt: skip
    secrets = json.dumps({"legacy_db_url": mariadb_url, "target_db_url": postgres_url}).encode()
    checkpoints = schema.checkpoints
    with ssh.connect() as client:
        process = ssh.start(client, argv, secrets)
        lines = process.lines(time.monotonic() + 120)
        deadline = time.monotonic() + 60
        done = 0
        while time.monotonic() < deadline and process.pid is None:
            next(lines, None)
        while time.monotonic() < deadline and done < 100:
            time.sleep(0.01)
            with clinical.target.connect() as conn:
                try:
                    done = conn.execute(select(checkpoints.c.last_legacy_id)).scalar() or 0
                except Exception:
                    conn.rollback()
        assert process.pid is not None and done >= 100
        os.kill(process.pid, signal.SIGKILL)  # sshd runs on this machine: the worker's PID is ours to kill
        process.wait()
    partial = clinical.scalar(clinical.target, "SELECT count(*) FROM clinical.patients")
    expected = clinical.tally.expected("HSJ", "patients")
    assert 0 < partial < expected["migrated"], "the kill must land mid-run"

    result = clinical.materialize("HSJ", assets=(patients,))
    assert result.success
    meta = metadata(result, "patients")
    assert meta["resumed_from_run"] == "killed-run"
    assert meta["rows_read"] == expected["eligible"]
    assert meta["migrated"] == expected["migrated"]
    assert meta["quarantined_by_reason"] == expected["quarantined"]
    with clinical.target.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.patients)).scalar() == expected["migrated"]
        duplicates = conn.execute(
            text(
                "SELECT count(*) FROM (SELECT legacy_id FROM clinical.patients "
                "GROUP BY sistema, legacy_id HAVING count(*) > 1) d"
            )
        ).scalar()
        inserted_twice = conn.execute(
            text("SELECT count(*) FROM (SELECT legacy_id FROM migration.ledger WHERE action = 'inserted' "
                 "GROUP BY legacy_id HAVING count(*) > 1) d")
        ).scalar()  # fmt: skip
        quarantined = conn.execute(text("SELECT count(*) FROM migration.quarantine")).scalar()
    assert duplicates == 0 and inserted_twice == 0
    assert quarantined == sum(expected["quarantined"].values())
    with clinical.target.connect() as conn:
        killed = conn.execute(text("SELECT status FROM migration.runs WHERE run_id = 'killed-run'")).scalar()
    assert killed == "interrupted"


def _all_log_text(instance: DagsterInstance, run_id: str) -> str:
    return "\n".join(str(record) for record in instance.all_logs(run_id))


def test_logs_carry_no_patient_data_or_secrets(clinical: Clinical, postgres_url: str) -> None:
    with_password = postgres_url.replace("postgres@", "postgres:s3cr3t-pw@")
    result = clinical.materialize("HSJ", _target_url=with_password)
    assert result.success
    logs = _all_log_text(clinical.instance, result.run_id)
    assert "progress:" in logs and "s3cr3t-pw" not in logs
    with clinical.legacy.connect() as conn:
        rows = conn.execute(
            text("SELECT documento, nombres, apellidos, email, telefono FROM pacientes WHERE sistema = 'HSJ'")
        ).all()
        notes = conn.execute(text("SELECT notas FROM atenciones WHERE sistema = 'HSJ'")).scalars().all()
    sensitive = {value.strip() for row in rows for value in row if value and len(value.strip()) >= 6}
    sensitive |= {note for note in notes if note and len(note) >= 6}
    leaked = sorted(value for value in sensitive if value in logs)
    assert leaked == []


def test_unreachable_target_fails_as_connection_error_after_retries_without_the_password(clinical: Clinical) -> None:
    broken = clinical.target_url.replace("postgres@", "postgres:s3cr3t-pw@").rsplit("/", 1)[0] + "/no_such_db"
    result = clinical.materialize("HSJ", assets=(patients,), _target_url=broken)
    assert not result.success
    logs = _all_log_text(clinical.instance, result.run_id)
    assert "CONNECTION_ERROR" in logs and "s3cr3t-pw" not in logs
    restarts = [e for e in result.all_events if e.event_type_value == "STEP_RESTARTED"]
    assert len(restarts) == 2  # 3 attempts in all


def test_parameters_are_refused_before_anything_connects(clinical: Clinical) -> None:
    nowhere = {**clinical.sshd.resource_kwargs(), "port": 1}  # nothing listens: a connection would fail differently
    for bad in (
        {"usuario": "$(id)"},
        {"usuario": "ana", "pract_source": 5},
        {"usuario": "ana", "pract_source": -1, "pract_target": 2},
    ):
        result = materialize(
            [patients],
            partition_key="HSJ",
            resources={
                **clinical.resources(),
                "worker": WorkerResource(transport="ssh", command="x", ssh=SSHResource(**nowhere)),
            },
            instance=clinical.instance,
            run_config={"ops": {"patients": {"config": bad}}},
            raise_on_error=False,
        )
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert "VALIDATION_ERROR" in str(failure.step_failure_data.error)
        assert not [e for e in result.all_events if e.event_type_value == "STEP_RESTARTED"]


def test_one_worker_per_entity_and_sistema_at_a_time(mariadb_url: str, postgres_url: str) -> None:
    legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
    generate(legacy, patients_per_sistema=30, sistemas=("HSJ",))
    params = RunParameters(entity="patients", sistema="HSJ", usuario="ana", run_id="first")
    with target.connect() as orphan, locks.exclusive(orphan, "patients", "HSJ", 1):  # e.g. a dropped session's
        with pytest.raises(PartitionBusy, match="another worker holds patients/HSJ"):
            Migration(replace(params, run_id="second"), legacy, target, lock_wait_seconds=0.5).run()
        other = Migration(replace(params, entity="encounters", run_id="third"), legacy, target, lock_wait_seconds=0.5)
        assert other.run().counts.read > 0  # another entity is not blocked
    assert Migration(replace(params, run_id="fourth"), legacy, target).run().counts.inserted > 0


def test_a_mass_delete_verdict_that_comes_late_still_leaves_nothing_behind(
    mariadb_url: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard reads every id on a thread of its own while the run decides its first batches; the run
    commits nothing before the verdict. Here the verdict (a fifth of the partition is gone) comes after
    batches that would have committed updates: they are rolled back with the rest."""
    legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
    generate(legacy, patients_per_sistema=60, sistemas=("HSJ",))
    params = RunParameters(entity="patients", sistema="HSJ", usuario="ana", run_id="first", batch_size=5)
    assert Migration(params, legacy, target).run().counts.inserted > 20
    before = patients_snapshot(target)
    p = schema.pacientes
    with legacy.begin() as conn:  # every row changed, the highest fifth gone
        conn.execute(update(p).values(nombres=func.concat(func.coalesce(p.c.nombres, ""), " B")))
        top = conn.scalar(select(func.max(p.c.id)))
        conn.execute(p.delete().where(p.c.id > top - 12))
    with target.connect() as conn:
        gone = conn.scalar(select(func.count()).where(schema.patients.c.legacy_id > top - 12))
    monkeypatch.setattr(engine_module, "GUARD_IDS", 7)  # the guard compares the ids a few at a time
    slow = Migration._guard_mass_delete

    def late(self: Migration, *args: Any) -> None:
        time.sleep(2.0)  # the run has decided (and would have committed) several batches by now
        slow(self, *args)

    monkeypatch.setattr(Migration, "_guard_mass_delete", late)
    second = Migration(replace(params, run_id="second"), legacy, target)
    with pytest.raises(MassDeleteRefused, match=f"would delete {gone} patients of sistema HSJ"):
        second.run()
    assert patients_snapshot(target) == before
    with target.connect() as conn:
        assert conn.scalar(select(func.count()).where(schema.ledger.c.run_id == "second")) == 0


def test_a_full_run_counts_the_eligible_rows_from_the_ids_its_guard_reads(
    mariadb_url: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E (the partition's eligible source rows) of a full run: counted on a first run (the guard reads
    nothing) and when the guard is off (``allow_mass_delete``) or starts past the partition's start (a
    resumed run); on a re-run from the start, from the source ids the guard reads — soft-deleted rows left
    out, rows past the target's last legacy id (new since) counted. Each time equal to a count of its own."""
    legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
    generate(legacy, patients_per_sistema=60, sistemas=("HSJ", "CLN01"))
    params = RunParameters(entity="patients", sistema="HSJ", usuario="ana", run_id="first", batch_size=7)
    counted: list[tuple[Any, ...]] = []
    monkeypatch.setattr(counts_module, "count_eligible", lambda *args: counted.append(args) or count_eligible(*args))

    def eligible_after(run_id: str, **changes: Any) -> int:
        migration = Migration(replace(params, run_id=run_id, **changes), legacy, target)
        assert migration.counts_eligible
        migration.run()
        assert migration.eligible() == count_eligible("patients", "HSJ", legacy)
        return migration.eligible()

    eligible_after("first")
    assert len(counted) == 1  # nothing migrated yet: nothing for the guard to read
    p = schema.pacientes
    columns = [c for c in p.c if c.name != "id"]
    with legacy.begin() as conn:
        lowest = conn.scalar(select(func.min(p.c.id)).where(p.c.sistema == "HSJ", p.c.eliminado == 0))
        conn.execute(update(p).where(p.c.id.in_([lowest, lowest + 3])).values(eliminado=1))
        conn.execute(  # five new rows of the sistema, past every id the target holds
            p.insert().from_select(columns, select(*columns).where(p.c.sistema == "HSJ").order_by(p.c.id).limit(5))
        )
    monkeypatch.setattr(engine_module, "GUARD_IDS", 9)  # the guard reads the ids a few ranges at a time
    before = eligible_after("second")
    assert len(counted) == 1, "the re-run counted the source again instead of using the ids its guard read"
    assert eligible_after("third", allow_mass_delete=True) == before
    assert len(counted) == 2  # no guard: counted
    with legacy.connect() as source, target.connect() as conn:
        resumed = Migration(replace(params, run_id="fourth"), legacy, target)
        assert resumed._guard_mass_delete(source, conn, after=lowest + 10) is None  # not from the start: counted


def test_the_encounters_patient_lookups_are_priced_as_index_lookups(
    mariadb_url: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader thread looks an encounters page's patients up on a connection of its own, priced like
    the run's (store.prefer_index_lookups). At PostgreSQL's default random_page_cost, one look-up of 11k
    of 440k patients took 60–80 ms against 36 ms, and the look-ups of an unchanged 727k-encounter run
    2.8 s against 1.0 s."""
    legacy, target = schema.make_engine(mariadb_url), schema.make_engine(postgres_url)
    generate(legacy, patients_per_sistema=30, sistemas=("HSJ",))
    params = RunParameters(entity="patients", sistema="HSJ", usuario="ana", run_id="patients")
    Migration(params, legacy, target).run()
    priced: list[str] = []
    looked_up = engine_module.migrated_patients

    def spy(conn: Any, sistema: str, encounters: Any) -> Any:
        priced.append(str(conn.exec_driver_sql("SHOW random_page_cost").scalar()))
        return looked_up(conn, sistema, encounters)

    monkeypatch.setattr(engine_module, "migrated_patients", spy)
    assert Migration(replace(params, entity="encounters", run_id="encounters"), legacy, target).run().counts.inserted
    assert priced and set(priced) == {"1.1"}, priced


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_a_document_freed_by_a_soft_delete_goes_to_the_next_claimant(clinical: Clinical, mode: str) -> None:
    """A lower row that this very batch deletes must not make a valid row a duplicate."""
    assert clinical.materialize("HSJ", assets=(patients,)).success
    low, high = clinical.scalar(
        clinical.target, "SELECT array_agg(legacy_id ORDER BY legacy_id) FROM clinical.patients"
    )[:2]
    pacientes = schema.pacientes
    with clinical.legacy.begin() as conn:  # a document no other row has
        conn.execute(update(pacientes).where(pacientes.c.id == low).values(documento="FREED-0001"))
    assert clinical.materialize("HSJ", assets=(patients,)).success
    later = clinical.scalar(clinical.legacy, "SELECT max(actualizado_en) FROM pacientes") + timedelta(hours=1)
    with clinical.legacy.begin() as conn:
        conn.execute(update(pacientes).where(pacientes.c.id == low).values(eliminado=1, actualizado_en=later))
        conn.execute(
            update(pacientes).where(pacientes.c.id == high).values(documento=" freed 0001", actualizado_en=later)
        )
    result = clinical.materialize("HSJ", assets=(patients,), mode=mode)
    assert result.success
    meta = metadata(result, "patients")
    assert (meta["deleted"], meta["updated"], meta["inserted"]) == (1, 1, 0)
    with clinical.target.connect() as conn:
        holder = conn.execute(text("SELECT legacy_id FROM clinical.patients WHERE national_id = 'FREED0001'")).scalar()
        quarantined = conn.execute(
            text("SELECT count(*) FROM migration.quarantine WHERE legacy_id = :h"), {"h": high}
        ).scalar()
    assert holder == high and quarantined == 0
