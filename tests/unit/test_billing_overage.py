"""Overage arithmetic and billing periods, as properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from services.billing.domain import (
    InvoiceStatus,
    Metric,
    add_months,
    adjustment_line,
    invoice_moves_forward,
    overage_cents,
    period_containing,
)

quantities = st.integers(min_value=0, max_value=10**15)
prices = st.decimals(
    min_value=Decimal(0), max_value=Decimal(100), places=10, allow_nan=False, allow_infinity=False
)
instants = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
)


def test_rounding_is_half_up_to_whole_cents() -> None:
    assert overage_cents(15, 10, Decimal("0.1")) == 1  # 0.5 cent -> 1
    assert overage_cents(14, 10, Decimal("0.1")) == 0  # 0.4 cent -> 0
    assert overage_cents(10**10, 0, Decimal("0.0000002")) == 2000  # exact, no float drift


@given(used=quantities, included=quantities, unit=prices)
def test_no_overage_within_included_and_never_negative(
    used: int, included: int, unit: Decimal
) -> None:
    cents = overage_cents(used, included, unit)
    assert cents >= 0
    if used <= included:
        assert cents == 0
    exact = Decimal(max(0, used - included)) * unit
    assert abs(Decimal(cents) - exact) <= Decimal("0.5")


@given(used=quantities, extra=quantities, included=quantities, unit=prices)
def test_more_usage_never_costs_less(used: int, extra: int, included: int, unit: Decimal) -> None:
    assert overage_cents(used + extra, included, unit) >= overage_cents(used, included, unit)


@given(
    batches=st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=8),
    included=quantities,
    unit=prices,
)
def test_late_usage_adjustments_sum_to_the_periods_final_charge(
    batches: list[int], included: int, unit: Decimal
) -> None:
    """The first batch is invoiced with its period; each later one arrives late and is billed
    as an adjustment. Together they charge exactly what the whole usage would have."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    billed = batches[0]
    charged = overage_cents(billed, included, unit)
    for late in batches[1:]:
        line = adjustment_line(
            Metric.RAM_MB_SECONDS,
            late=late,
            billed_before=billed,
            included=included,
            unit_cents=unit,
            period_start=start,
        )
        assert line.adjustment and line.amount_cents >= 0
        charged += line.amount_cents
        billed += late
    assert charged == overage_cents(sum(batches), included, unit)


@given(anchor=instants, instant=instants)
def test_periods_contain_their_instant_and_tile_time(anchor: datetime, instant: datetime) -> None:
    start, end = period_containing(anchor, instant)
    assert start <= instant < end
    assert timedelta(days=28) <= end - start <= timedelta(days=31)
    assert period_containing(anchor, end)[0] == end
    assert period_containing(anchor, start - timedelta(microseconds=1))[1] == start


@given(anchor=instants, months=st.integers(min_value=0, max_value=240))
def test_months_keep_the_anchor_day_where_the_month_has_it(anchor: datetime, months: int) -> None:
    later = add_months(anchor, months)
    assert later.day == anchor.day or later.day < anchor.day  # clamped at month end
    assert later.time() == anchor.time()


@given(current=st.sampled_from(list(InvoiceStatus)), new=st.sampled_from(list(InvoiceStatus)))
def test_invoice_status_never_moves_back(current: InvoiceStatus, new: InvoiceStatus) -> None:
    if invoice_moves_forward(current, new):
        assert not invoice_moves_forward(new, current)
    assert not invoice_moves_forward(InvoiceStatus.PAID, InvoiceStatus.OPEN)
    assert not invoice_moves_forward(InvoiceStatus.PAID, InvoiceStatus.DRAFT)
