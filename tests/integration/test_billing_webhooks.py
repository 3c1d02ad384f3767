"""Stripe webhooks through HandleStripeWebhook: signed with Stripe's real scheme
(t=<unix>,v1=HMAC-SHA256), verified by stripe.Webhook.construct_event.

localstripe signs the webhooks it sends only once one is registered and only for its own
objects, so these tests post recorded-shape Stripe payloads (the invoice and subscription
objects as Stripe's API reference documents them) and sign them here.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2

from hangar.billing.v1 import billing_pb2
from shared.ids import new_id
from tests.integration.test_billing_usage_and_cycle import HOBBY_RAM_INCLUDED, record
from tests.support import billing as billing_fixtures
from tests.support.billing import Billing, RecordingGateway, User, sign, stripe_event

identity = billing_fixtures.identity
billing = billing_fixtures.billing
start_billing = billing_fixtures.start_billing


def _request(payload: bytes, signature: str) -> billing_pb2.HandleStripeWebhookRequest:
    return billing_pb2.HandleStripeWebhookRequest(
        body=httpbody_pb2.HttpBody(content_type="application/json", data=payload),
        stripe_signature=signature,
    )


def _invoice_object(stripe_id: str, hangar_id: str, status: str) -> dict[str, Any]:
    """The fields of a Stripe Invoice object these events carry (API reference shape)."""
    return {
        "id": stripe_id,
        "object": "invoice",
        "status": status,
        "customer": "cus_test",
        "currency": "usd",
        "amount_due": 2000,
        "amount_paid": 2000 if status == "paid" else 0,
        "collection_method": "charge_automatically",
        "metadata": {"hangar_invoice_id": hangar_id},
        "status_transitions": {"finalized_at": int(time.time()), "paid_at": None},
    }


async def _invoice_in_draft(b: Billing) -> tuple[str, User, str]:
    """An organization with one unsent overage invoice: (org, owner, invoice id)."""
    owner = b.owner
    org = await b.create_org(owner)
    await b.stub.RecordUsage(
        billing_pb2.RecordUsageRequest(
            records=[record(org, "u", HOBBY_RAM_INCLUDED + 10**10, b.clock.now())]
        ),
        metadata=b.service("runtime"),
    )
    b.clock.advance(days=32)
    await b.app.cycle.run_once()
    invoices = await b.stub.ListInvoices(
        billing_pb2.ListInvoicesRequest(organization_id=org), metadata=owner.md
    )
    return org, owner, invoices.invoices[0].id


async def _status(b: Billing, invoice_id: str, owner: User) -> int:
    inv = await b.stub.GetInvoice(billing_pb2.GetInvoiceRequest(id=invoice_id), metadata=owner.md)
    return inv.status


async def _stored(b: Billing, event_id: str) -> int:
    async with b.app.db.session() as s:
        return int(
            await s.fetchval(
                "SELECT count(*) FROM billing.webhook_events WHERE provider_event_id = $1", event_id
            )
        )


async def _outbox_count(b: Billing, invoice_id: str) -> int:
    async with b.app.db.session() as s:
        return int(
            await s.fetchval(
                "SELECT count(*) FROM billing.outbox WHERE aggregate_id = $1"
                " AND payload ? 'previous_status'",
                invoice_id,
            )
        )


async def test_one_event_delivered_10_times_concurrently_is_stored_and_applied_once(
    billing: Billing,
) -> None:
    _, owner, invoice_id = await _invoice_in_draft(billing)
    payload = stripe_event("invoice.paid", _invoice_object(f"in_{new_id()}", invoice_id, "paid"))
    replies = await asyncio.gather(
        *(billing.stub.HandleStripeWebhook(_request(payload, sign(payload))) for _ in range(10))
    )
    assert sorted(r.duplicate for r in replies) == [False] + [True] * 9
    assert await _stored(billing, replies[0].event_id) == 1
    assert await _outbox_count(billing, invoice_id) == 1  # one effect
    assert await _status(billing, invoice_id, owner) == billing_pb2.INVOICE_STATUS_PAID


async def test_bad_signature_is_rejected_and_nothing_is_stored(billing: Billing) -> None:
    _, owner, invoice_id = await _invoice_in_draft(billing)
    payload = stripe_event("invoice.paid", _invoice_object(f"in_{new_id()}", invoice_id, "paid"))
    event_id = __import__("json").loads(payload)["id"]
    for signature in (sign(payload, secret="whsec_wrong"), sign(payload + b" "), "", "t=1,v1=00"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await billing.stub.HandleStripeWebhook(_request(payload, signature))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _stored(billing, event_id) == 0
    assert await _status(billing, invoice_id, owner) == billing_pb2.INVOICE_STATUS_DRAFT


async def test_a_ten_minute_old_signature_is_rejected(billing: Billing) -> None:
    _, owner, invoice_id = await _invoice_in_draft(billing)
    payload = stripe_event("invoice.paid", _invoice_object(f"in_{new_id()}", invoice_id, "paid"))
    old = sign(payload, timestamp=int(time.time() - timedelta(minutes=10).total_seconds()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing.stub.HandleStripeWebhook(_request(payload, old))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _stored(billing, __import__("json").loads(payload)["id"]) == 0
    assert await _status(billing, invoice_id, owner) == billing_pb2.INVOICE_STATUS_DRAFT


async def test_paid_arriving_before_finalized_ends_paid(billing: Billing) -> None:
    _, owner, invoice_id = await _invoice_in_draft(billing)
    stripe_id = f"in_{new_id()}"
    now = int(time.time())
    finalized = stripe_event(
        "invoice.finalized", _invoice_object(stripe_id, invoice_id, "open"), created=now - 5
    )
    paid = stripe_event("invoice.paid", _invoice_object(stripe_id, invoice_id, "paid"), created=now)
    for payload in (paid, finalized, paid):
        await billing.stub.HandleStripeWebhook(_request(payload, sign(payload)))
    assert await _status(billing, invoice_id, owner) == billing_pb2.INVOICE_STATUS_PAID
    inv = await billing.stub.GetInvoice(
        billing_pb2.GetInvoiceRequest(id=invoice_id), metadata=owner.md
    )
    assert inv.stripe_invoice_id == stripe_id


async def test_the_invoice_s_stripe_page_comes_with_its_webhook(billing: Billing) -> None:
    _, owner, invoice_id = await _invoice_in_draft(billing)
    stripe_id = f"in_{new_id()}"
    page = f"https://invoice.stripe.com/i/acct_test/{stripe_id}"
    forged = {
        **_invoice_object(stripe_id, invoice_id, "open"),
        "hosted_invoice_url": "javascript:x",
    }
    finalized = stripe_event("invoice.finalized", forged, created=int(time.time()) - 5)
    await billing.stub.HandleStripeWebhook(_request(finalized, sign(finalized)))
    get = billing_pb2.GetInvoiceRequest(id=invoice_id)
    assert (await billing.stub.GetInvoice(get, metadata=owner.md)).hosted_invoice_url == ""
    paid_object = {**_invoice_object(stripe_id, invoice_id, "paid"), "hosted_invoice_url": page}
    paid = stripe_event("invoice.paid", paid_object)
    await billing.stub.HandleStripeWebhook(_request(paid, sign(paid)))
    inv = await billing.stub.GetInvoice(get, metadata=owner.md)
    assert inv.hosted_invoice_url == page and inv.status == billing_pb2.INVOICE_STATUS_PAID


async def test_older_subscription_event_does_not_move_status_back(start_billing) -> None:  # type: ignore[no-untyped-def]
    b: Billing = await start_billing(gateway=RecordingGateway())
    owner = b.owner
    org = await b.create_org(owner)
    async with b.app.db.session() as s:
        sub_id = await s.fetchval(
            "SELECT id FROM billing.subscriptions WHERE organization_id = $1", org
        )
    now = int(time.time())

    def sub_event(status: str, created: int, kind: str = "customer.subscription.updated") -> bytes:
        obj = {
            "id": f"sub_{sub_id}",
            "object": "subscription",
            "status": status,
            "customer": f"cus_{sub_id}",
            "metadata": {"hangar_subscription_id": sub_id},
        }
        return stripe_event(kind, obj, created=created)

    for payload in (sub_event("past_due", now), sub_event("active", now - 60)):
        await b.stub.HandleStripeWebhook(_request(payload, sign(payload)))
    got = await b.stub.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=org), metadata=owner.md
    )
    assert got.status == billing_pb2.SUBSCRIPTION_STATUS_PAST_DUE
    deleted = sub_event("canceled", now + 1, kind="customer.subscription.deleted")
    revived = sub_event("active", now + 2)
    for payload in (deleted, revived):
        await b.stub.HandleStripeWebhook(_request(payload, sign(payload)))
    got = await b.stub.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=org), metadata=owner.md
    )
    assert got.status == billing_pb2.SUBSCRIPTION_STATUS_CANCELED
