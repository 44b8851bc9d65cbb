"""The Dagster code location (definitions.py merges the domains' definitions)."""

import checks  # noqa: F401  first: gRPC's fork() handlers off before anything imports gRPC (checks/__init__.py)
