"""identity: the listeners of access changes, one row per identity replica's LISTEN connection

- access_listeners: an identity replica's LISTEN connection (an `incarnation`, on backend
  `pid`) hears every access change announced while its row is live; `lease_until` bounds how
  long the replica may grant its watchers leases (of `watcher_lease_seconds`) if it stops
  hearing changes; `revoked` is set by an announcer it did not acknowledge
  (services/identity/access_relay.py).

Revision ID: identity_0007
Revises: identity_0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "identity_0007"
down_revision = "identity_0006"
branch_labels = None
depends_on = None

UPGRADE = [
    """CREATE TABLE identity.access_listeners (
        incarnation text PRIMARY KEY,
        replica     text NOT NULL,
        pid         integer NOT NULL,
        lease_until timestamptz NOT NULL,
        revoked     boolean NOT NULL DEFAULT false,
        watcher_lease_seconds float8 NOT NULL
    )""",
    "CREATE INDEX ix_access_listeners_lease_until ON identity.access_listeners (lease_until)",
]

DOWNGRADE = ["DROP TABLE identity.access_listeners"]

upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
