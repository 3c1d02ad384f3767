"""billing: invoices' Stripe page

- invoices.hosted_invoice_url: the page where the customer sees and pays the invoice
  (Stripe's hosted_invoice_url), from the finalized invoice or a later webhook.

Revision ID: billing_0004
Revises: billing_0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "billing_0004"
down_revision = "billing_0003"
branch_labels = None
depends_on = None

UPGRADE = [
    r"""ALTER TABLE billing.invoices ADD COLUMN hosted_invoice_url text,
        ADD CONSTRAINT ck_invoices_hosted_invoice_url
            CHECK (hosted_invoice_url IS NULL OR hosted_invoice_url ~ '^https?://')""",
]

DOWNGRADE = [
    """ALTER TABLE billing.invoices DROP CONSTRAINT ck_invoices_hosted_invoice_url,
        DROP COLUMN hosted_invoice_url""",
]

upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
