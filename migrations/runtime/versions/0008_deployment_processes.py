"""runtime: deployments of several process types

- deployments.processes: the process types a deployment runs, each with its share of the
  deployment's RAM and CPU (JSON list of {"type", "ram_mb", "cpu_millis"}); empty: the one
  process_type, with all of it.
- containers.process_type: which of them a container runs.

Revision ID: runtime_0008
Revises: runtime_0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "runtime_0008"
down_revision = "runtime_0007"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE runtime.deployments
        ADD COLUMN processes jsonb NOT NULL DEFAULT '[]',
        ADD CONSTRAINT ck_deployments_processes CHECK (jsonb_typeof(processes) = 'array')""",
    "ALTER TABLE runtime.containers ADD COLUMN process_type text NOT NULL DEFAULT 'web'",
    """CREATE INDEX ix_containers_deployment_id_process_type_created_at
        ON runtime.containers (deployment_id, process_type, created_at)""",
]

DOWNGRADE = [
    "DROP INDEX runtime.ix_containers_deployment_id_process_type_created_at",
    "ALTER TABLE runtime.containers DROP COLUMN process_type",
    """ALTER TABLE runtime.deployments
        DROP CONSTRAINT ck_deployments_processes,
        DROP COLUMN processes""",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
