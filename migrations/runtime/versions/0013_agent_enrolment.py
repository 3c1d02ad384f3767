"""runtime: agents enrolled with one-time join tokens, their certificates tracked per server

- agent_join_tokens: a token that enrols one server's agent (`hangar agent join`): only the
  public key of its secret is kept (public_key, Ed25519); used once (used_at), until
  expires_at.
- agent_certificates: per server, the serial of its agent's current certificate and of the
  one it renewed (still good until it expires, for connections made before the renewal);
  revoked_at once an admin revoked them (both serials cleared). A server with a row here
  is enrolled: only its own certificate may act as it.

Revision ID: runtime_0013
Revises: runtime_0012
Create Date: 2026-12-08
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "runtime_0013"
down_revision = "runtime_0012"
branch_labels = None
depends_on = None

UPGRADE = [
    """CREATE TABLE runtime.agent_join_tokens (
        id text PRIMARY KEY,
        server_id text NOT NULL REFERENCES runtime.servers (id) ON DELETE CASCADE,
        public_key bytea NOT NULL CHECK (length(public_key) = 32),
        created_by text NOT NULL DEFAULT '',
        created_at timestamptz NOT NULL DEFAULT now(),
        expires_at timestamptz NOT NULL,
        used_at timestamptz
    )""",
    "CREATE INDEX ix_agent_join_tokens_server_id ON runtime.agent_join_tokens (server_id)",
    """CREATE TABLE runtime.agent_certificates (
        server_id text PRIMARY KEY REFERENCES runtime.servers (id) ON DELETE CASCADE,
        serial text,
        previous_serial text,
        not_after timestamptz,
        revoked_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
]

DOWNGRADE = [
    "DROP TABLE runtime.agent_certificates",
    "DROP TABLE runtime.agent_join_tokens",
]

upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
