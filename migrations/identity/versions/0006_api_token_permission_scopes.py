"""identity: API token scopes naming permissions

- api_tokens.scope: besides read, deploy and admin, a comma-separated list of permissions
  (e.g. "deployments.create,logs.read"): the token is allowed those only (and only while its
  owner's role allows them).

Revision ID: identity_0006
Revises: identity_0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "identity_0006"
down_revision = "identity_0005"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE identity.api_tokens
        DROP CONSTRAINT ck_api_tokens_scope,
        ADD CONSTRAINT ck_api_tokens_scope
            CHECK (scope IN ('read', 'deploy', 'admin')
                   OR scope ~ '^[a-z_]+\\.[a-z_]+(,[a-z_]+\\.[a-z_]+)*$')""",
]

DOWNGRADE = [
    "DELETE FROM identity.api_tokens WHERE scope NOT IN ('read', 'deploy', 'admin')",
    """ALTER TABLE identity.api_tokens
        DROP CONSTRAINT ck_api_tokens_scope,
        ADD CONSTRAINT ck_api_tokens_scope CHECK (scope IN ('read', 'deploy', 'admin'))""",
]

upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
