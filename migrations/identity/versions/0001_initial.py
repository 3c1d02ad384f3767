"""identity: users, organizations, members, audit trail, refresh tokens, outbox

Revision ID: identity_0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from shared.migrate import execute_all, outbox_ddl, outbox_drop_ddl

revision = "identity_0001"
down_revision = None
branch_labels = None
depends_on = None

SLUG = r"slug ~ '^[a-z0-9]+(-[a-z0-9]+)*$' AND length(slug) <= 40"

UPGRADE = [
    """CREATE TABLE identity.users (
        id                text PRIMARY KEY,
        email             text NOT NULL,
        name              text NOT NULL DEFAULT '',
        password_hash     text,                       -- argon2id; NULL for OAuth-only accounts
        email_verified    boolean NOT NULL DEFAULT false,
        oauth_provider    text,
        oauth_subject     text,
        is_platform_admin boolean NOT NULL DEFAULT false,
        created_at        timestamptz NOT NULL DEFAULT now(),
        updated_at        timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_users_email_normalized
            CHECK (email = lower(btrim(email)) AND email <> ''),
        CONSTRAINT ck_users_oauth_pair
            CHECK ((oauth_provider IS NULL) = (oauth_subject IS NULL)),
        CONSTRAINT uq_users_email UNIQUE (email),
        -- NULLs are distinct: any number of accounts without an OAuth binding.
        CONSTRAINT uq_users_oauth_provider_oauth_subject UNIQUE (oauth_provider, oauth_subject)
    )""",
    f"""CREATE TABLE identity.organizations (
        id         text PRIMARY KEY,
        name       text NOT NULL,
        slug       text NOT NULL,
        owner_id   text NOT NULL REFERENCES identity.users (id),
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_organizations_slug CHECK ({SLUG}),
        CONSTRAINT uq_organizations_slug UNIQUE (slug)
    )""",
    "CREATE INDEX ix_organizations_owner_id ON identity.organizations (owner_id)",
    """CREATE TABLE identity.organization_members (
        organization_id text NOT NULL
            REFERENCES identity.organizations (id) ON DELETE CASCADE,
        user_id         text NOT NULL REFERENCES identity.users (id) ON DELETE CASCADE,
        role            text NOT NULL,
        created_at      timestamptz NOT NULL DEFAULT now(),
        updated_at      timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_organization_members_role
            CHECK (role IN ('owner', 'admin', 'developer', 'viewer')),
        CONSTRAINT uq_organization_members_organization_id_user_id
            UNIQUE (organization_id, user_id)
    )""",
    "CREATE INDEX ix_organization_members_user_id ON identity.organization_members (user_id)",
    # Append-only: the triggers below refuse UPDATE, DELETE and TRUNCATE, whoever asks.
    # organization_id is NULL for entries outside any organization (e.g. a failed sign-in);
    # those form one chain of their own, hence NULLS NOT DISTINCT on (organization_id, seq).
    """CREATE TABLE identity.audit_logs (
        id              text PRIMARY KEY,
        event_id        text NOT NULL,            -- the producer's id: appends are idempotent
        organization_id text,
        seq             bigint NOT NULL,          -- position in the organization's hash chain
        service         text NOT NULL,            -- which service emitted it
        actor_id        text,
        actor_type      text NOT NULL,            -- user | service | anonymous ...
        action          text NOT NULL,
        target_type     text,
        target_id       text,
        metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
        occurred_at     timestamptz NOT NULL,
        recorded_at     timestamptz NOT NULL DEFAULT now(),
        prev_hash       text,                     -- NULL for the first entry of a chain
        hash            text NOT NULL,
        CONSTRAINT ck_audit_logs_seq CHECK (seq >= 1),
        CONSTRAINT uq_audit_logs_event_id UNIQUE (event_id),
        CONSTRAINT uq_audit_logs_organization_id_seq
            UNIQUE NULLS NOT DISTINCT (organization_id, seq)
    )""",
    """CREATE INDEX ix_audit_logs_organization_id_occurred_at
        ON identity.audit_logs (organization_id, occurred_at)""",
    """CREATE FUNCTION identity.audit_logs_refuse_change() RETURNS trigger
        LANGUAGE plpgsql SET search_path = pg_catalog AS $$
    BEGIN
        RAISE EXCEPTION 'identity.audit_logs is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'audit entries are never updated, deleted or truncated';
    END $$""",
    """CREATE TRIGGER trg_audit_logs_refuse_update_delete
        BEFORE UPDATE OR DELETE ON identity.audit_logs
        FOR EACH ROW EXECUTE FUNCTION identity.audit_logs_refuse_change()""",
    """CREATE TRIGGER trg_audit_logs_refuse_truncate
        BEFORE TRUNCATE ON identity.audit_logs
        FOR EACH STATEMENT EXECUTE FUNCTION identity.audit_logs_refuse_change()""",
    # Default privileges granted full DML; the service may only read and append.
    "REVOKE UPDATE, DELETE, TRUNCATE ON identity.audit_logs FROM hangar_identity",
    """CREATE TABLE identity.refresh_tokens (
        id          text PRIMARY KEY,
        user_id     text NOT NULL REFERENCES identity.users (id) ON DELETE CASCADE,
        family_id   text NOT NULL,          -- one login; a replayed token revokes the family
        token_hash  bytea NOT NULL,         -- SHA-256 of the opaque token, never the token
        expires_at  timestamptz NOT NULL,
        used_at     timestamptz,            -- set when rotated
        revoked_at  timestamptz,
        created_at  timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_refresh_tokens_token_hash UNIQUE (token_hash)
    )""",
    "CREATE INDEX ix_refresh_tokens_family_id ON identity.refresh_tokens (family_id)",
    "CREATE INDEX ix_refresh_tokens_user_id ON identity.refresh_tokens (user_id)",
    # Failed logins per email (existing or not): backoff, then RESOURCE_EXHAUSTED.
    """CREATE TABLE identity.login_throttle (
        email           text PRIMARY KEY,
        failures        integer NOT NULL DEFAULT 0,
        last_failure_at timestamptz,
        blocked_until   timestamptz,
        CONSTRAINT ck_login_throttle_failures CHECK (failures >= 0)
    )""",
    *outbox_ddl("identity"),
]

DOWNGRADE = [
    *outbox_drop_ddl("identity"),
    "DROP TABLE identity.login_throttle",
    "DROP TABLE identity.refresh_tokens",
    "DROP TABLE identity.audit_logs",
    "DROP FUNCTION identity.audit_logs_refuse_change()",
    "DROP TABLE identity.organization_members",
    "DROP TABLE identity.organizations",
    "DROP TABLE identity.users",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
