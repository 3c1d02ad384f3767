"""runtime: sleep settings on deployments

A deployment carries its project's sleep setting (seconds idle before its container is put
to sleep; NULL: never), copied at creation and kept in step by project.updated, so the sleep
controller finds idle containers with one indexed query and no call to project.

Revision ID: runtime_0004
Revises: runtime_0003
Create Date: 2026-11-26
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "runtime_0004"
down_revision = "runtime_0003"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE runtime.deployments
        ADD COLUMN sleep_after_seconds integer,
        ADD CONSTRAINT ck_deployments_sleep_after_seconds
            CHECK (sleep_after_seconds IS NULL OR sleep_after_seconds > 0)""",
]

DOWNGRADE = [
    """ALTER TABLE runtime.deployments
        DROP CONSTRAINT ck_deployments_sleep_after_seconds,
        DROP COLUMN sleep_after_seconds""",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
