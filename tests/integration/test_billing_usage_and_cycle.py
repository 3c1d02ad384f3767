"""Usage metering and the billing cycle on real PostgreSQL, through the gRPC API.

Usage arrives with runtime's real service token; reads carry the owner's real access token
(tests/support/billing.py). Which callers RecordUsage refuses is in test_billing_tenancy."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2

from hangar.billing.v1 import billing_pb2
from services.billing.domain import invoice_item_key
from tests.support import billing as billing_fixtures
from tests.support.billing import Billing, RecordingGateway, User

identity = billing_fixtures.identity
billing = billing_fixtures.billing
start_billing = billing_fixtures.start_billing

RAM = billing_pb2.USAGE_METRIC_RAM_MB_SECONDS
BW = billing_pb2.USAGE_METRIC_BANDWIDTH_BYTES
HOBBY_RAM_INCLUDED = 1_327_104_000
HOBBY_BW_INCLUDED = 10_000_000_000


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def record(
    org: str, key: str, qty: int, at: datetime, metric: int = RAM
) -> billing_pb2.UsageRecord:
    return billing_pb2.UsageRecord(
        organization_id=org,
        project_id="p1",
        metric=metric,  # type: ignore[arg-type]
        quantity=qty,
        recorded_at=_ts(at),
        idempotency_key=key,
    )


async def _record(b: Billing, *records: billing_pb2.UsageRecord) -> billing_pb2.RecordUsageResponse:
    return await b.stub.RecordUsage(
        billing_pb2.RecordUsageRequest(records=list(records)), metadata=b.service("runtime")
    )


async def _summary(b: Billing, org: str, owner: User) -> dict[int, billing_pb2.MetricUsage]:
    s = await b.stub.GetUsageSummary(
        billing_pb2.GetUsageSummaryRequest(organization_id=org), metadata=owner.md
    )
    return {m.metric: m for m in s.metrics}


async def _invoices(b: Billing, org: str, owner: User) -> list[billing_pb2.Invoice]:
    reply = await b.stub.ListInvoices(
        billing_pb2.ListInvoicesRequest(organization_id=org), metadata=owner.md
    )
    return list(reply.invoices)


async def test_replayed_batch_changes_no_totals(billing: Billing) -> None:
    owner = billing.owner
    org = await billing.create_org(owner)
    now = billing.clock.now()
    batch = [record(org, f"k{i}", 1000, now + timedelta(seconds=i)) for i in range(100)]
    first = await _record(billing, *batch)
    assert (first.accepted, first.duplicates) == (100, 0)
    again = await _record(billing, *batch)
    assert (again.accepted, again.duplicates) == (0, 100)
    assert (await _summary(billing, org, owner))[RAM].used == 100_000


async def test_a_failed_batch_burns_no_keys(billing: Billing) -> None:
    """A batch naming an organization billing does not know fails as a whole; the keys of
    its good records are still free afterwards."""
    owner = billing.owner
    org = await billing.create_org(owner)
    now = billing.clock.now()
    good = [record(org, f"g{i}", 5, now) for i in range(10)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _record(billing, *good, record("no-such-org", "x", 1, now))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reply = await _record(billing, *good)
    assert (reply.accepted, reply.duplicates) == (10, 0)


async def test_keys_count_once_per_organization_not_globally(billing: Billing) -> None:
    owner = billing.owner
    org_a, org_b = await billing.create_org(owner), await billing.create_org(owner)
    now = billing.clock.now()
    reply = await _record(billing, record(org_a, "same", 1, now), record(org_b, "same", 1, now))
    assert reply.accepted == 2


async def test_closed_period_invoices_overage_without_stripe_as_not_sent(billing: Billing) -> None:
    owner = billing.owner
    org = await billing.create_org(owner)
    now = billing.clock.now()
    over = 10_000_000_000  # MB-seconds past the included amount: 2e-7 cents each = 2000 cents
    await _record(billing, record(org, "a", HOBBY_RAM_INCLUDED + over, now + timedelta(days=1)))
    await billing.app.cycle.run_once()
    assert await _invoices(billing, org, owner) == []  # the period is not over yet
    billing.clock.advance(days=32)
    await billing.app.cycle.run_once()
    (invoice,) = await _invoices(billing, org, owner)
    assert invoice.total_cents == 2000 and not invoice.sent
    assert invoice.status == billing_pb2.INVOICE_STATUS_DRAFT
    ram = next(line for line in invoice.lines if line.metric == RAM)
    assert (ram.quantity, ram.amount_cents, ram.unit_price_cents) == (
        HOBBY_RAM_INCLUDED + over,
        2000,
        "2E-7",
    )
    sub = await billing.stub.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=org), metadata=owner.md
    )
    assert sub.current_period_start.ToDatetime() == invoice.period_end.ToDatetime()


async def test_late_usage_is_billed_on_the_next_invoice_as_an_adjustment(billing: Billing) -> None:
    owner = billing.owner
    org = await billing.create_org(owner)
    start = billing.clock.now()
    await _record(
        billing, record(org, "on-time", HOBBY_BW_INCLUDED + 10**9, start + timedelta(days=2), BW)
    )
    billing.clock.advance(days=32)
    await billing.app.cycle.run_once()
    # Usage from the first period arrives after it was invoiced.
    await _record(billing, record(org, "late", 3 * 10**9, start + timedelta(days=3), BW))
    billing.clock.advance(days=31)
    await billing.app.cycle.run_once()
    second, first = await _invoices(billing, org, owner)
    assert first.total_cents == 10  # 1e9 bytes x 1e-8 cents
    late = [line for line in second.lines if line.adjustment]
    assert [(x.metric, x.quantity, x.amount_cents) for x in late] == [(BW, 3 * 10**9, 30)]
    assert second.total_cents == 30
    assert first.period_start.ToDatetime() < second.period_start.ToDatetime()


async def test_two_billing_loops_at_once_make_one_invoice_per_period(start_billing) -> None:  # type: ignore[no-untyped-def]
    one: Billing = await start_billing()
    two: Billing = await start_billing()
    owner = one.owner
    orgs = [await one.create_org(owner) for _ in range(5)]
    for org in orgs:
        await _record(one, record(org, "u", HOBBY_RAM_INCLUDED + 10**10, one.clock.now()))
    for b in (one, two):
        b.clock.advance(days=100)  # three periods have ended
    await asyncio.gather(*(b.app.cycle.run_once() for b in (one, two, one, two)))
    async with one.app.db.session() as s:
        rows = await s.fetch(
            "SELECT subscription_id, period_start, count(*) AS n FROM billing.invoices"
            " WHERE organization_id = ANY($1) GROUP BY 1, 2",
            orgs,
        )
    assert len(rows) == 15 and all(r["n"] == 1 for r in rows)
    for org in orgs:
        totals = [i.total_cents for i in await _invoices(one, org, owner)]
        assert sorted(totals) == [0, 0, 2000]


async def test_with_stripe_invoices_are_sent_once_with_deterministic_keys(start_billing) -> None:  # type: ignore[no-untyped-def]
    gateway = RecordingGateway()
    b: Billing = await start_billing(gateway=gateway)
    owner = b.owner
    org = await b.create_org(owner)
    await _record(b, record(org, "u", HOBBY_RAM_INCLUDED + 10**10, b.clock.now()))
    b.clock.advance(days=32)
    await asyncio.gather(b.app.cycle.run_once(), b.app.cycle.run_once())
    await b.app.cycle.run_once()
    sent = [i for i in gateway.invoices if i.organization_id == org]
    assert len(sent) == 1
    (invoice,) = await _invoices(b, org, owner)
    assert invoice.sent and invoice.status == billing_pb2.INVOICE_STATUS_OPEN
    assert invoice.stripe_invoice_id == f"in_{invoice.id}"
    ram_line = next(x for x in sent[0].lines if x.amount_cents > 0)
    key = invoice_item_key(sent[0].subscription_id, sent[0].period_start, ram_line)
    assert key == invoice_item_key(sent[0].subscription_id, sent[0].period_start, ram_line)
    assert sent[0].subscription_id in key and "ram_mb_seconds" in key
