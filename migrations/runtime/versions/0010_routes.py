"""runtime: the edge's routes, failover releases

- project_routes: the hostnames the edge answers for each project (its generated one, from
  project's project.created / project.updated events, applied in the feed's order) and since
  when: should two projects ever claim one name, the earlier claim keeps it (ListRoutes).
- deployments.release_reason may be 'failover': a release started again on another server
  because its own stopped answering.

Revision ID: runtime_0010
Revises: runtime_0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "runtime_0010"
down_revision = "runtime_0009"
branch_labels = None
depends_on = None

UPGRADE = [
    """CREATE TABLE runtime.project_routes (
        project_id   text PRIMARY KEY,
        hostnames    text[] NOT NULL,
        claimed_at   timestamptz NOT NULL DEFAULT now()
    )""",
    """ALTER TABLE runtime.deployments
        DROP CONSTRAINT ck_deployments_release_reason,
        ADD CONSTRAINT ck_deployments_release_reason
            CHECK (release_reason IN ('deploy', 'rollback', 'config_change', 'failover'))""",
]

DOWNGRADE = [
    """ALTER TABLE runtime.deployments
        DROP CONSTRAINT ck_deployments_release_reason,
        ADD CONSTRAINT ck_deployments_release_reason
            CHECK (release_reason IN ('deploy', 'rollback', 'config_change'))""",
    "DROP TABLE runtime.project_routes",
]

upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
