"""Alerts (resources/alerts.py): payload and e-mail, the outbox, dedupe, retries, redaction.

The delivery tests use real servers on loopback: pytest-httpserver for the webhook, aiosmtpd for
SMTP; the outbox lives in SQLite (the demo) and in PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from dagster import EnvVar, build_resources
from pytest_httpserver import HTTPServer
from sqlalchemy import select
from werkzeug import Request, Response

from resources.alerts import (
    Alert,
    AlertResource,
    AlertType,
    Status,
    alerts,
    describe,
    email,
    parse_smtp_url,
    payload,
    run_url,
)
from resources.errors import Category
from worker.schema import make_engine

from .mail import SMTP_PASSWORD, Mailbox, start_mailbox
from .ports import free_port

HOOK_PATH = "/services/T000/B000/HOOKSECRETPATH"
LEAK = "postgresql://user:secret@db.internal/clinical failed: password=hunter2 for 'Ana María' ana.perez@example.com"
SECRETS = ("secret@", "hunter2", "Ana María", "ana.perez@example.com", SMTP_PASSWORD, "HOOKSECRETPATH", "QSECRET")
STRUCTURED = ("type", "key", "run_id", "job", "entity", "partition", "category", "message", "run_url", "details")


def make_alert(**overrides: Any) -> Alert:
    values: dict[str, Any] = {
        "type": AlertType.MIGRATION_FAILED,
        "run_id": "3f9c2a1b-0000-4000-8000-000000000001",
        "job": "migrate_patients",
        "entity": "patients",
        "partition": "HSJ",
        "category": Category.CONNECTION_ERROR,
        "message": "could not reach the legacy DB",
        "run_url": "http://dagster.example:3000/runs/3f9c2a1b-0000-4000-8000-000000000001",
        "details": {"attempt": 3, "retryable": True, "host": "legacy.internal"},
    }
    return Alert(**(values | overrides))


def utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def state_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The control DB holding migration.alerts: the demo's SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("postgres_url")


def hook_url(httpserver: HTTPServer) -> str:
    return httpserver.url_for(f"{HOOK_PATH}?token=QSECRET")


def outbox(url: str) -> list[dict[str, Any]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(row) for row in conn.execute(select(alerts).order_by(alerts.c.id)).mappings()]
    finally:
        engine.dispose()


def posted(httpserver: HTTPServer) -> list[dict[str, Any]]:
    return [json.loads(request.get_data()) for request, response in httpserver.log if response.status_code == 200]


# -- pure logic --------------------------------------------------------------------------------


def test_alert_defaults_and_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGSTER_WEBSERVER_URL", "https://dagster.example/")
    alert = Alert(
        type="ROLLBACK_FAILED", run_id="r1", category=Category.SCRIPT_ERROR, message=LEAK, details={"x": LEAK}
    )
    assert alert.type is AlertType.ROLLBACK_FAILED
    assert alert.key == "ROLLBACK_FAILED:r1"
    assert alert.run_url == "https://dagster.example/runs/r1"
    assert alert.category == "SCRIPT_ERROR" and type(alert.category) is str
    assert alert.created_at.tzinfo is not None
    for secret in SECRETS:
        assert secret not in alert.message and secret not in str(alert.details)
    assert "db.internal/clinical" in alert.message  # the host a person needs is kept
    with pytest.raises(ValueError):
        Alert(type=AlertType.HEALTH_DOWN, run_id="r", key="k" * 256)


def test_run_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_WEBSERVER_URL", raising=False)
    assert run_url("abc") == "http://localhost:3000/runs/abc"
    assert run_url("abc", "http://ui:8080/") == "http://ui:8080/runs/abc"
    assert run_url("a/b?c") == "http://localhost:3000/runs/a%2Fb%3Fc"


def test_payload_has_slack_text_and_every_field() -> None:
    alert = make_alert(message="line one\nline <two> & more")
    body = payload(alert)
    assert json.loads(json.dumps(body)) == body
    assert body["text"] == (
        "[MIGRATION_FAILED] patients/HSJ: CONNECTION_ERROR — line one line &lt;two&gt; &amp; more "
        f"<{alert.run_url}|run 3f9c2a1b>"
    )
    assert {k: body[k] for k in STRUCTURED} == {
        "type": "MIGRATION_FAILED",
        "key": f"MIGRATION_FAILED:{alert.run_id}",
        "run_id": alert.run_id,
        "job": "migrate_patients",
        "entity": "patients",
        "partition": "HSJ",
        "category": "CONNECTION_ERROR",
        "message": "line one\nline <two> & more",
        "run_url": alert.run_url,
        "details": {"attempt": 3, "retryable": True, "host": "legacy.internal"},
    }
    assert Alert.from_payload(body) == alert


def test_email_subject_and_body() -> None:
    alert = make_alert()
    message = email(alert, "migration@clinic.example", "ops@clinic.example, Oncall <oncall@clinic.example>")
    assert message["Subject"] == "[MIGRATION_FAILED] patients/HSJ: CONNECTION_ERROR"
    assert message["From"] == "migration@clinic.example"
    assert message["To"] == "ops@clinic.example, oncall@clinic.example"
    body = message.get_content()
    for line in (
        "type: MIGRATION_FAILED",
        f"run_id: {alert.run_id}",
        "job: migrate_patients",
        "entity: patients",
        "partition: HSJ",
        "category: CONNECTION_ERROR",
        f"run_url: {alert.run_url}",
        f"key: {alert.key}",
        "  could not reach the legacy DB",
        "  attempt: 3",
        "  retryable: True",
    ):
        assert line in body
    bare = email(Alert(type=AlertType.ROLLBACK_DONE, run_id="r2", job="rollback_job"), "a@b", ["x@y"])
    assert bare["Subject"] == "[ROLLBACK_DONE] rollback_job"


def test_parse_smtp_url() -> None:
    plain = parse_smtp_url("smtp://mailer:p%40ss@mail.example:2525?starttls=true")
    assert (plain.host, plain.port, plain.use_ssl, plain.starttls) == ("mail.example", 2525, False, True)
    assert (plain.username, plain.password) == ("mailer", "p@ss")
    assert "p@ss" not in repr(plain)
    tls = parse_smtp_url("smtps://mail.example")
    assert (tls.port, tls.use_ssl, tls.starttls, tls.username) == (465, True, False, None)
    assert parse_smtp_url("smtp://relay").port == 25
    with pytest.raises(ValueError):
        parse_smtp_url("http://mail.example")


def test_backoff_doubles_and_is_capped() -> None:
    resource = AlertResource(state_db_url="sqlite://", base_delay_seconds=30)
    assert [resource.backoff(n).total_seconds() for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert resource.backoff(8) == timedelta(hours=1)
    assert resource.backoff(1000) == timedelta(hours=1)


def test_describe_names_no_url_or_password() -> None:
    import requests

    problem = requests.ConnectionError(f"HTTPConnectionPool(host='h', port=1): Max retries with url: {HOOK_PATH}")
    assert describe(problem) == "ConnectionError"
    assert describe(ConnectionRefusedError(111, "Connection refused")) == "ConnectionRefusedError: Connection refused"


def test_fields_read_from_env_vars(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALERT_WEBHOOK_URL", "https://hooks.example/services/X")
    monkeypatch.setenv("ALERT_SMTP_URL", "smtp://u:p@mail.example:25")
    monkeypatch.setenv("ALERT_EMAIL_TO", "a@example.com,b@example.com")
    monkeypatch.setenv("STATE_DB_URL", f"sqlite:///{tmp_path / 'state.db'}")
    configured = AlertResource(
        webhook_url=EnvVar("ALERT_WEBHOOK_URL"),
        smtp_url=EnvVar("ALERT_SMTP_URL"),
        email_to=EnvVar("ALERT_EMAIL_TO"),
        state_db_url=EnvVar("STATE_DB_URL"),
    )
    with build_resources({"alerts": configured}) as resources:
        alerts_resource: AlertResource = resources.alerts
        assert alerts_resource.webhook_url == "https://hooks.example/services/X"
        assert alerts_resource.webhook_enabled and alerts_resource.email_enabled
        assert alerts_resource.state_db_url.endswith("state.db")


# -- delivery through the outbox, real servers ------------------------------------------------


@pytest.mark.integration
def test_one_alert_reaches_webhook_and_smtp(httpserver: HTTPServer, smtp_server: Mailbox, state_db_url: str) -> None:
    httpserver.expect_request(HOOK_PATH, method="POST").respond_with_data("ok")
    resource = AlertResource(
        webhook_url=hook_url(httpserver),
        smtp_url=smtp_server.url,
        email_to="ops@clinic.example",
        email_from="migration@clinic.example",
        state_db_url=state_db_url,
    )
    alert = make_alert()
    assert resource.send(alert) is True

    [body] = posted(httpserver)
    assert body == payload(alert)
    assert body["text"].startswith("[MIGRATION_FAILED] patients/HSJ: CONNECTION_ERROR — could not reach")
    assert alert.run_url in body["text"]
    request = httpserver.log[0][0]
    assert request.headers["Content-Type"] == "application/json"

    [message] = smtp_server.messages
    assert message["Subject"] == "[MIGRATION_FAILED] patients/HSJ: CONNECTION_ERROR"
    assert message["To"] == "ops@clinic.example"
    text = message.get_content()
    for value in (alert.run_id, alert.run_url, "migrate_patients", "CONNECTION_ERROR", "could not reach", alert.key):
        assert value in text

    [row] = outbox(state_db_url)
    assert (row["key"], row["type"]) == (alert.key, "MIGRATION_FAILED")
    assert (row["webhook_status"], row["email_status"], row["attempts"]) == ("sent", "sent", 0)
    assert row["sent_at"] is not None and row["last_error"] is None
    assert row["payload"] == body
    assert resource.deliver_pending(datetime.now(UTC) + timedelta(days=1)) == 0
    assert len(httpserver.log) == 1 and len(smtp_server.messages) == 1


@pytest.mark.integration
def test_secrets_never_leave(
    httpserver: HTTPServer, smtp_server: Mailbox, state_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resources.alerts")
    httpserver.expect_oneshot_request(HOOK_PATH, method="POST").respond_with_data("no", status=500)
    httpserver.expect_request(HOOK_PATH, method="POST").respond_with_data("ok")
    wrong_login = Mailbox(smtp_server.port, password="wrong-" + SMTP_PASSWORD)
    config = {"webhook_url": hook_url(httpserver), "email_to": "ops@clinic.example", "state_db_url": state_db_url}

    first = AlertResource(smtp_url=wrong_login.url, **config)
    assert first.send(make_alert(message=LEAK, details={"error": LEAK})) is True  # both channels fail once
    [row] = outbox(state_db_url)
    assert (row["webhook_status"], row["email_status"], row["attempts"]) == ("pending", "pending", 1)
    assert f"webhook {httpserver.host}: HTTP 500" in row["last_error"]
    assert "email 127.0.0.1: SMTPAuthenticationError: 535" in row["last_error"]

    later = datetime.now(UTC) + timedelta(hours=2)
    assert AlertResource(smtp_url=smtp_server.url, **config).deliver_pending(later) == 2

    leaving = {
        "webhook bodies": b"".join(request.get_data() for request, _ in httpserver.log).decode(),
        "e-mail": b"".join(smtp_server.raw).decode(errors="replace"),
        "outbox": repr(outbox(state_db_url)),
        # (not the test servers' own access logs: werkzeug's quotes every request line)
        "logs": "\n".join(r.getMessage() for r in caplog.records if r.name not in ("werkzeug", "mail.log")),
    }
    assert f"webhook {httpserver.host}: HTTP 500" in leaving["logs"]  # the host is named, nothing more
    for where, text in leaving.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} reached the {where}"
        assert "wrong-" not in text
    assert "postgresql://***@db.internal/clinical" in leaving["webhook bodies"]


@pytest.mark.integration
def test_one_key_one_delivery_across_restarts(httpserver: HTTPServer, smtp_server: Mailbox, state_db_url: str) -> None:
    httpserver.expect_request(HOOK_PATH, method="POST").respond_with_data("ok")
    config = {
        "webhook_url": hook_url(httpserver),
        "smtp_url": smtp_server.url,
        "email_to": "ops@clinic.example",
        "state_db_url": state_db_url,
    }
    sensor = AlertResource(**config)
    assert sensor.send(make_alert()) is True
    assert sensor.send(make_alert(message="the same failure, seen again")) is False
    restarted = AlertResource(**config)  # a new sensor process on the same state DB
    assert restarted.send(make_alert()) is False
    assert len(httpserver.log) == 1 and len(smtp_server.messages) == 1

    assert restarted.send(make_alert(run_id="another-run")) is True
    assert len(httpserver.log) == 2 and len(smtp_server.messages) == 2
    assert [row["key"] for row in outbox(state_db_url)] == [
        f"MIGRATION_FAILED:{make_alert().run_id}",
        "MIGRATION_FAILED:another-run",
    ]


@pytest.mark.integration
def test_webhook_error_is_retried_later(httpserver: HTTPServer, state_db_url: str) -> None:
    httpserver.expect_request(HOOK_PATH, method="POST").respond_with_data("down", status=500)
    resource = AlertResource(webhook_url=hook_url(httpserver), state_db_url=state_db_url, base_delay_seconds=30)
    before = datetime.now(UTC)
    assert resource.send(make_alert()) is True

    [row] = outbox(state_db_url)
    assert (row["webhook_status"], row["email_status"], row["attempts"]) == ("pending", "off", 1)
    assert utc(row["next_attempt_at"]) >= before + timedelta(seconds=30)
    assert row["last_error"] == f"webhook {httpserver.host}: HTTP 500"
    assert resource.deliver_pending() == 0  # not due yet: no new request
    assert len(httpserver.log) == 1

    httpserver.clear_all_handlers()
    httpserver.expect_request(HOOK_PATH, method="POST").respond_with_data("ok")
    later = datetime.now(UTC) + timedelta(minutes=5)
    assert resource.deliver_pending(later) == 1
    assert resource.deliver_pending(later + timedelta(hours=2)) == 0
    assert len(posted(httpserver)) == 1
    [row] = outbox(state_db_url)
    assert (row["webhook_status"], row["attempts"]) == ("sent", 1)


@pytest.mark.integration
def test_smtp_down_is_retried_later(state_db_url: str) -> None:
    mailbox = Mailbox(free_port())  # nothing listens there yet
    resource = AlertResource(smtp_url=mailbox.url, email_to="ops@clinic.example", state_db_url=state_db_url)
    before = datetime.now(UTC)
    assert resource.send(make_alert()) is True
    [row] = outbox(state_db_url)
    assert (row["webhook_status"], row["email_status"], row["attempts"]) == ("off", "pending", 1)
    assert utc(row["next_attempt_at"]) > before
    assert row["last_error"].startswith("email 127.0.0.1: ConnectionRefusedError")

    controller = start_mailbox(mailbox)
    try:
        later = datetime.now(UTC) + timedelta(minutes=5)
        assert resource.deliver_pending(later) == 1
        assert resource.deliver_pending(later + timedelta(hours=2)) == 0
    finally:
        controller.stop()
    assert len(mailbox.messages) == 1
    assert outbox(state_db_url)[0]["email_status"] == "sent"


@pytest.mark.integration
def test_gives_up_after_max_attempts(
    httpserver: HTTPServer, state_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    httpserver.expect_request(HOOK_PATH, method="POST").respond_with_data("down", status=503)
    resource = AlertResource(webhook_url=hook_url(httpserver), state_db_url=state_db_url, max_attempts=2)
    assert resource.send(make_alert()) is True
    now = datetime.now(UTC)
    assert resource.deliver_pending(now + timedelta(hours=2)) == 0
    assert resource.deliver_pending(now + timedelta(days=2)) == 0
    [row] = outbox(state_db_url)
    assert (row["webhook_status"], row["attempts"]) == (Status.FAILED, 2)
    assert len(httpserver.log) == 2
    assert sum("gave up" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.integration
def test_concurrent_sensors_deliver_once(httpserver: HTTPServer, state_db_url: str) -> None:
    httpserver.expect_oneshot_request(HOOK_PATH, method="POST").respond_with_data("down", status=500)
    config = {"webhook_url": hook_url(httpserver), "state_db_url": state_db_url}
    assert AlertResource(**config).send(make_alert()) is True

    def slow(request: Request) -> Response:
        time.sleep(0.5)
        return Response("ok")

    httpserver.expect_request(HOOK_PATH, method="POST").respond_with_handler(slow)
    later = datetime.now(UTC) + timedelta(hours=2)
    counts: list[int] = []
    start = threading.Barrier(2)

    def sensor() -> None:
        resource = AlertResource(**config)
        start.wait()
        counts.append(resource.deliver_pending(later))

    threads = [threading.Thread(target=sensor) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(counts) == [0, 1]
    assert len(posted(httpserver)) == 1


def test_unconfigured_channels_are_off(state_db_url: str) -> None:
    resource = AlertResource(webhook_url="", smtp_url=None, email_to="ops@clinic.example", state_db_url=state_db_url)
    assert resource.send(make_alert()) is True
    assert resource.deliver_pending(datetime.now(UTC) + timedelta(days=1)) == 0
    [row] = outbox(state_db_url)
    assert (row["webhook_status"], row["email_status"], row["attempts"], row["last_error"]) == ("off", "off", 0, None)


def test_unreachable_outbox_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    resource = AlertResource(state_db_url=f"postgresql+psycopg://u:dbpa55word@127.0.0.1:{port}/x", timeout_seconds=1)
    assert resource.send(make_alert(message=LEAK)) is False
    assert resource.deliver_pending() == 0
    assert "outbox unavailable (OperationalError)" in caplog.text
    assert "dbpa55word" not in caplog.text
