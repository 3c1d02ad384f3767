"""runtime: rolling rollouts of replica sets (max surge, max unavailable)

- deployments.max_surge / max_unavailable: how a replica set replaces the one serving, as
  Kubernetes' rolling update says it: at most replicas + max_surge replicas of both placed,
  at least replicas - max_unavailable serving. max_surge >= replicas with max_unavailable 0
  (the default) starts every replica, then switches the whole set at once.
- deployments.held: a replica of a rolling set waiting for the rollout's room; the queue
  pass leaves it alone until the rollout places it.

Revision ID: runtime_0014
Revises: runtime_0013
Create Date: 2026-12-08
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "runtime_0014"
down_revision = "runtime_0013"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE runtime.deployments
        ADD COLUMN max_surge integer NOT NULL DEFAULT 1,
        ADD COLUMN max_unavailable integer NOT NULL DEFAULT 0,
        ADD COLUMN held boolean NOT NULL DEFAULT false""",
    "UPDATE runtime.deployments SET max_surge = replicas",
    """ALTER TABLE runtime.deployments
        ADD CONSTRAINT ck_deployments_rollout
            CHECK (max_surge BETWEEN 0 AND replicas AND max_unavailable BETWEEN 0 AND replicas
                   AND max_surge + max_unavailable > 0),
        ADD CONSTRAINT ck_deployments_held CHECK (NOT held OR status IN ('queued', 'cancelled',
                                                                        'failed'))""",
]

DOWNGRADE = [
    """ALTER TABLE runtime.deployments
        DROP CONSTRAINT ck_deployments_held,
        DROP CONSTRAINT ck_deployments_rollout,
        DROP COLUMN held,
        DROP COLUMN max_unavailable,
        DROP COLUMN max_surge""",
]

upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
