"""What the platform allows a run to do, set by whoever operates it (environment), not by a launcher."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field


class MigrationPolicy(ConfigurableResource):
    """``MAX_DELETE_SHARE``, ``MIN_COVERAGE``, ``AUTO_ROLLBACK`` and ``RETENTION_DAYS`` (DESIGN §4, §7)."""

    max_delete_share: float = Field(
        default=0.10, ge=0, le=1, description="largest share of a partition a full run may delete"
    )
    min_coverage: float = Field(default=0.95, ge=0, le=1, description="lowest acceptable migrated/eligible ratio")
    auto_rollback: bool = Field(
        default=False, description="the failure sensors launch rollback_job runs themselves (AUTO_ROLLBACK)"
    )
    retention_days: int = Field(
        default=30, ge=1, le=3650, description="the retention clean-up keeps the ledger of runs finished since"
    )
