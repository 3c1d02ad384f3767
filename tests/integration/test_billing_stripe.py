"""The real Stripe SDK against localstripe (a stateful fake Stripe on a loopback port).

What runs end to end here: the catalog (Products and Plans with deterministic ids, made once),
a customer and a subscription per Hangar subscription, ChangePlan moving the Stripe
subscription's item, organization.deleted canceling it in Stripe.

localstripe gaps, found here (so those parts are tested elsewhere, with the recording
gateway in test_billing_usage_and_cycle / test_billing_send_retries, against our side only):
- it ignores the Idempotency-Key header (a retried create makes a second object), so keys
  are checked for being deterministic, not for Stripe honouring them;
- it has no Prices API: a catalog configured as Price ids (HANGAR_STRIPE_PRICES) goes out as
  `items[].price`, which it refuses; the Plans it does have are what billing creates itself;
- it drops `metadata` given to a subscription update;
- a subscription on a paid plan needs a payment method at creation (real Stripe would make
  it `incomplete` instead), so organizations start on the free hobby plan here, as they do;
- POST /v1/invoices with the parameters real Stripe takes (currency, auto_advance,
  pending_invoice_items_behavior...) answers 500, so invoice sending is tested against
  localstripe only for what a failure leaves behind.
"""

from __future__ import annotations

from datetime import timedelta

import stripe

from hangar.billing.v1 import billing_pb2
from services.billing.domain import Plan, stripe_plan_id
from tests.integration.test_billing_usage_and_cycle import HOBBY_RAM_INCLUDED, record
from tests.support import billing as billing_fixtures
from tests.support import localstripe as localstripe_fixtures
from tests.support.billing import Billing, RecordingGateway
from tests.support.localstripe import API_KEY

identity = billing_fixtures.identity
billing = billing_fixtures.billing
start_billing = billing_fixtures.start_billing
localstripe = localstripe_fixtures.localstripe


def _client(base: str) -> stripe.StripeClient:
    return stripe.StripeClient(API_KEY, base_addresses={"api": base})


async def _subscription_id(b: Billing, org: str) -> str:
    async with b.app.db.session() as s:
        return str(
            await s.fetchval(
                "SELECT id FROM billing.subscriptions WHERE organization_id = $1"
                " ORDER BY created_at DESC LIMIT 1",
                org,
            )
        )


async def _plans(b: Billing) -> dict[str, Plan]:
    from services.billing import store

    async with b.app.db.session() as s:
        return {p.id: p for p in await store.all_plans(s)}


async def test_catalog_is_created_once_with_deterministic_ids(start_billing, localstripe) -> None:  # type: ignore[no-untyped-def]
    one: Billing = await start_billing(stripe_api_key=API_KEY, stripe_api_base=localstripe)
    two: Billing = await start_billing(stripe_api_key=API_KEY, stripe_api_base=localstripe)
    first = await one.app.cycle.ensure_catalog()
    second = await two.app.cycle.ensure_catalog()  # another replica / a restart
    assert first == second
    plans = await _plans(one)
    client = _client(localstripe)
    for plan_id, plan in plans.items():
        price = first[plan_id]
        assert price.legacy_plan and price.id == stripe_plan_id(plan)
        assert plan.stripe_price_id == price.id  # recorded on the plan row, shown by ListPlans
        remote = client.v1.plans.retrieve(price.id)
        assert remote.amount == plan.price_cents and remote.currency == plan.currency
        assert remote.interval == "month" and remote.product == f"hangar-{plan_id}"
    listed = client.v1.plans.list(params={"limit": 100}).data
    ours = [p.id for p in listed if p.id.startswith("hangar-")]
    assert len(ours) == len(set(ours)) == len(plans)
    someone = await one.user()  # any signed-in user may list plans
    shown = await one.stub.ListPlans(billing_pb2.ListPlansRequest(), metadata=someone.md)
    assert {p.id: p.stripe_price_id for p in shown.plans} == {k: v.id for k, v in first.items()}


async def test_customer_and_subscription_are_created_and_kept_in_step(
    start_billing,  # type: ignore[no-untyped-def]
    localstripe,
) -> None:
    b: Billing = await start_billing(stripe_api_key=API_KEY, stripe_api_base=localstripe)
    owner = b.owner
    org = await b.create_org(owner)
    sub_id = await _subscription_id(b, org)
    assert await b.app.cycle.sync_subscription(sub_id)
    assert not await b.app.cycle.sync_subscription(sub_id)  # in step: nothing to do
    got = await b.stub.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=org), metadata=owner.md
    )
    assert got.stripe_customer_id.startswith("cus_")
    assert got.stripe_subscription_id.startswith("sub_")
    client = _client(localstripe)
    customer = client.v1.customers.retrieve(got.stripe_customer_id)
    assert customer.metadata is not None
    assert customer.metadata["hangar_organization_id"] == org
    plans = await _plans(b)
    remote = client.v1.subscriptions.retrieve(got.stripe_subscription_id)
    assert remote.customer == got.stripe_customer_id
    assert remote.metadata["hangar_subscription_id"] == sub_id
    assert remote.status == "active"  # the hobby plan is free
    assert [i["plan"]["id"] for i in remote["items"]["data"]] == [stripe_plan_id(plans["hobby"])]

    # ChangePlan moves the Stripe subscription's one item (no second item, same subscription).
    for target in ("pro", "hobby", "pro"):
        changed = await b.stub.ChangePlan(
            billing_pb2.ChangePlanRequest(organization_id=org, plan_id=target),
            metadata=owner.md,
        )
        assert changed.plan_id == target
        remote = client.v1.subscriptions.retrieve(got.stripe_subscription_id)
        items = remote["items"]["data"]
        assert [i["plan"]["id"] for i in items] == [stripe_plan_id(plans[target])]
        # (localstripe drops `metadata` on subscription updates, so hangar_plan is not read.)
    async with b.app.db.session() as s:
        row = await s.fetchrow(
            "SELECT plan_version, stripe_plan_version FROM billing.subscriptions WHERE id = $1",
            sub_id,
        )
    assert row is not None and row["plan_version"] == row["stripe_plan_version"] == 3

    # organization.deleted cancels ours at once and Stripe's on the next sync pass.
    await b.delete_org(org)
    assert await b.app.cycle.sync_subscription(sub_id)
    assert client.v1.subscriptions.retrieve(got.stripe_subscription_id).status == "canceled"
    assert not await b.app.cycle.sync_subscription(sub_id)
    async with b.app.db.session() as s:
        canceled_at = await s.fetchval(
            "SELECT stripe_canceled_at FROM billing.subscriptions WHERE id = $1", sub_id
        )
    assert canceled_at is not None


async def test_a_plan_change_while_stripe_is_down_is_synced_by_the_next_pass(
    start_billing,  # type: ignore[no-untyped-def]
    localstripe,
) -> None:
    b: Billing = await start_billing(stripe_api_key=API_KEY, stripe_api_base=localstripe)
    owner = b.owner
    org = await b.create_org(owner)
    sub_id = await _subscription_id(b, org)
    await b.app.cycle.sync_subscription(sub_id)
    down: Billing = await start_billing(
        stripe_api_key=API_KEY,
        stripe_api_base="http://127.0.0.1:9",  # nothing listens
    )
    down.app.cycle._prices = await b.app.cycle.ensure_catalog()
    changed = await down.stub.ChangePlan(
        billing_pb2.ChangePlanRequest(organization_id=org, plan_id="pro"), metadata=owner.md
    )
    assert changed.plan_id == "pro"  # ours changed; Stripe did not answer
    got = await b.stub.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=org), metadata=owner.md
    )
    remote = _client(localstripe).v1.subscriptions.retrieve(got.stripe_subscription_id)
    assert remote["items"]["data"][0]["plan"]["id"].startswith("hangar-hobby-")
    assert await b.app.cycle.sync_subscription(sub_id)  # the loop's next pass
    remote = _client(localstripe).v1.subscriptions.retrieve(got.stripe_subscription_id)
    assert remote["items"]["data"][0]["plan"]["id"].startswith("hangar-pro-")


async def test_configured_prices_are_used_as_prices(start_billing) -> None:  # type: ignore[no-untyped-def]
    """HANGAR_STRIPE_PRICES: the configured id goes out as a Price (`items[].price`); not
    against localstripe, which has no Prices (module docstring)."""
    gateway = RecordingGateway()
    b: Billing = await start_billing(gateway=gateway)
    b.app.cycle.stripe_prices = {"hobby": "price_hobby_configured"}
    b.app.cycle._prices = None
    prices = await b.app.cycle.ensure_catalog()
    assert prices["hobby"].id == "price_hobby_configured" and not prices["hobby"].legacy_plan
    assert prices["hobby"].item() == {"price": "price_hobby_configured"}
    assert prices["pro"].item() == {"plan": "plan_pro"}
    org = await b.create_org()
    sub_id = await _subscription_id(b, org)
    await b.app.cycle.sync_subscription(sub_id)
    assert (sub_id, "hobby", "price_hobby_configured") in gateway.subscriptions


async def test_a_failed_send_leaves_the_invoice_unsent_for_a_later_attempt(
    start_billing,  # type: ignore[no-untyped-def]
    localstripe,
) -> None:
    """localstripe cannot create a standalone invoice (see module docstring): the send fails,
    the invoice stays a draft, not sent, with the error and the next attempt booked."""
    b: Billing = await start_billing(stripe_api_key=API_KEY, stripe_api_base=localstripe)
    owner = b.owner
    org = await b.create_org(owner)
    await b.stub.RecordUsage(
        billing_pb2.RecordUsageRequest(
            records=[record(org, "u", HOBBY_RAM_INCLUDED + 10**10, b.clock.now())]
        ),
        metadata=b.service("runtime"),
    )
    b.clock.advance(days=32)
    while await b.app.cycle.close_one_period():
        pass
    await b.app.cycle.sync_subscription(await _subscription_id(b, org))
    await b.app.cycle.send_due_invoices()
    (invoice,) = (
        await b.stub.ListInvoices(
            billing_pb2.ListInvoicesRequest(organization_id=org), metadata=owner.md
        )
    ).invoices
    assert not invoice.sent and invoice.status == billing_pb2.INVOICE_STATUS_DRAFT
    assert invoice.total_cents == 2000
    assert invoice.period_end.ToDatetime() - invoice.period_start.ToDatetime() >= timedelta(days=28)
    async with b.app.db.session() as s:
        row = await s.fetchrow(
            "SELECT send_attempts, next_attempt_at, last_error FROM billing.invoices WHERE id = $1",
            invoice.id,
        )
    assert row is not None and row["send_attempts"] == 1
    assert row["next_attempt_at"] > b.clock.now() and row["last_error"]
