"""runtime: container images

- deployments.image_command: with an image, what replaces its Cmd.
- deployments.image_digest: the manifest digest the image's tag resolved to when it was
  first pulled; a rollback or a config change runs that digest, never the tag again.

Revision ID: runtime_0009
Revises: runtime_0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "runtime_0009"
down_revision = "runtime_0008"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE runtime.deployments
        ADD COLUMN image_command text,
        ADD COLUMN image_digest text,
        ADD CONSTRAINT ck_deployments_image_digest
            CHECK (image_digest IS NULL OR image_digest ~ '^sha256:[0-9a-f]{64}$')""",
]

DOWNGRADE = [
    """ALTER TABLE runtime.deployments
        DROP CONSTRAINT ck_deployments_image_digest,
        DROP COLUMN image_digest,
        DROP COLUMN image_command""",
]

upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
