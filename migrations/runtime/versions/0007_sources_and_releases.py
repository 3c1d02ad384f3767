"""runtime: uploaded sources, builds, and releases

- sources: each upload of a project's source archive, by its sha256 (the bytes live in the
  artifact store); the same bytes uploaded again are one row.
- deployments: a deployment may run an uploaded source (source_sha256; built first, status
  'building') and records the slug its build produced (slug_sha256; a rollback or a config
  change reuses it), which Procfile process type it runs, why it exists (release_reason:
  deploy, rollback, config_change) and who created it.
- logs: a build's output is its own stream, 'build'.

Revision ID: runtime_0007
Revises: runtime_0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "runtime_0007"
down_revision = "runtime_0006"
branch_labels = None
depends_on = None

STATES = (
    "'queued', 'scheduling', 'starting', 'running', "
    "'superseded', 'failed', 'cancelled', 'rolled_back', 'crash_loop'"
)

UPGRADE = [
    """CREATE TABLE runtime.sources (
        project_id  text NOT NULL,
        sha256      text NOT NULL,
        size_bytes  bigint NOT NULL,
        created_by  text NOT NULL,
        created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (project_id, sha256),
        CONSTRAINT ck_sources_sha256 CHECK (sha256 ~ '^[0-9a-f]{64}$'),
        CONSTRAINT ck_sources_size CHECK (size_bytes >= 0)
    )""",
    "CREATE INDEX ix_sources_project_id_created_at ON runtime.sources (project_id, created_at)",
    "CREATE INDEX ix_sources_sha256 ON runtime.sources (sha256)",
    f"""ALTER TABLE runtime.deployments
        DROP CONSTRAINT ck_deployments_status,
        ADD CONSTRAINT ck_deployments_status CHECK (status IN ({STATES}, 'building')),
        ADD COLUMN source_sha256 text,
        ADD COLUMN slug_sha256 text,
        ADD COLUMN process_type text NOT NULL DEFAULT 'web',
        ADD COLUMN release_reason text NOT NULL DEFAULT 'deploy',
        ADD COLUMN created_by text NOT NULL DEFAULT '',
        DROP CONSTRAINT ck_deployments_image_or_command,
        ADD CONSTRAINT ck_deployments_what_runs
            CHECK (num_nonnulls(image, command, source_sha256) = 1),
        ADD CONSTRAINT ck_deployments_release_reason
            CHECK (release_reason IN ('deploy', 'rollback', 'config_change'))""",
    """CREATE INDEX ix_deployments_slug_sha256 ON runtime.deployments (slug_sha256)
        WHERE slug_sha256 IS NOT NULL""",
    """ALTER TABLE runtime.logs
        DROP CONSTRAINT ck_logs_stream,
        ADD CONSTRAINT ck_logs_stream CHECK (stream IN ('stdout', 'stderr', 'system', 'build'))""",
]

DOWNGRADE = [
    "DELETE FROM runtime.logs WHERE stream = 'build'",
    """ALTER TABLE runtime.logs
        DROP CONSTRAINT ck_logs_stream,
        ADD CONSTRAINT ck_logs_stream CHECK (stream IN ('stdout', 'stderr', 'system'))""",
    "DELETE FROM runtime.deployments WHERE source_sha256 IS NOT NULL",
    "DROP INDEX runtime.ix_deployments_slug_sha256",
    f"""ALTER TABLE runtime.deployments
        DROP CONSTRAINT ck_deployments_release_reason,
        DROP CONSTRAINT ck_deployments_what_runs,
        ADD CONSTRAINT ck_deployments_image_or_command CHECK (num_nonnulls(image, command) = 1),
        DROP COLUMN created_by,
        DROP COLUMN release_reason,
        DROP COLUMN process_type,
        DROP COLUMN slug_sha256,
        DROP COLUMN source_sha256,
        DROP CONSTRAINT ck_deployments_status,
        ADD CONSTRAINT ck_deployments_status CHECK (status IN ({STATES}))""",
    "DROP TABLE runtime.sources",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
