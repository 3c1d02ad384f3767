"""project: restart policy and liveness check

What the agent does when a project's app ends on its own after it was healthy
(restart_policy: on-failure, always or never), and the HTTP liveness check it runs on the
healthy app (liveness_check_path, empty = none; every liveness_period_seconds;
liveness_failure_threshold failures in a row restart it). Each new deployment copies them.

Revision ID: project_0003
Revises: project_0002
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "project_0003"
down_revision = "project_0002"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE project.projects
        ADD COLUMN restart_policy text NOT NULL DEFAULT 'on-failure',
        ADD COLUMN liveness_check_path text,
        ADD COLUMN liveness_period_seconds integer NOT NULL DEFAULT 10,
        ADD COLUMN liveness_failure_threshold integer NOT NULL DEFAULT 3,
        ADD CONSTRAINT ck_projects_restart_policy
            CHECK (restart_policy IN ('on-failure', 'always', 'never')),
        ADD CONSTRAINT ck_projects_liveness
            CHECK (liveness_period_seconds > 0 AND liveness_failure_threshold > 0)""",
]

DOWNGRADE = [
    """ALTER TABLE project.projects
        DROP CONSTRAINT ck_projects_liveness,
        DROP CONSTRAINT ck_projects_restart_policy,
        DROP COLUMN liveness_failure_threshold,
        DROP COLUMN liveness_period_seconds,
        DROP COLUMN liveness_check_path,
        DROP COLUMN restart_policy""",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
