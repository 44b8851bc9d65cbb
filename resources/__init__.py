"""Resources read from the environment (DESIGN §4); see the README for every variable."""

from __future__ import annotations

import os
from typing import Any

from dagster import EnvVar

from resources.databases import DatabaseResource
from resources.ssh import SSHResource
from resources.worker import WorkerResource


def worker_from_env() -> WorkerResource:
    """``WORKER_TRANSPORT=local`` (demo) needs no SSH settings; ``ssh`` (default) needs all five."""
    transport = os.getenv("WORKER_TRANSPORT", "ssh")
    ssh = None
    if transport == "ssh":
        ssh = SSHResource(
            host=EnvVar("SSH_HOST"),
            port=EnvVar.int("SSH_PORT") if os.getenv("SSH_PORT") else 22,
            username=EnvVar("SSH_USER"),
            key_file=EnvVar("SSH_KEY_FILE"),
            known_hosts_file=EnvVar("SSH_KNOWN_HOSTS"),
        )
    return WorkerResource(
        transport=transport,  # type: ignore[arg-type]
        command=os.getenv("WORKER_COMMAND", "clinic-migrate"),
        ssh=ssh,
    )


def resources_from_env() -> dict[str, Any]:
    return {
        "worker": worker_from_env(),
        "legacy_db": DatabaseResource(url=EnvVar("LEGACY_DB_URL")),
        "clinical_db": DatabaseResource(url=EnvVar("CLINICAL_DB_URL")),
        "state_db": DatabaseResource(url=EnvVar("STATE_DB_URL" if os.getenv("STATE_DB_URL") else "CLINICAL_DB_URL")),
    }
