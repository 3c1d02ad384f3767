"""project: organization slugs, for projects' public hostnames

A project's hostname is `<project slug>-<organization slug>.<apps domain>`. The organization's
slug is identity's: this table keeps a copy, from identity's organization.created and
organization.updated events (event_txid/event_position: the cursor of the event that set it)
or, when a project is created before the event arrived, from identity's GetOrganization
(cursor NULL; as_of: the time just before the lookup). organization.deleted removes the row.

Revision ID: project_0004
Revises: project_0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "project_0004"
down_revision = "project_0003"
branch_labels = None
depends_on = None

UPGRADE = [
    r"""CREATE TABLE project.organization_slugs (
        organization_id text PRIMARY KEY,
        slug            text NOT NULL,
        event_txid      bigint,
        event_position  bigint,
        as_of           timestamptz NOT NULL,
        updated_at      timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_organization_slugs_slug
            CHECK (slug ~ '^[a-z0-9]+(-[a-z0-9]+)*$' AND length(slug) <= 63),
        CONSTRAINT ck_organization_slugs_cursor
            CHECK ((event_txid IS NULL) = (event_position IS NULL))
    )""",
]

DOWNGRADE = [
    "DROP TABLE project.organization_slugs",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
