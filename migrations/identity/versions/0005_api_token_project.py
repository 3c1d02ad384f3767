"""identity: API tokens limited to one project

- api_tokens.project_id: the one project a token may act on (a CI deploy token), within its
  organization; it is then refused for anything that is not about a project.

Revision ID: identity_0005
Revises: identity_0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "identity_0005"
down_revision = "identity_0004"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE identity.api_tokens
        ADD COLUMN project_id text,
        ADD CONSTRAINT ck_api_tokens_project_in_organization
            CHECK (project_id IS NULL OR organization_id IS NOT NULL)""",
]

DOWNGRADE = ["ALTER TABLE identity.api_tokens DROP COLUMN project_id"]

upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
