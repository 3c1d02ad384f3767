"""runtime: crash-looping deployments, restart and liveness settings, container restarts

- deployments: status 'crash_loop' (it ran, then kept crashing soon after each restart; still
  placed, capacity held), which counts as the project's serving deployment with 'running'
  (at most one per project); the project's restart policy and liveness check, copied at
  creation and handed to the agent.
- containers: how often the agent restarted the app, whether it is crash-looping, and how
  its last run ended.

Revision ID: runtime_0006
Revises: runtime_0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "runtime_0006"
down_revision = "runtime_0005"
branch_labels = None
depends_on = None

STATES = (
    "'queued', 'scheduling', 'starting', 'running', "
    "'superseded', 'failed', 'cancelled', 'rolled_back'"
)

UPGRADE = [
    f"""ALTER TABLE runtime.deployments
        DROP CONSTRAINT ck_deployments_status,
        ADD CONSTRAINT ck_deployments_status CHECK (status IN ({STATES}, 'crash_loop')),
        ADD COLUMN restart_policy text NOT NULL DEFAULT 'on-failure',
        ADD COLUMN liveness_check_path text,
        ADD COLUMN liveness_period_seconds integer NOT NULL DEFAULT 10,
        ADD COLUMN liveness_failure_threshold integer NOT NULL DEFAULT 3,
        ADD CONSTRAINT ck_deployments_restart_policy
            CHECK (restart_policy IN ('on-failure', 'always', 'never')),
        ADD CONSTRAINT ck_deployments_liveness
            CHECK (liveness_period_seconds > 0 AND liveness_failure_threshold > 0)""",
    # At most one serving deployment per project: a crash-looping one still serves.
    "DROP INDEX runtime.uq_deployments_project_id_running",
    """CREATE UNIQUE INDEX uq_deployments_project_id_running
        ON runtime.deployments (project_id) WHERE status IN ('running', 'crash_loop')""",
    """ALTER TABLE runtime.containers
        ADD COLUMN restart_count integer NOT NULL DEFAULT 0,
        ADD COLUMN crash_loop boolean NOT NULL DEFAULT false,
        ADD COLUMN last_exit_reason text""",
]

DOWNGRADE = [
    """ALTER TABLE runtime.containers
        DROP COLUMN last_exit_reason,
        DROP COLUMN crash_loop,
        DROP COLUMN restart_count""",
    "DROP INDEX runtime.uq_deployments_project_id_running",
    "UPDATE runtime.deployments SET status = 'running' WHERE status = 'crash_loop'",
    """CREATE UNIQUE INDEX uq_deployments_project_id_running
        ON runtime.deployments (project_id) WHERE status = 'running'""",
    f"""ALTER TABLE runtime.deployments
        DROP CONSTRAINT ck_deployments_liveness,
        DROP CONSTRAINT ck_deployments_restart_policy,
        DROP COLUMN liveness_failure_threshold,
        DROP COLUMN liveness_period_seconds,
        DROP COLUMN liveness_check_path,
        DROP COLUMN restart_policy,
        DROP CONSTRAINT ck_deployments_status,
        ADD CONSTRAINT ck_deployments_status CHECK (status IN ({STATES}))""",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
