"""Alerts (DESIGN §7): a webhook (Slack-compatible JSON) and e-mail, delivered through an outbox.

Every alert is written to ``migration.alerts`` under a dedupe key before anything is sent, so one
failure gives one alert, also across sensor restarts; a channel that cannot be reached is retried
with exponential backoff by later :meth:`AlertResource.deliver_pending` calls. Nothing here raises
into a sensor: failures are logged, one short redacted line each, naming hosts only (never a
webhook's secret path or an SMTP password). Messages pass through :func:`worker.redact.redact`
when an alert is made (DESIGN §8).
"""

from __future__ import annotations

import logging
import os
import smtplib
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid
from enum import StrEnum
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import requests
from dagster import ConfigurableResource
from pydantic import Field
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from worker.redact import redact
from worker.schema import create_schemas, has_table, make_engine

log = logging.getLogger(__name__)

DEFAULT_WEBSERVER_URL = "http://localhost:3000"
MAX_KEY_LENGTH = 255
MAX_DELAY = timedelta(hours=1)
BATCH = 50  # outbox rows looked at per deliver_pending call: a sensor tick stays short

Detail = str | int | float | bool


class AlertType(StrEnum):
    MIGRATION_FAILED = "MIGRATION_FAILED"
    CHECK_FAILED = "CHECK_FAILED"
    ROLLBACK_DONE = "ROLLBACK_DONE"
    ROLLBACK_FAILED = "ROLLBACK_FAILED"
    HEALTH_DOWN = "HEALTH_DOWN"
    HEALTH_RECOVERED = "HEALTH_RECOVERED"


class Status(StrEnum):
    """Delivery state of one channel of one alert."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # gave up after max_attempts
    OFF = "off"  # channel not configured


def webserver_url() -> str:
    """The Dagster UI's address, for links in alerts: ``DAGSTER_WEBSERVER_URL`` or localhost:3000."""
    return (os.environ.get("DAGSTER_WEBSERVER_URL") or DEFAULT_WEBSERVER_URL).rstrip("/")


def run_url(run_id: str, base: str | None = None) -> str:
    """The run's page in the Dagster UI (``base``: the UI's address, default :func:`webserver_url`)."""
    return f"{(base or webserver_url()).rstrip('/')}/runs/{quote(run_id, safe='')}"


@dataclass(frozen=True, kw_only=True)
class Alert:
    """One alert. ``message`` and string ``details`` are redacted here, whoever makes the alert.

    ``key`` (default ``"<type>:<run_id>"``) is the dedupe key: one alert per key, ever.
    """

    type: AlertType
    key: str = ""
    run_id: str
    job: str | None = None
    entity: str | None = None
    partition: str | None = None
    category: str | None = None
    message: str = ""
    run_url: str = ""
    details: dict[str, Detail] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        kind = AlertType(self.type)
        key = self.key or f"{kind}:{self.run_id}"
        if len(key) > MAX_KEY_LENGTH:
            raise ValueError(f"alert key longer than {MAX_KEY_LENGTH} characters")
        values: dict[str, Any] = {
            "type": kind,
            "key": key,
            "category": None if self.category is None else str(self.category),
            "message": redact(self.message),
            "run_url": self.run_url or run_url(self.run_id),
            "details": {k: redact(v) if isinstance(v, str) else v for k, v in self.details.items()},
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def where(self) -> str:
        """``entity/partition`` (or the job, or the run id) for titles."""
        return "/".join(p for p in (self.entity, self.partition) if p) or self.job or self.run_id

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> Alert:
        """The alert back from its :func:`payload` (as stored in the outbox)."""
        fields = ("key", "run_id", "job", "entity", "partition", "category", "message", "run_url", "details")
        return cls(
            type=AlertType(data["type"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            **{name: data[name] for name in fields if data.get(name) is not None},
        )


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def payload(alert: Alert) -> dict[str, Any]:
    """The webhook's JSON: a Slack ``text`` line plus every structured field at top level."""
    head = f"[{alert.type}] {alert.where}" + (f": {alert.category}" if alert.category else "")
    line = head + (f" — {_one_line(alert.message)}" if alert.message else "")
    return {
        "text": f"{_slack_escape(line)} <{alert.run_url}|run {_slack_escape(alert.run_id[:8])}>",
        "type": str(alert.type),
        "key": alert.key,
        "run_id": alert.run_id,
        "job": alert.job,
        "entity": alert.entity,
        "partition": alert.partition,
        "category": alert.category,
        "message": alert.message,
        "run_url": alert.run_url,
        "details": dict(alert.details),
        "created_at": alert.created_at.isoformat(),
    }


def recipients(to: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Addresses from a comma-separated string (``ALERT_EMAIL_TO``) or a list; blanks dropped."""
    if not to:
        return []
    return [address for _, address in getaddresses([to] if isinstance(to, str) else list(to)) if address]


def email(alert: Alert, sender: str, to: str | list[str] | tuple[str, ...]) -> EmailMessage:
    """The plain-text e-mail: subject ``[TYPE] entity/partition: CATEGORY``, body with every field."""
    message = EmailMessage()
    subject = f"[{alert.type}] {alert.where}" + (f": {alert.category}" if alert.category else "")
    message["Subject"] = _one_line(subject, 180)
    message["From"] = sender
    message["To"] = ", ".join(recipients(to))
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "localhost")
    lines = [
        f"{alert.type}: {alert.where}",
        "",
        f"type: {alert.type}",
        f"run_id: {alert.run_id}",
        f"job: {alert.job or '-'}",
        f"entity: {alert.entity or '-'}",
        f"partition: {alert.partition or '-'}",
        f"category: {alert.category or '-'}",
        f"run_url: {alert.run_url}",
        f"created_at: {alert.created_at.isoformat()}",
        f"key: {alert.key}",
        "",
        "message:",
        *(f"  {line}" for line in (alert.message or "-").splitlines()),
    ]
    if alert.details:
        lines += ["", "details:", *(f"  {k}: {v}" for k, v in alert.details.items())]
    message.set_content("\n".join(lines) + "\n")
    return message


# -- the outbox --------------------------------------------------------------------------------

alerts_metadata = MetaData()

alerts = Table(
    "alerts",
    alerts_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(MAX_KEY_LENGTH), nullable=False),
    Column("type", String(32), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("webhook_status", String(8), nullable=False),
    Column("email_status", String(8), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", String(255)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, index=True),
    Column("sent_at", DateTime(timezone=True)),
    UniqueConstraint("key", name="uq_alerts_key"),
    schema="migration",
)


# -- delivery ----------------------------------------------------------------------------------


class DeliveryError(Exception):
    """A refused delivery; the text is the project's own (a status code), never a URL."""


@dataclass(frozen=True)
class SmtpTarget:
    """An ``ALERT_SMTP_URL``: ``smtp[s]://[user[:password]@]host[:port][?starttls=true]``."""

    host: str
    port: int
    use_ssl: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_smtp_url(url: str) -> SmtpTarget:
    """Parse an SMTP URL (port 25 for ``smtp``, 465 for ``smtps``); ``ValueError`` when malformed."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError("ALERT_SMTP_URL must look like smtp://user:password@host:port or smtps://…")
    query = dict(item.partition("=")[::2] for item in parts.query.split("&") if item)
    return SmtpTarget(
        host=parts.hostname,
        port=parts.port or (465 if parts.scheme == "smtps" else 25),
        use_ssl=parts.scheme == "smtps",
        starttls=query.get("starttls", "").lower() in ("1", "true", "yes"),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def post_webhook(url: str, body: dict[str, Any], timeout: float) -> None:
    """POST ``body`` as JSON; any answer but 2xx raises :class:`DeliveryError`."""
    response = requests.post(url, json=body, timeout=timeout, allow_redirects=False)
    if not 200 <= response.status_code < 300:
        raise DeliveryError(f"HTTP {response.status_code}")


def send_email(smtp_url: str, message: EmailMessage, timeout: float) -> None:
    """Send ``message`` through the SMTP server of ``smtp_url`` (TLS, STARTTLS and login as it says)."""
    target = parse_smtp_url(smtp_url)
    context = ssl.create_default_context()
    server: smtplib.SMTP
    if target.use_ssl:
        server = smtplib.SMTP_SSL(target.host, target.port, timeout=timeout, context=context)
    else:
        server = smtplib.SMTP(target.host, target.port, timeout=timeout)
    with server:
        if target.starttls:
            server.starttls(context=context)
        if target.username:
            server.login(target.username, target.password or "")
        server.send_message(message)


def _host(url: str | None) -> str:
    """Only the host of a URL, for log lines."""
    try:
        return urlsplit((url or "").strip()).hostname or "?"
    except ValueError:
        return "?"


def describe(problem: BaseException) -> str:
    """A short, safe description of a delivery failure (no URL, no credentials, redacted)."""
    name = type(problem).__name__
    if isinstance(problem, DeliveryError):
        return _one_line(str(problem), 120)
    if isinstance(problem, smtplib.SMTPResponseException):
        reply = problem.smtp_error
        reply = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
        return _one_line(f"{name}: {int(problem.smtp_code)} {redact(reply)}", 120)
    if isinstance(problem, requests.RequestException | smtplib.SMTPException):
        return name  # their texts quote the URL or the recipients
    if isinstance(problem, OSError) and problem.strerror:
        return _one_line(f"{name}: {redact(str(problem.strerror))}", 120)
    return name


class AlertResource(ConfigurableResource):
    """Where alerts go (``ALERT_WEBHOOK_URL``, ``ALERT_SMTP_URL``, ``ALERT_EMAIL_TO``) and the outbox's DB.

    A channel left unset (or blank) is off. :meth:`send` and :meth:`deliver_pending` never raise.
    """

    webhook_url: str | None = Field(default=None, description="Slack-compatible incoming webhook URL")
    smtp_url: str | None = Field(default=None, description="smtp[s]://user:password@host:port[?starttls=true]")
    email_to: str | None = Field(default=None, description="comma-separated recipients")
    email_from: str = Field(default="migration@localhost", description="sender address")
    state_db_url: str = Field(description="control DB holding migration.alerts (STATE_DB_URL)")
    timeout_seconds: float = Field(default=10, gt=0, description="per delivery attempt")
    max_attempts: int = Field(default=8, ge=1, description="attempts before a channel is given up")
    base_delay_seconds: float = Field(default=30, ge=0, description="first retry delay; doubles, at most 1 h")

    @property
    def webhook_enabled(self) -> bool:
        return bool(self.webhook_url and self.webhook_url.strip())

    @property
    def email_enabled(self) -> bool:
        return bool(self.smtp_url and self.smtp_url.strip() and recipients(self.email_to))

    def backoff(self, attempts: int) -> timedelta:
        """Delay before the next attempt after ``attempts`` failed ones."""
        seconds = self.base_delay_seconds * 2 ** min(max(attempts - 1, 0), 30)
        return min(timedelta(seconds=seconds), MAX_DELAY)

    def send(self, alert: Alert) -> bool:
        """Queue ``alert`` unless its key is already in the outbox, then deliver what is due.

        Returns whether the alert was new (delivery may still be pending); never raises."""
        try:
            engine = self._engine()
        except Exception as problem:
            log.error("alert %s: outbox unavailable (%s)", alert.key, describe(problem))
            return False
        try:
            now = datetime.now(UTC)
            row = {
                "key": alert.key,
                "type": str(alert.type),
                "payload": payload(alert),
                "webhook_status": Status.PENDING if self.webhook_enabled else Status.OFF,
                "email_status": Status.PENDING if self.email_enabled else Status.OFF,
                "attempts": 0,
                "created_at": now,
                "next_attempt_at": now,
            }
            try:
                with engine.begin() as conn:
                    conn.execute(insert(alerts).values(**row))
            except IntegrityError:
                return False  # already sent (or queued) by this or an earlier sensor process
            self._deliver(engine, now)
            return True
        except Exception as problem:
            log.error("alert %s: could not be queued (%s)", alert.key, describe(problem))
            return False
        finally:
            engine.dispose()

    def deliver_pending(self, now: datetime | None = None) -> int:
        """Try every channel due at ``now`` (default: now); returns the number of deliveries made.

        Never raises."""
        now = datetime.now(UTC) if now is None else _utc(now)
        try:
            engine = self._engine()
        except Exception as problem:
            log.error("alerts: outbox unavailable (%s)", describe(problem))
            return 0
        try:
            return self._deliver(engine, now)
        except Exception as problem:
            log.error("alerts: delivery pass failed (%s)", describe(problem))
            return 0
        finally:
            engine.dispose()

    # -- internals ---------------------------------------------------------------------------

    def _engine(self) -> Engine:
        engine = make_engine(self.state_db_url)
        try:
            if not has_table(engine, alerts):
                create_schemas(engine, alerts_metadata)
        except Exception:
            engine.dispose()
            raise
        return engine

    def _deliver(self, engine: Engine, now: datetime) -> int:
        pending = or_(alerts.c.webhook_status == Status.PENDING, alerts.c.email_status == Status.PENDING)
        query = (
            select(alerts)
            .where(pending, alerts.c.next_attempt_at <= now)
            .order_by(alerts.c.next_attempt_at, alerts.c.id)
            .limit(BATCH)
        )
        with engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        down: set[str] = set()  # channels that failed in this pass: not tried again until the next
        delivered = 0
        for row in rows:
            try:
                delivered += self._deliver_row(engine, dict(row), now, down)
            except Exception as problem:
                log.error("alert %s: delivery failed (%s)", row["key"], describe(problem))
        return delivered

    def _deliver_row(self, engine: Engine, row: dict[str, Any], now: datetime, down: set[str]) -> int:
        channels = [c for c in ("webhook", "email") if row[f"{c}_status"] == Status.PENDING]
        if all(c in down for c in channels):
            return 0
        # Claim the row: another process that read it too loses the race and skips it.
        lease = now + timedelta(seconds=2 * self.timeout_seconds + 60)
        with engine.begin() as conn:
            claimed = conn.execute(
                update(alerts)
                .where(alerts.c.id == row["id"], alerts.c.next_attempt_at == row["next_attempt_at"])
                .values(next_attempt_at=lease)
            ).rowcount
        if claimed != 1:
            return 0
        alert = Alert.from_payload(row["payload"])
        values: dict[str, Any] = {"next_attempt_at": now}
        failed: dict[str, str] = {}
        for channel in channels:
            if not (self.webhook_enabled if channel == "webhook" else self.email_enabled):
                values[f"{channel}_status"] = Status.OFF
                continue
            if channel in down:
                continue
            host = _host(self.webhook_url) if channel == "webhook" else _host(self.smtp_url)
            try:
                if channel == "webhook":
                    post_webhook(self.webhook_url or "", row["payload"], self.timeout_seconds)
                else:
                    message = email(alert, self.email_from, self.email_to or "")
                    send_email(self.smtp_url or "", message, self.timeout_seconds)
            except Exception as problem:
                failed[channel] = f"{channel} {host}: {describe(problem)}"
                down.add(channel)
                continue
            values[f"{channel}_status"] = Status.SENT
            values["sent_at"] = now
        if failed:
            attempts = row["attempts"] + 1
            error = _one_line("; ".join(failed.values()), 255)
            values.update(attempts=attempts, last_error=error, next_attempt_at=now + self.backoff(attempts))
            if attempts >= self.max_attempts:
                values.update({f"{c}_status": Status.FAILED for c in failed})
                log.error("alert %s: gave up after %d attempts: %s", alert.key, attempts, error)
            else:
                log.warning(
                    "alert %s: attempt %d/%d failed, retry at %s: %s",
                    alert.key,
                    attempts,
                    self.max_attempts,
                    values["next_attempt_at"].isoformat(timespec="seconds"),
                    error,
                )
        with engine.begin() as conn:
            conn.execute(update(alerts).where(alerts.c.id == row["id"]).values(**values))
        return sum(1 for c in channels if values.get(f"{c}_status") == Status.SENT)


def _utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive datetime is taken as UTC (SQLite hands them back naive)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
