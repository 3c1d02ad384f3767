"""runtime: projects' custom domains on their routes

- project_routes.domains: the project's verified custom domains (the edge routes them with
  its generated hostname); challenges: its pending ones, [{"hostname", "token"}], whose
  checks the edge answers. Both from project's project.domains_changed, whole each time.

Revision ID: runtime_0011
Revises: runtime_0010
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "runtime_0011"
down_revision = "runtime_0010"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE runtime.project_routes
        ADD COLUMN domains text[] NOT NULL DEFAULT '{}',
        ADD COLUMN challenges jsonb NOT NULL DEFAULT '[]'""",
]

DOWNGRADE = [
    "ALTER TABLE runtime.project_routes DROP COLUMN challenges, DROP COLUMN domains",
]

upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
