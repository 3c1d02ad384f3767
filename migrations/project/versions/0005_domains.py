"""project: custom domains

- domains: a project's custom domains; a name belongs to one project at most (the primary
  key), pending until its check passed (verified_at), then routed by the edge. token is what
  http://<hostname>/.well-known/hangar-domain/<token> must answer. Gone with the project.

Revision ID: project_0005
Revises: project_0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "project_0005"
down_revision = "project_0004"
branch_labels = None
depends_on = None

UPGRADE = [
    r"""CREATE TABLE project.domains (
        hostname     text PRIMARY KEY,
        project_id   text NOT NULL REFERENCES project.projects (id) ON DELETE CASCADE,
        token        text NOT NULL,
        verified_at  timestamptz,
        created_at   timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_domains_hostname
            CHECK (hostname ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$'
                   AND length(hostname) <= 253)
    )""",
    "CREATE INDEX ix_domains_project_id ON project.domains (project_id)",
]

DOWNGRADE = ["DROP TABLE project.domains"]

upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
