"""runtime: server isolation and the organization a server without it runs

A server says whether its apps are isolated from each other ('container': the agent's runc
driver) or not ('none': plain processes). tenant_organization_id is the organization whose
deployments hold capacity on the server: NULL when none do, '*' when several organizations'
do. The placement that reserves capacity sets it in the same conditional UPDATE, and the
release that frees the last capacity clears it, so a server without isolation takes a second
organization's app only once the first one's are gone, whatever the concurrency.

Revision ID: runtime_0005
Revises: runtime_0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "runtime_0005"
down_revision = "runtime_0004"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE runtime.servers
        ADD COLUMN isolation text NOT NULL DEFAULT 'none',
        ADD COLUMN tenant_organization_id text,
        ADD CONSTRAINT ck_servers_isolation CHECK (isolation IN ('none', 'container'))""",
    # Servers that already hold deployments: their organization, or '*' for several.
    """UPDATE runtime.servers s
          SET tenant_organization_id = t.tenant
         FROM (SELECT server_id,
                      CASE WHEN count(DISTINCT organization_id) = 1
                           THEN min(organization_id) ELSE '*' END AS tenant
                 FROM runtime.deployments WHERE capacity_reserved
                GROUP BY server_id) t
        WHERE s.id = t.server_id""",
]

DOWNGRADE = [
    """ALTER TABLE runtime.servers
        DROP CONSTRAINT ck_servers_isolation,
        DROP COLUMN tenant_organization_id,
        DROP COLUMN isolation""",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
