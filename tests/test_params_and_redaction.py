"""Parameter validation (§8), the redaction layer, log batching and error categories (pure logic)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from resources.errors import Category, MigrationError
from resources.worker import LogBatcher
from worker.params import InvalidParameters, RunParameters, validate
from worker.redact import redact

GOOD = RunParameters(entity="patients", sistema="HSJ", usuario="ana.maria@x-y", run_id="r-1")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"sistema": "hsj"}, "sistema"),
        ({"sistema": "H"}, "sistema"),
        ({"sistema": "HSJ; rm -rf /"}, "sistema"),
        ({"sistema": "A" * 17}, "sistema"),
        ({"usuario": "$(id)"}, "usuario"),
        ({"usuario": ""}, "usuario"),
        ({"usuario": "a" * 65}, "usuario"),
        ({"usuario": "ana maria"}, "usuario"),
        ({"pract_source": 5}, "go together"),
        ({"pract_target": 5}, "go together"),
        ({"pract_source": 0, "pract_target": 5}, "positive"),
        ({"pract_source": -3, "pract_target": 5}, "positive"),
        ({"mode": "partial"}, "mode"),
        ({"entity": "users"}, "entity"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 50_001}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"run_id": "x y"}, "run_id"),
    ],
)
def test_bad_parameters_are_refused(change: dict[str, object], problem: str) -> None:
    with pytest.raises(InvalidParameters, match=problem):
        validate(replace(GOOD, **change))  # type: ignore[arg-type]


def test_good_parameters_pass_and_build_a_quoted_argv() -> None:
    params = validate(replace(GOOD, pract_source=12, pract_target=900, dry_run=True, mode="incremental"))
    assert params.worker_argv() == [
        "migrate", "--entity", "patients", "--sistema", "HSJ", "--usuario", "ana.maria@x-y", "--run-id", "r-1",
        "--mode", "incremental", "--max-delete-share", "0.1",
        "--pract-source", "12", "--pract-target", "900", "--dry-run",
    ]  # fmt: skip
    # no batch size: the worker sizes its pages by memory; a given one is passed on
    assert validate(replace(GOOD, batch_size=500)).worker_argv()[-2:] == ["--batch-size", "500"]


def test_an_app_run_without_a_batch_size_reads_pages_of_its_entitys_own_size() -> None:
    """An app run reads its shard a page at a time, never whole: without a batch size, a page of its entity's
    own size (files, whose blobs are copied while the page before is committed, the smallest); a batch size
    outside 1-50,000 is refused before anything starts."""
    from migration_assets.app.migrate import PAGE_ROWS, AppRunParameters, page_rows, validate_app

    def params(entity: str = "files", **kw: object) -> AppRunParameters:
        return AppRunParameters(entity=entity, shard="shard-00", usuario="ana", run_id="r-1", **kw)  # type: ignore[arg-type]

    for entity in ("users", "files", "filters"):
        assert page_rows(validate_app(params(entity))) == PAGE_ROWS[entity]
    assert 1 <= PAGE_ROWS["files"] < PAGE_ROWS["users"] == PAGE_ROWS["filters"] <= 50_000
    assert page_rows(validate_app(params(batch_size=7))) == 7
    for bad in (0, 50_001, True, "10"):
        with pytest.raises(InvalidParameters, match="batch_size"):
            validate_app(params(batch_size=bad))


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("connecting to postgresql+psycopg://migrator:Sup3r-Secret@db:5432/clinical", "Sup3r-Secret"),
        ("mysql+pymysql://root:hunter2@10.0.0.1/his failed", "hunter2"),
        ("password=hunter2 host=x", "hunter2"),
        ("PASSWORD: 'hunter 2'", "hunter 2"),
        ("hash pbkdf2_sha256$600000$salt$abcdef== leaked", "pbkdf2_sha256$600000$salt$abcdef=="),
        ("DETAIL:  Key (sistema, national_id)=(HSJ, 1020304) already exists.", "1020304"),
        ("Failing row contains (7, HSJ, Ana María, 1020304).", "Ana María"),
        ("Incorrect datetime value: '31/02/2001' for column", "31/02/2001"),
        ('invalid input "Gómez Ruiz"', "Gómez Ruiz"),
        ("mail ana.gomez@mail.com bounced", "ana.gomez@mail.com"),
        ("call +57 300 123 4567 now", "300 123 4567"),
        ("doc 1020304050", "1020304050"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----", "b3BlbnNzaC1rZXk"),
        ("[SQL: INSERT ...]\n[parameters: ('Ana', 'Gómez')]", "Gómez"),
    ],
)
def test_redaction_masks_secrets_and_personal_data(line: str, secret: str) -> None:
    assert secret not in redact(line)


def test_redaction_keeps_ordinary_text() -> None:
    line = "batch 12 of patients for HSJ committed in 0.4 s"
    assert redact(line) == line


def test_log_batches_hold_at_most_fifty_lines() -> None:
    events: list[str] = []
    batcher = LogBatcher(events.append, max_lines=50, max_seconds=3600)
    for n in range(120):
        batcher.add(f"line {n} user@example.com")
    batcher.flush()
    assert [len(e.splitlines()) for e in events] == [50, 50, 20]
    assert "example.com" not in "".join(events)


def test_log_batches_flush_after_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr("resources.worker.time.monotonic", lambda: now[0])
    events: list[str] = []
    batcher = LogBatcher(events.append)
    batcher.add("a")
    now[0] = 0.5
    batcher.add("b")
    assert events == []
    now[0] = 1.2
    batcher.flush_if_due()
    assert events == ["a\nb"]


def test_a_quiet_worker_still_gets_its_lines_out_within_a_second() -> None:
    events: list[str] = []
    batcher = LogBatcher(events.append, max_seconds=0.2)
    batcher.add("only line")
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        time.sleep(0.02)
    assert events == ["only line"]


@pytest.mark.parametrize(
    ("category", "retryable"),
    [
        (Category.CONNECTION_ERROR, True),
        (Category.TIMEOUT_ERROR, True),
        (Category.AUTHENTICATION_ERROR, False),
        (Category.SSH_HOST_KEY_ERROR, False),
        (Category.COMMAND_NOT_FOUND, False),
        (Category.VALIDATION_ERROR, False),
        (Category.SCRIPT_ERROR, False),
    ],
)
def test_only_connection_and_timeout_failures_retry(category: Category, retryable: bool) -> None:
    failure = MigrationError(category, "postgresql://u:pw@h/db unreachable").as_failure()
    assert failure.allow_retries is retryable
    assert failure.metadata["error_category"].value == category.value
    assert "pw@" not in (failure.description or "")
