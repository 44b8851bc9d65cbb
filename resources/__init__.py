"""Resources, built from the environment only (DESIGN §4); see the README for every variable.

Each resource is bound as a definition with an *empty* config schema whose function reads the
environment when a step needs it. Run config therefore cannot set or override a single field: a
``resources:`` section that names one (from the launchpad, ``--config-json`` or GraphQL) fails
validation ("unexpected config entry") before anything runs. Whoever launches a run chooses what
to migrate, never what runs or where the data goes. A variable that is missing fails only the steps
that need its resource, so each group of assets needs only its own variables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dagster import EnvVar, ResourceDefinition

from resources.databases import DatabaseResource
from resources.errors import Category, MigrationError
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


def worker_from_env() -> WorkerResource:
    """``WORKER_TRANSPORT=local`` (demo) needs no SSH settings; ``ssh`` (default) needs all of them."""
    transport = env("WORKER_TRANSPORT", "ssh")
    if transport not in ("ssh", "local"):
        raise MigrationError(Category.VALIDATION_ERROR, "WORKER_TRANSPORT must be ssh or local")
    ssh = None
    if transport == "ssh":
        needed = "needed when WORKER_TRANSPORT=ssh"
        ssh = SSHResource(
            host=env("SSH_HOST", needed_for=needed),
            port=_number("SSH_PORT", "22", int, 1, 65535),
            username=env("SSH_USER", needed_for=needed),
            key_file=env("SSH_KEY_FILE", needed_for=needed),
            known_hosts_file=env("SSH_KNOWN_HOSTS", needed_for=needed),
        )
    return WorkerResource(transport=transport, command=env("WORKER_COMMAND", "clinic-migrate"), ssh=ssh)


def database_from_env(name: str, fallback: str | None = None) -> DatabaseResource:
    """A database by its URL variable (``fallback``: the variable it defaults to)."""
    default = EnvVar(fallback).get_value() if fallback else None
    return DatabaseResource(url=env(name, default))


def policy_from_env() -> MigrationPolicy:
    return MigrationPolicy(
        max_delete_share=_number("MAX_DELETE_SHARE", "0.10", float, 0, 1),
        min_coverage=_number("MIN_COVERAGE", "0.95", float, 0, 1),
    )


def env_only(factory: Callable[[], Any], description: str) -> ResourceDefinition:
    """A resource made by ``factory`` from the environment, with nothing run config can set."""
    return ResourceDefinition(resource_fn=lambda _context: factory(), config_schema={}, description=description)


def clinical_resources() -> dict[str, ResourceDefinition]:
    """The clinical group's resources: the worker host and the three databases."""
    return {
        "worker": env_only(worker_from_env, "the migration worker: WORKER_TRANSPORT, WORKER_COMMAND, SSH_*"),
        "legacy_db": env_only(lambda: database_from_env("LEGACY_DB_URL"), "the legacy clinical DB: LEGACY_DB_URL"),
        "clinical_db": env_only(lambda: database_from_env("CLINICAL_DB_URL"), "the clinical target: CLINICAL_DB_URL"),
        "state_db": env_only(
            lambda: database_from_env("STATE_DB_URL", fallback="CLINICAL_DB_URL"),
            "the control DB (migration.*): STATE_DB_URL, else CLINICAL_DB_URL",
        ),
        "policy": env_only(policy_from_env, "limits of a run: MAX_DELETE_SHARE, MIN_COVERAGE"),
    }
