"""project: the outbox no longer notifies from the writer's transaction

PostgreSQL serialises the commits of every transaction that issued a NOTIFY on one
database-wide lock held across the commit's WAL flush, so the per-statement NOTIFY trigger
put every event-writing commit of the service in one line. The writing process now notifies
after its commit, coalesced (shared.outbox.OutboxFeed.poke); watchers still poll as well.

Revision ID: project_0002
Revises: project_0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from shared.migrate import execute_all, outbox_notify_ddl, outbox_notify_drop_ddl

revision = "project_0002"
down_revision = "project_0001"
branch_labels = None
depends_on = None


upgrade = execute_all(outbox_notify_drop_ddl("project"))
downgrade = execute_all(outbox_notify_ddl("project"))
