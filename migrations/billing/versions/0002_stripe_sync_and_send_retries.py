"""billing: invoice send retries (attempts, backoff, last error); Stripe subscription sync

Invoices: each send is claimed by pushing next_attempt_at into the future (a lease that is
also the retry schedule), so one failing invoice never blocks the others and two billing
replicas never send the same invoice at once.

Subscriptions: plan_version counts plan changes; stripe_plan_version is the version the
Stripe subscription was last put on (NULL: no Stripe subscription yet), so a plan change
leaves the row "out of step" until the sync loop updates Stripe; stripe_canceled_at records
that Stripe has the subscription canceled too.

Revision ID: billing_0002
Revises: billing_0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "billing_0002"
down_revision = "billing_0001"
branch_labels = None
depends_on = None

UPGRADE = [
    """ALTER TABLE billing.invoices
        ADD COLUMN send_attempts   integer NOT NULL DEFAULT 0,
        ADD COLUMN next_attempt_at timestamptz,   -- NULL: due now; else claimed / backing off
        ADD COLUMN last_error      text,
        ADD CONSTRAINT ck_invoices_send_attempts CHECK (send_attempts >= 0)""",
    # What the sender scans: only invoices still to send, by when they are due.
    """CREATE INDEX ix_invoices_next_attempt_at_unsent
        ON billing.invoices (next_attempt_at NULLS FIRST, created_at)
        WHERE NOT sent AND status = 'draft' AND total_cents > 0""",
    """ALTER TABLE billing.subscriptions
        ADD COLUMN plan_version        integer NOT NULL DEFAULT 0,
        ADD COLUMN stripe_plan_version integer,
        ADD COLUMN stripe_canceled_at  timestamptz""",
]

DOWNGRADE = [
    """ALTER TABLE billing.subscriptions
        DROP COLUMN stripe_canceled_at,
        DROP COLUMN stripe_plan_version,
        DROP COLUMN plan_version""",
    "DROP INDEX billing.ix_invoices_next_attempt_at_unsent",
    """ALTER TABLE billing.invoices
        DROP CONSTRAINT ck_invoices_send_attempts,
        DROP COLUMN last_error,
        DROP COLUMN next_attempt_at,
        DROP COLUMN send_attempts""",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
