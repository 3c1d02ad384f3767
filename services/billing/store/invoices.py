"""Invoices as callers and Stripe's webhooks see them."""

from __future__ import annotations

from datetime import datetime

from services.billing.domain import InvoiceStatus
from services.billing.store.records import Invoice, S
from shared.db import Session


async def list_invoices(
    s: Session, organization_id: str, after: tuple[datetime, str] | None, limit: int
) -> list[Invoice]:
    if after is None:
        rows = await s.fetch(
            f"""SELECT * FROM {S}.invoices WHERE organization_id = $1
                ORDER BY created_at DESC, id DESC LIMIT $2""",
            organization_id,
            limit,
        )
    else:
        rows = await s.fetch(
            f"""SELECT * FROM {S}.invoices WHERE organization_id = $1
                  AND (created_at, id) < ($2, $3)
                ORDER BY created_at DESC, id DESC LIMIT $4""",
            organization_id,
            after[0],
            after[1],
            limit,
        )
    return [Invoice.from_row(r) for r in rows]


async def get_invoice(s: Session, invoice_id: str) -> Invoice | None:
    row = await s.fetchrow(f"SELECT * FROM {S}.invoices WHERE id = $1", invoice_id)
    return Invoice.from_row(row) if row else None


async def lock_invoice_for_stripe(
    tx: Session, stripe_invoice_id: str, hangar_invoice_id: str
) -> Invoice | None:
    row = await tx.fetchrow(
        f"""SELECT * FROM {S}.invoices WHERE stripe_invoice_id = $1 OR id = $2
            LIMIT 1 FOR UPDATE""",
        stripe_invoice_id,
        hangar_invoice_id,
    )
    return Invoice.from_row(row) if row else None


async def apply_invoice_status(
    tx: Session,
    invoice_id: str,
    status: InvoiceStatus,
    stripe_invoice_id: str,
    event_created: datetime,
    hosted_invoice_url: str = "",
) -> None:
    await tx.execute(
        f"""UPDATE {S}.invoices SET status = $2, stripe_synced_at = $4, updated_at = now(),
                stripe_invoice_id = coalesce(stripe_invoice_id, nullif($3, '')),
                hosted_invoice_url = coalesce(nullif($5, ''), hosted_invoice_url),
                paid_at = CASE WHEN $2 = 'paid' THEN $4 ELSE paid_at END
            WHERE id = $1""",
        invoice_id,
        status.value,
        stripe_invoice_id,
        event_created,
        hosted_invoice_url,
    )
