"""identity: personal API tokens

- api_tokens: a user's tokens for scripts and CI: a name, a scope (read, deploy, admin), an
  optional organization it is limited to and expiry; the secret's SHA-256 (the secret is 256
  random bits: a fast hash is enough), never the secret; when it was last used and revoked.
  An access token exchanged for one carries the session id "tok_<id>": revoking the token
  ends them on every service, as a logout ends a session's.

Revision ID: identity_0004
Revises: identity_0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "identity_0004"
down_revision = "identity_0003"
branch_labels = None
depends_on = None

UPGRADE = [
    """CREATE TABLE identity.api_tokens (
        id              text PRIMARY KEY,
        user_id         text NOT NULL REFERENCES identity.users (id) ON DELETE CASCADE,
        name            text NOT NULL,
        scope           text NOT NULL,
        organization_id text REFERENCES identity.organizations (id) ON DELETE CASCADE,
        prefix          text NOT NULL,
        secret_hash     bytea NOT NULL,
        expires_at      timestamptz,
        last_used_at    timestamptz,
        revoked_at      timestamptz,
        created_at      timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_api_tokens_secret_hash UNIQUE (secret_hash),
        CONSTRAINT ck_api_tokens_scope CHECK (scope IN ('read', 'deploy', 'admin')),
        CONSTRAINT ck_api_tokens_name CHECK (length(name) BETWEEN 1 AND 100)
    )""",
    "CREATE INDEX ix_api_tokens_user_id ON identity.api_tokens (user_id)",
    "CREATE INDEX ix_api_tokens_revoked_at ON identity.api_tokens (revoked_at)",
]

DOWNGRADE = ["DROP TABLE identity.api_tokens"]

upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
