"""Local Dagster instances for the demo: the project's dagster.yaml (run queue, limits and all) minus
the PostgreSQL storage, so the demo and `make dev` keep their runs in SQLite under one folder.

    python -m demo.instance .demo/dagster_home

:func:`driver_instance` opens the same storage without the run queue, for ``make demo``'s driver:
it runs one migration at a time in its own process, where the queue's limits hold by construction,
and without a daemon there would be nothing to dequeue its runs. Everything launched from the UI
on that home (``make dev``) goes through the queue.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from dagster import DagsterInstance

ROOT = Path(__file__).resolve().parents[1]


def write_local_instance(home: Path) -> Path:
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    config.pop("storage", None)
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def driver_instance(home: Path) -> DagsterInstance:
    """The instance at ``home`` (its runs and events), with runs executed in-process."""
    home = home.resolve()
    driver = home.parent / f"{home.name}_driver"
    driver.mkdir(parents=True, exist_ok=True)
    config = {
        "storage": {"sqlite": {"base_dir": str(home)}},
        "telemetry": {"enabled": False},
    }
    (driver / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return DagsterInstance.from_config(str(driver))


if __name__ == "__main__":
    write_local_instance(Path(sys.argv[1]).resolve())
