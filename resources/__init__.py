"""Resources, built from the environment only (DESIGN §4); see the README for every variable.

Each resource is bound as a definition with an *empty* config schema whose function reads the
environment when a step needs it. Run config therefore cannot set or override a single field: a
``resources:`` section that names one (from the launchpad, ``--config-json`` or GraphQL) fails
validation ("unexpected config entry") before anything runs. Whoever launches a run chooses what
to migrate, never what runs or where the data goes. A variable that is missing fails only the steps
that need its resource, so each group of assets needs only its own variables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from dagster import EnvVar, ResourceDefinition

from resources.alerts import AlertResource
from resources.blobstore import BlobStore
from resources.databases import DatabaseResource
from resources.errors import Category, MigrationError
from resources.firestore import FirestoreResource
from resources.media import LocalMediaSource, MediaSource, SFTPMediaSource
from resources.policy import MigrationPolicy
from resources.ssh import SSHResource
from resources.worker import WorkerResource


def env(name: str, default: str | None = None, *, needed_for: str = "") -> str:
    """The variable's value; a missing one is a short VALIDATION_ERROR that names it."""
    value = EnvVar(name).get_value(default)
    if value is None or value == "":
        why = f" ({needed_for})" if needed_for else ""
        raise MigrationError(Category.VALIDATION_ERROR, f"{name} is not set{why}")
    return value


def _number(name: str, default: str, kind: Callable[[str], Any], lo: float, hi: float) -> Any:
    text = env(name, default)
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise MigrationError(Category.VALIDATION_ERROR, f"{name} must be a number from {lo:g} to {hi:g}") from None
    return value


def _flag(name: str) -> bool:
    """A true/false variable (unset: false)."""
    text = env(name, "false").strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise MigrationError(Category.VALIDATION_ERROR, f"{name} must be true or false")
    return text in ("true", "1", "yes")


def _transport(name: str) -> str:
    transport = env(name, "ssh" if name == "WORKER_TRANSPORT" else "sftp")
    allowed = ("ssh", "local") if name == "WORKER_TRANSPORT" else ("sftp", "local")
    if transport not in allowed:
        raise MigrationError(Category.VALIDATION_ERROR, f"{name} must be {' or '.join(allowed)}")
    return transport


def ssh_from_env(needed: str) -> SSHResource:
    """The legacy/media host from ``SSH_*`` (``needed``: why, for the message naming a missing one)."""
    return SSHResource(
        host=env("SSH_HOST", needed_for=needed),
        port=_number("SSH_PORT", "22", int, 1, 65535),
        username=env("SSH_USER", needed_for=needed),
        key_file=env("SSH_KEY_FILE", needed_for=needed),
        known_hosts_file=env("SSH_KNOWN_HOSTS", needed_for=needed),
    )


def worker_from_env() -> WorkerResource:
    """``WORKER_TRANSPORT=local`` (demo) needs no SSH settings; ``ssh`` (default) needs all of them."""
    transport = _transport("WORKER_TRANSPORT")
    ssh = ssh_from_env("needed when WORKER_TRANSPORT=ssh") if transport == "ssh" else None
    return WorkerResource(
        transport=transport,
        command=env("WORKER_COMMAND", "clinic-migrate"),
        ssh=ssh,
        resident_seconds=_number("WORKER_RESIDENT_SECONDS", "0", int, 0, 7 * 24 * 3600),
    )


def firestore_from_env() -> FirestoreResource:
    """``FIRESTORE_PROJECT``; ``FIRESTORE_EMULATOR_HOST`` when the target is Google's emulator."""
    return FirestoreResource(
        project=env("FIRESTORE_PROJECT", needed_for="the app group's target"),
        emulator_host=EnvVar("FIRESTORE_EMULATOR_HOST").get_value() or None,
    )


def media_from_env() -> Iterator[MediaSource]:
    """``MEDIA_ROOT`` over SFTP through the SSH settings (``MEDIA_TRANSPORT=sftp``, the default) or a
    local folder (``local``); closed when the step ends."""
    root = env("MEDIA_ROOT", needed_for="the files' contents")
    if _transport("MEDIA_TRANSPORT") == "local":
        source: MediaSource = LocalMediaSource(root)
    else:
        source = SFTPMediaSource(ssh_from_env("needed when MEDIA_TRANSPORT=sftp"), root)
    try:
        yield source
    finally:
        source.close()


def _media_for_a_step(_context: Any) -> Iterator[MediaSource]:
    yield from media_from_env()  # a generator function: Dagster closes the source when the step ends


def blob_store_from_env() -> BlobStore:
    """``BLOB_STORE_URL``: a local folder, or an fsspec URL (``s3://``, ``gs://`` with their extras)."""
    return BlobStore(env("BLOB_STORE_URL", needed_for="the files' contents"))


def database_from_env(name: str, fallback: str | None = None) -> DatabaseResource:
    """A database by its URL variable (``fallback``: the variable it defaults to)."""
    default = EnvVar(fallback).get_value() if fallback else None
    return DatabaseResource(url=env(name, default))


def alerts_from_env() -> AlertResource:
    """Where alerts go: ``ALERT_WEBHOOK_URL``, ``ALERT_SMTP_URL`` + ``ALERT_EMAIL_TO`` (each optional: an
    unset channel is off); their outbox is in the control DB (``STATE_DB_URL``, else ``CLINICAL_DB_URL``)."""
    return AlertResource(
        webhook_url=EnvVar("ALERT_WEBHOOK_URL").get_value() or None,
        smtp_url=EnvVar("ALERT_SMTP_URL").get_value() or None,
        email_to=EnvVar("ALERT_EMAIL_TO").get_value() or None,
        state_db_url=database_from_env("STATE_DB_URL", fallback="CLINICAL_DB_URL").url,
    )


def policy_from_env() -> MigrationPolicy:
    return MigrationPolicy(
        max_delete_share=_number("MAX_DELETE_SHARE", "0.10", float, 0, 1),
        min_coverage=_number("MIN_COVERAGE", "0.95", float, 0, 1),
        retention_days=_number("RETENTION_DAYS", "30", int, 1, 3650),
        auto_rollback=_flag("AUTO_ROLLBACK"),
    )


def env_only(factory: Callable[[], Any], description: str) -> ResourceDefinition:
    """A resource made by ``factory`` from the environment, with nothing run config can set."""
    return ResourceDefinition(resource_fn=lambda _context: factory(), config_schema={}, description=description)


# One definition per resource, shared by the domains: Definitions.merge wants the very same
# definition under one key.
STATE_DB = env_only(
    lambda: database_from_env("STATE_DB_URL", fallback="CLINICAL_DB_URL"),
    "the control DB (migration.*): STATE_DB_URL, else CLINICAL_DB_URL",
)
ALERTS = env_only(alerts_from_env, "alerts: ALERT_WEBHOOK_URL, ALERT_SMTP_URL, ALERT_EMAIL_TO; outbox in STATE_DB_URL")
POLICY = env_only(policy_from_env, "limits: MAX_DELETE_SHARE, MIN_COVERAGE, AUTO_ROLLBACK, RETENTION_DAYS")


WORKER = env_only(worker_from_env, "the migration worker: WORKER_TRANSPORT, WORKER_COMMAND, SSH_*")
LEGACY_DB = env_only(lambda: database_from_env("LEGACY_DB_URL"), "the legacy clinical DB: LEGACY_DB_URL")
CLINICAL_DB = env_only(lambda: database_from_env("CLINICAL_DB_URL"), "the clinical target: CLINICAL_DB_URL")
DJANGO_DB = env_only(lambda: database_from_env("DJANGO_DB_URL"), "the List Cutter DB: DJANGO_DB_URL")
FIRESTORE = env_only(firestore_from_env, "the target: FIRESTORE_PROJECT, FIRESTORE_EMULATOR_HOST")
MEDIA = ResourceDefinition(
    resource_fn=_media_for_a_step,
    config_schema={},
    description="the uploaded files: MEDIA_ROOT, MEDIA_TRANSPORT (sftp through SSH_*, or local)",
)
BLOB_STORE = env_only(blob_store_from_env, "where file contents go: BLOB_STORE_URL")


def app_resources() -> dict[str, ResourceDefinition]:
    """The app group's resources: the Django DB, Firestore, the media host, the blob store. A step
    needs only those of its own asset (users and filters never touch MEDIA_* or BLOB_STORE_URL)."""
    return {
        "django_db": DJANGO_DB,
        "firestore": FIRESTORE,
        "media": MEDIA,
        "blob_store": BLOB_STORE,
        "state_db": STATE_DB,
        "policy": POLICY,
    }


def clinical_resources() -> dict[str, ResourceDefinition]:
    """The clinical group's resources: the worker host and the three databases."""
    return {
        "worker": WORKER,
        "legacy_db": LEGACY_DB,
        "clinical_db": CLINICAL_DB,
        "state_db": STATE_DB,
        "policy": POLICY,
    }
