"""The rows billing reads back, the schema constants every query names, and page tokens."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.billing.domain import (
    InvoiceLine,
    InvoiceStatus,
    Metric,
    SubscriptionStatus,
)
from shared.db import from_row
from shared.resources import Resources

S = "billing"
DEAD = "('canceled', 'incomplete_expired')"
HOBBY = "hobby"


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Subscription:
    id: str
    organization_id: str
    plan_id: str
    status: SubscriptionStatus
    current_period_start: datetime
    current_period_end: datetime
    pool: Resources
    allocated: Resources
    stripe_customer_id: str
    stripe_subscription_id: str
    stripe_synced_at: datetime | None
    created_at: datetime
    plan_version: int = 0  # counts plan changes
    stripe_plan_version: int | None = None  # the version Stripe is on; None: not created
    stripe_canceled_at: datetime | None = None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Subscription:
        return from_row(
            cls,
            row,
            status=SubscriptionStatus(row["status"]),
            pool=Resources.from_row(row, prefix="pool_"),
            allocated=Resources.from_row(row, prefix="allocated_"),
        )


@dataclass(frozen=True)
class Allocation:
    organization_id: str
    project_id: str
    resources: Resources
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Allocation:
        return from_row(cls, row, resources=Resources.from_row(row))


@dataclass(frozen=True)
class Invoice:
    id: str
    organization_id: str
    subscription_id: str
    period_start: datetime
    period_end: datetime
    status: InvoiceStatus
    lines: list[InvoiceLine]
    total_cents: int
    currency: str
    stripe_invoice_id: str
    sent: bool
    created_at: datetime
    due_at: datetime | None
    send_attempts: int = 0
    next_attempt_at: datetime | None = None
    last_error: str = ""
    hosted_invoice_url: str = ""  # Stripe's page for it, once finalized

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Invoice:
        return from_row(
            cls,
            row,
            status=InvoiceStatus(row["status"]),
            lines=[InvoiceLine.from_json(line) for line in row["lines"] or []],
        )


@dataclass(frozen=True)
class BilledUsage:
    metric: Metric
    period_start: datetime | None  # None: the invoice's own period
    quantity: int


UsageRow = tuple[str, str, str, str, int, datetime, str]
