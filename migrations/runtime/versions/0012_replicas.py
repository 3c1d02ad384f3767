"""runtime: a release runs as several replicas, each its own deployment row

- deployments.replica_set_id: the replica set the row belongs to, the id of the deployment
  that created it (its own id for a release of one). Every replica of a set runs the same
  release; failover replaces one replica within its set.
- deployments.replica_index / replicas: which of how many (0 <= index < replicas).
- The project's serving release was one row (uq_deployments_project_id_running); it is now
  one row per replica index, so a set of N serves N rows and a newer set supersedes them all
  at once.

Revision ID: runtime_0012
Revises: runtime_0011
Create Date: 2026-12-08
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "runtime_0012"
down_revision = "runtime_0011"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE runtime.deployments
        ADD COLUMN replica_set_id text,
        ADD COLUMN replica_index integer NOT NULL DEFAULT 0,
        ADD COLUMN replicas integer NOT NULL DEFAULT 1""",
    "UPDATE runtime.deployments SET replica_set_id = id",
    """ALTER TABLE runtime.deployments
        ALTER COLUMN replica_set_id SET NOT NULL,
        ADD CONSTRAINT ck_deployments_replicas
            CHECK (replicas BETWEEN 1 AND 100 AND replica_index >= 0
                   AND replica_index < replicas)""",
    """CREATE INDEX ix_deployments_replica_set_id_replica_index
        ON runtime.deployments (replica_set_id, replica_index)""",
    "DROP INDEX runtime.uq_deployments_project_id_running",
    """CREATE UNIQUE INDEX uq_deployments_project_id_running
        ON runtime.deployments (project_id, replica_index)
        WHERE status IN ('running', 'crash_loop')""",
]

DOWNGRADE = [
    "DROP INDEX runtime.uq_deployments_project_id_running",
    """UPDATE runtime.deployments SET status = 'superseded'
        WHERE replica_index > 0 AND status IN ('running', 'crash_loop')""",
    """CREATE UNIQUE INDEX uq_deployments_project_id_running
        ON runtime.deployments (project_id) WHERE status IN ('running', 'crash_loop')""",
    "DROP INDEX runtime.ix_deployments_replica_set_id_replica_index",
    """ALTER TABLE runtime.deployments
        DROP CONSTRAINT ck_deployments_replicas,
        DROP COLUMN replicas,
        DROP COLUMN replica_index,
        DROP COLUMN replica_set_id""",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
