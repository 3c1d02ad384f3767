"""identity: idempotent sign-up (request id) and the revoked-session snapshot

- users.signup_request_id: the client-chosen id of the SignUp that created the account
  (AIP-155); a retry with the same id, email and password answers with that account.
- An index on refresh_tokens.revoked_at for the sessions signed out lately: every service's
  WatchAccess stream starts with them (their access tokens are refused until they expire).

Revision ID: identity_0003
Revises: identity_0002
Create Date: 2026-12-06
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "identity_0003"
down_revision = "identity_0002"
branch_labels = None
depends_on = None

UPGRADE = [
    "ALTER TABLE identity.users ADD COLUMN signup_request_id text",
    """ALTER TABLE identity.users ADD CONSTRAINT ck_users_signup_request_id
        CHECK (signup_request_id IS NULL OR length(signup_request_id) BETWEEN 1 AND 100)""",
    """CREATE UNIQUE INDEX uq_users_signup_request_id ON identity.users (signup_request_id)
        WHERE signup_request_id IS NOT NULL""",
    """CREATE INDEX ix_refresh_tokens_revoked_at ON identity.refresh_tokens (revoked_at)
        WHERE revoked_at IS NOT NULL""",
]

DOWNGRADE = [
    "DROP INDEX identity.ix_refresh_tokens_revoked_at",
    "DROP INDEX identity.uq_users_signup_request_id",
    "ALTER TABLE identity.users DROP CONSTRAINT ck_users_signup_request_id",
    "ALTER TABLE identity.users DROP COLUMN signup_request_id",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
