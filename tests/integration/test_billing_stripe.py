"""The real Stripe SDK against localstripe (a stateful fake Stripe on a loopback port).

localstripe gaps, found here: it ignores the Idempotency-Key header (a retried create makes
a second object), it has no Prices (so plans with a stripe_price_id cannot be subscribed),
and POST /v1/invoices with the parameters real Stripe takes (currency, auto_advance,
pending_invoice_items_behavior...) answers 500, while without them it answers 404 "No
upcoming invoices" for a customer without a subscription. So: customers are tested end to
end here; invoice sending is tested against localstripe only for what a failure leaves
behind, and its request flow with the recording gateway (test_billing_usage_and_cycle).
"""

from __future__ import annotations

from datetime import timedelta

import stripe

from hangar.billing.v1 import billing_pb2
from shared.ids import new_id
from tests.integration.test_billing_usage_and_cycle import HOBBY_RAM_INCLUDED, record
from tests.support import billing as billing_fixtures
from tests.support import localstripe as localstripe_fixtures
from tests.support.billing import Billing, service, user
from tests.support.localstripe import API_KEY

billing = billing_fixtures.billing
start_billing = billing_fixtures.start_billing
localstripe = localstripe_fixtures.localstripe


async def test_stripe_customer_is_created_for_each_subscription(start_billing, localstripe) -> None:  # type: ignore[no-untyped-def]
    b: Billing = await start_billing(stripe_api_key=API_KEY, stripe_api_base=localstripe)
    owner = new_id()
    org = await b.create_org(owner)
    await b.app.cycle.sync_stripe_customers()
    sub = await b.stub.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=org), metadata=user(owner)
    )
    assert sub.stripe_customer_id.startswith("cus_")
    client = stripe.StripeClient(API_KEY, base_addresses={"api": localstripe})
    customer = client.v1.customers.retrieve(sub.stripe_customer_id)
    assert customer.metadata["hangar_organization_id"] == org
    assert sub.stripe_subscription_id == ""  # seeded plans carry no Stripe price


async def test_a_failed_send_leaves_the_invoice_unsent_for_the_next_pass(
    start_billing,  # type: ignore[no-untyped-def]
    localstripe,
) -> None:
    """localstripe cannot create a standalone invoice (see module docstring): the pass fails,
    and the invoice stays a draft, not sent, to be retried; nothing is marked sent."""
    b: Billing = await start_billing(stripe_api_key=API_KEY, stripe_api_base=localstripe)
    owner = new_id()
    org = await b.create_org(owner)
    await b.stub.RecordUsage(
        billing_pb2.RecordUsageRequest(
            records=[record(org, "u", HOBBY_RAM_INCLUDED + 10**10, b.clock.now())]
        ),
        metadata=service("runtime"),
    )
    b.clock.advance(days=32)
    while await b.app.cycle.close_one_period():
        pass
    await b.app.cycle.sync_stripe_customers()
    try:
        await b.app.cycle.send_one_invoice()
    except stripe.StripeError:
        pass
    (invoice,) = (
        await b.stub.ListInvoices(
            billing_pb2.ListInvoicesRequest(organization_id=org), metadata=user(owner)
        )
    ).invoices
    assert not invoice.sent and invoice.status == billing_pb2.INVOICE_STATUS_DRAFT
    assert invoice.total_cents == 2000
    assert invoice.period_end.ToDatetime() - invoice.period_start.ToDatetime() >= timedelta(days=28)
