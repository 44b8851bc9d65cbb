"""Write a local DAGSTER_HOME: the project's dagster.yaml (run-queue limits and all) minus the
PostgreSQL storage, so the demo and the tests keep their runs in SQLite under that folder.

    python -m demo.instance .demo/dagster_home
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_local_instance(home: Path) -> Path:
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    config.pop("storage", None)
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


if __name__ == "__main__":
    write_local_instance(Path(sys.argv[1]).resolve())
