"""billing: plans (seeded), subscriptions and pools, allocations, usage, invoices, webhooks

Also the outbox.

Revision ID: billing_0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from shared.migrate import execute_all, outbox_ddl, outbox_drop_ddl

revision = "billing_0001"
down_revision = None
branch_labels = None
depends_on = None

METRICS = "'ram_mb_seconds', 'cpu_millis_seconds', 'bandwidth_bytes'"
# Stripe's subscription states; 'canceled' and 'incomplete_expired' are the dead ones.
SUBSCRIPTION_STATES = (
    "'incomplete', 'incomplete_expired', 'trialing', 'active', "
    "'past_due', 'canceled', 'unpaid', 'paused'"
)

UPGRADE = [
    # The catalog. A period is a month; the included amounts are per period. Overage is
    # max(0, usage - included) x unit price, in cents per unit: numeric, exact (prices per
    # byte or per MB-second are tiny fractions of a cent), rounded once per invoice line.
    # pool_*: the resources an organization on this plan may allocate to its projects.
    """CREATE TABLE billing.plans (
        id                                  text PRIMARY KEY,     -- 'hobby', 'pro', ...
        name                                text NOT NULL,
        price_cents                         bigint NOT NULL,      -- per period
        currency                            text NOT NULL DEFAULT 'usd',
        pool_ram_mb                         integer NOT NULL,
        pool_cpu_millis                     integer NOT NULL,
        pool_bandwidth_gb                   integer NOT NULL,
        included_ram_mb_seconds             bigint NOT NULL,
        included_cpu_millis_seconds         bigint NOT NULL,
        included_bandwidth_bytes            bigint NOT NULL,
        overage_cents_per_ram_mb_second     numeric NOT NULL,
        overage_cents_per_cpu_millis_second numeric NOT NULL,
        overage_cents_per_bandwidth_byte    numeric NOT NULL,
        stripe_price_id                     text,
        sort_order                          integer NOT NULL DEFAULT 0,
        active                              boolean NOT NULL DEFAULT true,
        created_at                          timestamptz NOT NULL DEFAULT now(),
        updated_at                          timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_plans_id CHECK (id ~ '^[a-z0-9]+(-[a-z0-9]+)*$'),
        CONSTRAINT ck_plans_currency CHECK (currency ~ '^[a-z]{3}$'),
        CONSTRAINT ck_plans_amounts CHECK (
            price_cents >= 0
            AND pool_ram_mb >= 0 AND pool_cpu_millis >= 0 AND pool_bandwidth_gb >= 0
            AND included_ram_mb_seconds >= 0 AND included_cpu_millis_seconds >= 0
            AND included_bandwidth_bytes >= 0
            AND overage_cents_per_ram_mb_second >= 0
            AND overage_cents_per_cpu_millis_second >= 0
            AND overage_cents_per_bandwidth_byte >= 0)
    )""",
    # Pools: hobby 1 GB RAM, 1 CPU, 10 GB; pro 8 GB, 8 CPU, 200 GB; team 32 GB, 32 CPU,
    # 1 TB. Included per 30-day month (2,592,000 s): hobby 512 MB and 0.5 CPU all month and
    # 10 GB out; pro 4 GB, 4 CPU, 100 GB; team 16 GB, 16 CPU, 500 GB.
    # Overage: 2e-7 cents per MB-second (~$5.31 per GB-month), 4e-7 cents per
    # millicpu-second (~$10.37 per CPU-month), 1e-8 cents per byte ($0.10 per GB);
    # team pays 25% less.
    """INSERT INTO billing.plans (
        id, name, price_cents, pool_ram_mb, pool_cpu_millis, pool_bandwidth_gb,
        included_ram_mb_seconds, included_cpu_millis_seconds, included_bandwidth_bytes,
        overage_cents_per_ram_mb_second, overage_cents_per_cpu_millis_second,
        overage_cents_per_bandwidth_byte, sort_order
    ) VALUES
        ('hobby', 'Hobby',    0,  1024,  1000,   10,
         1327104000,  1296000000,   10000000000, 0.0000002,  0.0000004, 0.00000001,  1),
        ('pro',   'Pro',   2000,  8192,  8000,  200,
         10616832000, 10368000000, 100000000000, 0.0000002,  0.0000004, 0.00000001,  2),
        ('team',  'Team',  9900, 32768, 32000, 1000,
         42467328000, 41472000000, 500000000000, 0.00000015, 0.0000003, 0.0000000075, 3)
    """,
    # organization_id is identity's id. The pool is copied from the plan (and may differ
    # from it, e.g. a custom deal); allocated_* is the sum of this subscription's
    # allocations, changed by one conditional UPDATE per reservation.
    f"""CREATE TABLE billing.subscriptions (
        id                     text PRIMARY KEY,
        organization_id        text NOT NULL,
        plan_id                text NOT NULL REFERENCES billing.plans (id),
        status                 text NOT NULL,
        current_period_start   timestamptz NOT NULL,
        current_period_end     timestamptz NOT NULL,
        pool_ram_mb            integer NOT NULL,
        pool_cpu_millis        integer NOT NULL,
        pool_bandwidth_gb      integer NOT NULL,
        allocated_ram_mb       integer NOT NULL DEFAULT 0,
        allocated_cpu_millis   integer NOT NULL DEFAULT 0,
        allocated_bandwidth_gb integer NOT NULL DEFAULT 0,
        stripe_customer_id     text,
        stripe_subscription_id text,
        stripe_synced_at       timestamptz,  -- 'created' of the last Stripe event applied
        canceled_at            timestamptz,
        created_at             timestamptz NOT NULL DEFAULT now(),
        updated_at             timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_subscriptions_status CHECK (status IN ({SUBSCRIPTION_STATES})),
        CONSTRAINT ck_subscriptions_period CHECK (current_period_end > current_period_start),
        CONSTRAINT ck_subscriptions_pool
            CHECK (pool_ram_mb >= 0 AND pool_cpu_millis >= 0 AND pool_bandwidth_gb >= 0),
        CONSTRAINT ck_subscriptions_allocated_ram_mb
            CHECK (allocated_ram_mb BETWEEN 0 AND pool_ram_mb),
        CONSTRAINT ck_subscriptions_allocated_cpu_millis
            CHECK (allocated_cpu_millis BETWEEN 0 AND pool_cpu_millis),
        CONSTRAINT ck_subscriptions_allocated_bandwidth_gb
            CHECK (allocated_bandwidth_gb BETWEEN 0 AND pool_bandwidth_gb),
        CONSTRAINT uq_subscriptions_stripe_subscription_id UNIQUE (stripe_subscription_id)
    )""",
    """CREATE INDEX ix_subscriptions_organization_id_status
        ON billing.subscriptions (organization_id, status)""",
    """CREATE INDEX ix_subscriptions_current_period_end
        ON billing.subscriptions (current_period_end)""",
    # One live subscription per organization (so organization.created is idempotent).
    """CREATE UNIQUE INDEX uq_subscriptions_organization_id_live
        ON billing.subscriptions (organization_id)
        WHERE status NOT IN ('canceled', 'incomplete_expired')""",
    # One row per project: ReserveAllocation is idempotent on the project id.
    """CREATE TABLE billing.allocations (
        project_id      text PRIMARY KEY,
        organization_id text NOT NULL,
        subscription_id text NOT NULL REFERENCES billing.subscriptions (id) ON DELETE CASCADE,
        ram_mb          integer NOT NULL,
        cpu_millis      integer NOT NULL,
        bandwidth_gb    integer NOT NULL,
        created_at      timestamptz NOT NULL DEFAULT now(),
        updated_at      timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_allocations_resources
            CHECK (ram_mb >= 0 AND cpu_millis >= 0 AND bandwidth_gb >= 0)
    )""",
    "CREATE INDEX ix_allocations_organization_id ON billing.allocations (organization_id)",
    "CREATE INDEX ix_allocations_subscription_id ON billing.allocations (subscription_id)",
    # invoices before usage_records: usage points at the invoice that billed it.
    # lines: [{metric, quantity, included, overage, unit_cents, amount_cents, ...}].
    """CREATE TABLE billing.invoices (
        id                text PRIMARY KEY,
        organization_id   text NOT NULL,
        subscription_id   text NOT NULL REFERENCES billing.subscriptions (id) ON DELETE CASCADE,
        period_start      timestamptz NOT NULL,
        period_end        timestamptz NOT NULL,
        status            text NOT NULL DEFAULT 'draft',
        total_cents       bigint NOT NULL DEFAULT 0,
        currency          text NOT NULL DEFAULT 'usd',
        lines             jsonb NOT NULL DEFAULT '[]'::jsonb,
        sent              boolean NOT NULL DEFAULT false,   -- false: no Stripe configured
        stripe_invoice_id text,
        stripe_synced_at  timestamptz,
        due_at            timestamptz,
        paid_at           timestamptz,
        created_at        timestamptz NOT NULL DEFAULT now(),
        updated_at        timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_invoices_status
            CHECK (status IN ('draft', 'open', 'paid', 'uncollectible', 'void')),
        CONSTRAINT ck_invoices_period CHECK (period_end > period_start),
        CONSTRAINT ck_invoices_currency CHECK (currency ~ '^[a-z]{3}$'),
        CONSTRAINT uq_invoices_stripe_invoice_id UNIQUE (stripe_invoice_id),
        -- two billing loops at once still make one invoice per period
        CONSTRAINT uq_invoices_subscription_id_period_start
            UNIQUE (subscription_id, period_start)
    )""",
    """CREATE INDEX ix_invoices_subscription_id_created_at
        ON billing.invoices (subscription_id, created_at)""",
    "CREATE INDEX ix_invoices_status_due_at ON billing.invoices (status, due_at)",
    """CREATE INDEX ix_invoices_organization_id_created_at
        ON billing.invoices (organization_id, created_at)""",
    # invoice_id NULL: not billed yet (late usage goes on the next invoice).
    f"""CREATE TABLE billing.usage_records (
        id              text PRIMARY KEY,
        organization_id text NOT NULL,
        subscription_id text NOT NULL REFERENCES billing.subscriptions (id) ON DELETE CASCADE,
        project_id      text NOT NULL,
        metric_type     text NOT NULL,
        quantity        bigint NOT NULL,
        recorded_at     timestamptz NOT NULL,
        idempotency_key text NOT NULL,
        invoice_id      text REFERENCES billing.invoices (id) ON DELETE SET NULL,
        created_at      timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_usage_records_metric_type CHECK (metric_type IN ({METRICS})),
        CONSTRAINT ck_usage_records_quantity CHECK (quantity >= 0),
        CONSTRAINT uq_usage_records_organization_id_idempotency_key
            UNIQUE (organization_id, idempotency_key)
    )""",
    """CREATE INDEX ix_usage_records_organization_id_recorded_at
        ON billing.usage_records (organization_id, recorded_at)""",
    """CREATE INDEX ix_usage_records_subscription_id_metric_type_recorded_at
        ON billing.usage_records (subscription_id, metric_type, recorded_at)""",
    # Recorded once per provider event id, in the same transaction as its effect.
    """CREATE TABLE billing.webhook_events (
        id                text PRIMARY KEY,
        provider          text NOT NULL DEFAULT 'stripe',
        provider_event_id text NOT NULL,
        type              text NOT NULL,
        payload           jsonb NOT NULL,
        status            text NOT NULL DEFAULT 'received',
        error             text,
        event_created_at  timestamptz,       -- the provider's 'created'
        received_at       timestamptz NOT NULL DEFAULT now(),
        processed_at      timestamptz,
        CONSTRAINT ck_webhook_events_status
            CHECK (status IN ('received', 'processed', 'failed')),
        CONSTRAINT uq_webhook_events_provider_provider_event_id
            UNIQUE (provider, provider_event_id)
    )""",
    *outbox_ddl("billing"),
]

DOWNGRADE = [
    *outbox_drop_ddl("billing"),
    "DROP TABLE billing.webhook_events",
    "DROP TABLE billing.usage_records",
    "DROP TABLE billing.invoices",
    "DROP TABLE billing.allocations",
    "DROP TABLE billing.subscriptions",
    "DROP TABLE billing.plans",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
