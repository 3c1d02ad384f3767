"""Stripe webhooks: verify, record once, apply, in one transaction.

Stripe delivers at least once and in no particular order. The event row (unique provider
event id) and its effect commit together, so a duplicate changes nothing; and effects only
move state forward (invoice status ranks; subscription status only from a newer event), so
an older event arriving last changes nothing either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import stripe

from services.billing import store
from services.billing.domain import (
    SubscriptionStatus,
    invoice_moves_forward,
    invoice_status_for_event,
    subscription_status_from_stripe,
)
from services.billing.stripe_gateway import hosted_url
from shared.audit import record_audit
from shared.db import Database, Session
from shared.errors import FailedPrecondition, InvalidArgument
from shared.outbox import write_event

TOLERANCE_SECONDS = 300


@dataclass(frozen=True)
class WebhookResult:
    event_id: str
    duplicate: bool


def verify(payload: bytes, signature: str, secret: str) -> dict[str, Any]:
    """The event, if the Stripe-Signature header proves Stripe sent these exact bytes.

    A signature that is missing, malformed, made with another secret, over other bytes or
    older than TOLERANCE_SECONDS is INVALID_ARGUMENT (the gateway answers HTTP 400, as
    Stripe's docs ask of an endpoint for a bad signature; not 401: the signature belongs to
    the body, it is not a credential of the caller's), and nothing is stored. Without a
    configured secret: FAILED_PRECONDITION (also 400); Stripe retries either for days."""
    if not secret:
        raise FailedPrecondition(
            "Stripe webhooks are not configured", reason="WEBHOOK_SECRET_MISSING"
        )
    if not signature:
        raise InvalidArgument.field("stripe_signature", "required")
    try:
        stripe.Webhook.construct_event(payload, signature, secret, tolerance=TOLERANCE_SECONDS)
    except stripe.SignatureVerificationError:
        raise InvalidArgument.field(
            "stripe_signature", "does not verify (wrong secret, altered body or too old)"
        ) from None
    except ValueError:
        raise InvalidArgument.field("body", "not a JSON Stripe event") from None
    event = json.loads(payload)
    if not isinstance(event, dict) or not event.get("id") or not event.get("type"):
        raise InvalidArgument.field("body", "not a Stripe event")
    return event


async def handle(db: Database, payload: bytes, signature: str, secret: str) -> WebhookResult:
    event = verify(payload, signature, secret)
    created = datetime.fromtimestamp(int(event.get("created") or 0), UTC)
    async with db.transaction() as tx:
        first = await store.record_webhook_event(tx, event["id"], event["type"], event, created)
        if not first:
            return WebhookResult(event["id"], duplicate=True)
        note = await _apply(tx, event, created)
        await store.finish_webhook_event(tx, event["id"], note)
    return WebhookResult(event["id"], duplicate=False)


async def _apply(tx: Session, event: dict[str, Any], created: datetime) -> str:
    kind = str(event["type"])
    obj = (event.get("data") or {}).get("object") or {}
    if kind.startswith("invoice."):
        return await _apply_invoice(tx, kind, obj, created)
    if kind in ("customer.subscription.updated", "customer.subscription.deleted"):
        return await _apply_subscription(tx, kind, obj, created)
    return "ignored: event type not handled"


async def _apply_invoice(tx: Session, kind: str, obj: dict[str, Any], created: datetime) -> str:
    target = invoice_status_for_event(kind, str(obj.get("status") or ""))
    if target is None:
        return "ignored: no invoice status in event"
    hangar_id = str((obj.get("metadata") or {}).get("hangar_invoice_id") or "")
    invoice = await store.lock_invoice_for_stripe(tx, str(obj.get("id") or ""), hangar_id)
    if invoice is None:
        return "ignored: unknown invoice"
    if not invoice_moves_forward(invoice.status, target):
        return f"ignored: {invoice.status.value} is not before {target.value}"
    await store.apply_invoice_status(
        tx, invoice.id, target, str(obj.get("id") or ""), created, hosted_url(obj)
    )
    await write_event(
        tx,
        "billing",
        "invoice.updated",
        organization_id=invoice.organization_id,
        aggregate_id=invoice.id,
        payload={"status": target.value, "previous_status": invoice.status.value},
    )
    await record_audit(
        tx,
        "billing",
        organization_id=invoice.organization_id,
        action="billing.invoice_status_changed",
        target_type="invoice",
        target_id=invoice.id,
        metadata={"from": invoice.status.value, "to": target.value, "stripe_event": kind},
        actor_id="stripe",
    )
    return ""


async def _apply_subscription(
    tx: Session, kind: str, obj: dict[str, Any], created: datetime
) -> str:
    hangar_id = str((obj.get("metadata") or {}).get("hangar_subscription_id") or "")
    sub = await store.lock_subscription_by_stripe(tx, str(obj.get("id") or ""), hangar_id)
    if sub is None:
        return "ignored: unknown subscription"
    if kind == "customer.subscription.deleted":
        status: SubscriptionStatus | None = SubscriptionStatus.CANCELED
    else:
        status = subscription_status_from_stripe(str(obj.get("status") or ""))
    if status is None:
        return "ignored: unknown status"
    if sub.status.is_dead:
        return "ignored: subscription already ended"
    if sub.stripe_synced_at is not None and created < sub.stripe_synced_at:
        return "ignored: older than the last applied event"
    await store.apply_stripe_subscription_status(
        tx, sub.id, status, created, free_pool=status.is_dead
    )
    await record_audit(
        tx,
        "billing",
        organization_id=sub.organization_id,
        action="billing.subscription_status_changed",
        target_type="subscription",
        target_id=sub.id,
        metadata={"from": sub.status.value, "to": status.value, "stripe_event": kind},
        actor_id="stripe",
    )
    return ""
