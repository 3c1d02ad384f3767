"""runtime: the outbox no longer notifies from the writer's transaction

PostgreSQL serialises the commits of every transaction that issued a NOTIFY on one
database-wide lock held across the commit's WAL flush, so the per-statement NOTIFY trigger
put every event-writing commit of the service in one line. The writing process now notifies
after its commit, coalesced (shared.outbox.OutboxFeed.poke); watchers still poll as well.

Revision ID: runtime_0003
Revises: runtime_0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from shared.migrate import execute_all, outbox_notify_ddl, outbox_notify_drop_ddl

revision = "runtime_0003"
down_revision = "runtime_0002"
branch_labels = None
depends_on = None


upgrade = execute_all(outbox_notify_drop_ddl("runtime"))
downgrade = execute_all(outbox_notify_ddl("runtime"))
