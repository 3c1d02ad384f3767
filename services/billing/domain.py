"""Billing rules as plain Python: resources and pools, plans, periods, overage arithmetic,
invoice and subscription state machines. No I/O here.

Money: amounts are integer cents. Unit prices are exact decimals of cents per unit (a byte of
bandwidth costs a tiny fraction of a cent), so arithmetic is `Decimal`, never float.

Rounding rule: each invoice line is rounded once, to whole cents, half up
(`ROUND_HALF_UP`: 0.5 cent -> 1 cent). A late-usage adjustment for an earlier period is the
difference between that period's rounded overage with and without the late usage, so the sum
of everything billed for a period always equals the rounded overage of its final usage.
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Protocol

from shared.errors import FailedPrecondition, InvalidArgument, QuotaViolation, ResourceExhausted
from shared.resources import Resources
from shared.usage import USAGE_METRICS, UsageMetric

# What runtime reports and billing charges for: one definition for both services.
Metric = UsageMetric
METRICS: tuple[Metric, ...] = USAGE_METRICS


class SubscriptionStatus(StrEnum):
    """Stripe's subscription states (the column stores Stripe's spelling)."""

    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    CANCELED = "canceled"
    UNPAID = "unpaid"
    PAUSED = "paused"

    @property
    def is_dead(self) -> bool:
        return self in (SubscriptionStatus.CANCELED, SubscriptionStatus.INCOMPLETE_EXPIRED)


class InvoiceStatus(StrEnum):
    DRAFT = "draft"
    OPEN = "open"
    PAID = "paid"
    UNCOLLECTIBLE = "uncollectible"
    VOID = "void"


# Stripe moves an invoice draft -> open -> {paid | void | uncollectible}, and an
# uncollectible one may still be paid or voided. Ranks order those moves.
_INVOICE_RANK = {
    InvoiceStatus.DRAFT: 0,
    InvoiceStatus.OPEN: 1,
    InvoiceStatus.UNCOLLECTIBLE: 2,
    InvoiceStatus.PAID: 3,
    InvoiceStatus.VOID: 3,
}


def invoice_moves_forward(current: InvoiceStatus, new: InvoiceStatus) -> bool:
    """True when `new` is later than `current`: older events never move an invoice back."""
    return _INVOICE_RANK[new] > _INVOICE_RANK[current]


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


# --------------------------------------------------------------------------- resources


MAX_RESOURCE = 2**31 - 1


def validate_allocation(resources: Resources) -> None:
    for name, value in resources.items():
        if value < 0:
            raise InvalidArgument.field(f"resources.{name}", "must not be negative")


def pool_shortfall(pool: Resources, allocated: Resources, delta: Resources) -> ResourceExhausted:
    """The error for a reservation that does not fit: names each resource that is short."""
    violations = [
        QuotaViolation(
            subject=f"organization pool: {name}",
            description=(
                f"needs {need} more {name} but only {free} of {total} are free ({used} allocated)"
            ),
        )
        for (name, need), (_, free), (_, total), (_, used) in zip(
            delta.items(), (pool - allocated).items(), pool.items(), allocated.items(), strict=True
        )
        if need > 0 and need > free
    ]
    return ResourceExhausted("the organization's resource pool is too small", violations)


def downgrade_blocked(plan_id: str, pool: Resources, allocated: Resources) -> None:
    """A plan whose pool is smaller than what is allocated cannot be taken."""
    short = [
        f"{name}: {used} allocated, {plan_id} allows {limit}"
        for (name, used), (_, limit) in zip(allocated.items(), pool.items(), strict=True)
        if used > limit
    ]
    if short:
        raise FailedPrecondition(
            f"cannot move to plan {plan_id}: " + "; ".join(short),
            reason="ALLOCATION_EXCEEDS_PLAN",
            metadata={f"{name}_allocated": str(used) for name, used in allocated.items()}
            | {f"{name}_limit": str(limit) for name, limit in pool.items()},
        )


# --------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    id: str
    name: str
    price_cents: int
    currency: str
    pool: Resources
    included: Mapping[Metric, int]
    unit_cents: Mapping[Metric, Decimal]
    stripe_price_id: str = ""


# -------------------------------------------------------------------------------- periods


def add_months(anchor: datetime, months: int) -> datetime:
    """`anchor` plus whole months, the day clamped to the month's end (Jan 31 -> Feb 28)."""
    index = anchor.month - 1 + months
    year, month = anchor.year + index // 12, index % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_containing(anchor: datetime, instant: datetime) -> tuple[datetime, datetime]:
    """The monthly period, counted from `anchor`, that holds `instant` (start inclusive)."""
    months = (instant.year - anchor.year) * 12 + instant.month - anchor.month
    n = months
    while add_months(anchor, n) > instant:
        n -= 1
    while add_months(anchor, n + 1) <= instant:
        n += 1
    return add_months(anchor, n), add_months(anchor, n + 1)


def next_period_end(anchor: datetime, period_end: datetime) -> datetime:
    """The end of the period that starts at `period_end`, keeping the anchor's day."""
    return period_containing(anchor, period_end)[1]


# ------------------------------------------------------------------------------- overage


def overage(used: int, included: int) -> int:
    return max(0, used - included)


def overage_cents(used: int, included: int, unit_cents: Decimal) -> int:
    """max(0, used - included) x unit price, rounded to whole cents half up."""
    exact = Decimal(overage(used, included)) * unit_cents
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass(frozen=True)
class InvoiceLine:
    metric: Metric
    quantity: int  # usage counted on this line
    included: int
    unit_cents: Decimal
    amount_cents: int
    period_start: datetime  # the period whose usage this is
    adjustment: bool = False  # late usage of an earlier, already invoiced period
    billed_before: int = 0  # adjustment only: that period's usage already invoiced

    @property
    def description(self) -> str:
        label = {
            Metric.RAM_MB_SECONDS: "RAM overage (MB-seconds)",
            Metric.CPU_MILLIS_SECONDS: "CPU overage (millicpu-seconds)",
            Metric.BANDWIDTH_BYTES: "Bandwidth overage (bytes)",
        }[self.metric]
        if self.adjustment:
            return f"{label}: late usage for the period from {self.period_start:%Y-%m-%d}"
        return label

    def to_json(self) -> dict[str, object]:
        return {
            "metric": self.metric.value,
            "quantity": self.quantity,
            "included": self.included,
            "unit_cents": str(self.unit_cents),
            "amount_cents": self.amount_cents,
            "period_start": self.period_start.isoformat(),
            "adjustment": self.adjustment,
            "billed_before": self.billed_before,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> InvoiceLine:
        return cls(
            metric=Metric(str(data["metric"])),
            quantity=int(str(data["quantity"])),
            included=int(str(data["included"])),
            unit_cents=Decimal(str(data["unit_cents"])),
            amount_cents=int(str(data["amount_cents"])),
            period_start=datetime.fromisoformat(str(data["period_start"])),
            adjustment=bool(data.get("adjustment", False)),
            billed_before=int(str(data.get("billed_before", 0))),
        )


def period_line(plan: Plan, metric: Metric, used: int, period_start: datetime) -> InvoiceLine:
    unit = plan.unit_cents[metric]
    included = plan.included[metric]
    return InvoiceLine(
        metric=metric,
        quantity=used,
        included=included,
        unit_cents=unit,
        amount_cents=overage_cents(used, included, unit),
        period_start=period_start,
    )


def adjustment_line(
    metric: Metric,
    *,
    late: int,
    billed_before: int,
    included: int,
    unit_cents: Decimal,
    period_start: datetime,
) -> InvoiceLine:
    """What late usage adds to an earlier period's bill, on that period's terms."""
    amount = overage_cents(billed_before + late, included, unit_cents) - overage_cents(
        billed_before, included, unit_cents
    )
    return InvoiceLine(
        metric=metric,
        quantity=late,
        included=included,
        unit_cents=unit_cents,
        amount_cents=amount,
        period_start=period_start,
        adjustment=True,
        billed_before=billed_before,
    )


@dataclass
class InvoiceDraft:
    lines: list[InvoiceLine] = field(default_factory=list)

    @property
    def total_cents(self) -> int:
        return sum(line.amount_cents for line in self.lines)


# --------------------------------------------------------------------- idempotency keys


def _stamp(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def invoice_item_key(subscription_id: str, period_start: datetime, line: InvoiceLine) -> str:
    """Stripe idempotency key of one invoice item: subscription + period + metric."""
    key = f"hangar-ii-{subscription_id}-{_stamp(period_start)}-{line.metric.value}"
    if line.adjustment:
        key += f"-late-{_stamp(line.period_start)}"
    return key


def invoice_key(subscription_id: str, period_start: datetime) -> str:
    return f"hangar-in-{subscription_id}-{_stamp(period_start)}"


def customer_key(subscription_id: str) -> str:
    return f"hangar-cus-{subscription_id}"


def stripe_subscription_key(subscription_id: str, plan_id: str) -> str:
    return f"hangar-sub-{subscription_id}-{plan_id}"


def stripe_subscription_update_key(subscription_id: str, plan_version: int, plan_id: str) -> str:
    """One key per plan change (the version counts them): moving pro -> team -> pro makes
    two different updates to pro, not a replay of the first."""
    return f"hangar-subupd-{subscription_id}-v{plan_version}-{plan_id}"


def stripe_subscription_cancel_key(subscription_id: str) -> str:
    return f"hangar-subcancel-{subscription_id}"


def stripe_product_id(plan_id: str) -> str:
    """The Stripe Product a Hangar plan is sold as (a deterministic, caller-chosen id)."""
    return f"hangar-{plan_id}"


def stripe_plan_id(plan: Plan, interval: str = "month") -> str:
    """The Stripe Plan (a Price, to Stripe's Prices API) for a Hangar plan's current terms.
    The terms are in the id, so a changed price makes a new Stripe Plan, never edits one."""
    return f"hangar-{plan.id}-{plan.currency}-{plan.price_cents}-{interval}"


# ------------------------------------------------------------------------- send retries


def send_backoff_seconds(attempts: int, base: float, maximum: float) -> float:
    """Wait before the next send after `attempts` tries: base x 2^(attempts-1), capped."""
    if attempts <= 0:
        return 0.0
    return float(min(maximum, base * 2 ** min(attempts - 1, 62)))


# ----------------------------------------------------------------------- webhook effects


def subscription_status_from_stripe(status: str) -> SubscriptionStatus | None:
    try:
        return SubscriptionStatus(status)
    except ValueError:
        return None


def invoice_status_for_event(event_type: str, stripe_status: str) -> InvoiceStatus | None:
    """The status an invoice event proves the invoice has reached (at least)."""
    by_type = {
        "invoice.finalized": InvoiceStatus.OPEN,
        "invoice.paid": InvoiceStatus.PAID,
        "invoice.payment_succeeded": InvoiceStatus.PAID,
        "invoice.payment_failed": InvoiceStatus.OPEN,
        "invoice.voided": InvoiceStatus.VOID,
        "invoice.marked_uncollectible": InvoiceStatus.UNCOLLECTIBLE,
    }
    proven = by_type.get(event_type)
    try:
        reported = InvoiceStatus(stripe_status) if stripe_status else None
    except ValueError:
        reported = None
    candidates = [s for s in (proven, reported) if s is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda s: _INVOICE_RANK[s])
