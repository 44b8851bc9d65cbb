"""SQLAlchemy databases as thin resources: the URL, an engine that never logs bound values."""

from __future__ import annotations

from dagster import ConfigurableResource
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from worker.schema import make_engine


class DatabaseResource(ConfigurableResource):
    """One database by SQLAlchemy URL (``LEGACY_DB_URL``, ``CLINICAL_DB_URL``, ``STATE_DB_URL``)."""

    url: str

    def engine(self) -> Engine:
        return make_engine(self.url)

    @property
    def safe_url(self) -> str:
        """The URL with the password masked, for logs and metadata."""
        return make_url(self.url).render_as_string(hide_password=True)
