"""The tests' name for :mod:`prefect_eggapi.testing.postgres` (a throwaway PostgreSQL cluster)."""

from prefect_eggapi.testing.postgres import PgCluster, find_bindir, missing_reason, pg_cluster

__all__ = ["PgCluster", "find_bindir", "missing_reason", "pg_cluster"]
