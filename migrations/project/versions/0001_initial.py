"""project: projects and their encrypted secrets, outbox

Revision ID: project_0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from shared.migrate import execute_all, outbox_ddl, outbox_drop_ddl

revision = "project_0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = [
    # organization_id refers to identity's organizations: a plain id, cleaned up by the
    # organization.deleted event. The resources are this project's allocation from the
    # organization's pool (billing.allocations holds the same numbers).
    r"""CREATE TABLE project.projects (
        id                  text PRIMARY KEY,
        organization_id     text NOT NULL,
        name                text NOT NULL,
        slug                text NOT NULL,
        ram_mb              integer NOT NULL,
        cpu_millis          integer NOT NULL,
        bandwidth_gb        integer NOT NULL,
        region              text NOT NULL,
        sleep_enabled       boolean NOT NULL DEFAULT false,
        sleep_after_seconds integer NOT NULL DEFAULT 900,
        description         text NOT NULL DEFAULT '',
        repository_url      text,
        default_command     text,
        default_image       text,
        health_check_path   text,
        -- The project's AES-256 data key, wrapped (AES-GCM: nonce || ciphertext || tag) by
        -- the master key named data_key_id; re-wrapped when the master key rotates.
        data_key_wrapped    bytea,
        data_key_id         text,
        created_at          timestamptz NOT NULL DEFAULT now(),
        updated_at          timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_projects_slug
            CHECK (slug ~ '^[a-z0-9]+(-[a-z0-9]+)*$' AND length(slug) <= 40),
        CONSTRAINT ck_projects_resources
            CHECK (ram_mb > 0 AND cpu_millis > 0 AND bandwidth_gb >= 0),
        CONSTRAINT ck_projects_sleep_after_seconds CHECK (sleep_after_seconds > 0),
        CONSTRAINT ck_projects_data_key
            CHECK ((data_key_wrapped IS NULL) = (data_key_id IS NULL)),
        CONSTRAINT uq_projects_organization_id_slug UNIQUE (organization_id, slug)
    )""",
    """CREATE INDEX ix_projects_organization_id_created_at
        ON project.projects (organization_id, created_at)""",
    """CREATE INDEX ix_projects_organization_id_sleep_enabled
        ON project.projects (organization_id, sleep_enabled)""",
    # AES-256-GCM under the project's data key; AAD = project id + name + key_version.
    # version counts overwrites (listings show it); key_version is the data key's version.
    """CREATE TABLE project.project_secrets (
        id          text PRIMARY KEY,
        project_id  text NOT NULL REFERENCES project.projects (id) ON DELETE CASCADE,
        name        text NOT NULL,
        ciphertext  bytea NOT NULL,               -- ciphertext || 16-byte GCM tag
        nonce       bytea NOT NULL,               -- 96 bits, fresh for every write
        key_version integer NOT NULL,
        version     integer NOT NULL DEFAULT 1,
        created_at  timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_project_secrets_name
            CHECK (name ~ '^[A-Z_][A-Z0-9_]*$' AND length(name) <= 128),
        CONSTRAINT ck_project_secrets_nonce CHECK (octet_length(nonce) = 12),
        CONSTRAINT ck_project_secrets_ciphertext CHECK (octet_length(ciphertext) >= 16),
        CONSTRAINT ck_project_secrets_versions CHECK (key_version >= 0 AND version >= 1),
        CONSTRAINT uq_project_secrets_project_id_name UNIQUE (project_id, name)
    )""",
    *outbox_ddl("project"),
]

DOWNGRADE = [
    *outbox_drop_ddl("project"),
    "DROP TABLE project.project_secrets",
    "DROP TABLE project.projects",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
