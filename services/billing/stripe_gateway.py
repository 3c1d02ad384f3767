"""Stripe through the official SDK (`StripeClient` and its `.v1.*` services, async calls).

Every create carries a deterministic idempotency key, so a retry after a crash or a second
billing replica never makes a second customer, invoice or invoice item.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import stripe

from services.billing.domain import (
    InvoiceLine,
    InvoiceStatus,
    customer_key,
    invoice_item_key,
    invoice_key,
    stripe_subscription_key,
)
from shared.settings import Settings


@dataclass(frozen=True)
class InvoiceToSend:
    id: str
    organization_id: str
    subscription_id: str
    customer_id: str
    period_start: datetime
    period_end: datetime
    currency: str
    lines: list[InvoiceLine]


@dataclass(frozen=True)
class SentInvoice:
    stripe_invoice_id: str
    status: InvoiceStatus


class StripeGateway(Protocol):
    async def create_customer(self, organization_id: str, subscription_id: str) -> str: ...

    async def create_subscription(
        self, customer_id: str, subscription_id: str, plan_id: str, price_id: str
    ) -> str: ...

    async def send_invoice(self, invoice: InvoiceToSend) -> SentInvoice: ...


class SdkStripeGateway:
    def __init__(self, api_key: str, api_base: str = "") -> None:
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=2,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> SdkStripeGateway | None:
        if not settings.stripe_api_key:
            return None
        return cls(settings.stripe_api_key, settings.stripe_api_base)

    async def create_customer(self, organization_id: str, subscription_id: str) -> str:
        customer = await self.client.v1.customers.create_async(
            params={
                "description": f"Hangar organization {organization_id}",
                "metadata": {
                    "hangar_organization_id": organization_id,
                    "hangar_subscription_id": subscription_id,
                },
            },
            options={"idempotency_key": customer_key(subscription_id)},
        )
        return customer.id

    async def create_subscription(
        self, customer_id: str, subscription_id: str, plan_id: str, price_id: str
    ) -> str:
        created = await self.client.v1.subscriptions.create_async(
            params={
                "customer": customer_id,
                "items": [{"price": price_id}],
                "metadata": {"hangar_subscription_id": subscription_id, "hangar_plan": plan_id},
            },
            options={"idempotency_key": stripe_subscription_key(subscription_id, plan_id)},
        )
        return created.id

    async def send_invoice(self, invoice: InvoiceToSend) -> SentInvoice:
        """Draft invoice, one item per charged line attached to it, then finalize."""
        metadata = {
            "hangar_invoice_id": invoice.id,
            "hangar_subscription_id": invoice.subscription_id,
            "hangar_organization_id": invoice.organization_id,
        }
        draft = await self.client.v1.invoices.create_async(
            params={
                "customer": invoice.customer_id,
                "currency": invoice.currency,
                "collection_method": "charge_automatically",
                "auto_advance": False,
                "pending_invoice_items_behavior": "exclude",
                "metadata": metadata,
            },
            options={"idempotency_key": invoice_key(invoice.subscription_id, invoice.period_start)},
        )
        assert draft.id is not None
        for line in invoice.lines:
            if line.amount_cents <= 0:
                continue
            await self.client.v1.invoice_items.create_async(
                params={
                    "customer": invoice.customer_id,
                    "invoice": draft.id,
                    "amount": line.amount_cents,
                    "currency": invoice.currency,
                    "description": line.description,
                    "metadata": {**metadata, "metric": line.metric.value},
                },
                options={
                    "idempotency_key": invoice_item_key(
                        invoice.subscription_id, invoice.period_start, line
                    )
                },
            )
        final = await self.client.v1.invoices.finalize_invoice_async(
            draft.id, params={"auto_advance": True}
        )
        try:
            status = InvoiceStatus(final.status or "open")
        except ValueError:
            status = InvoiceStatus.OPEN
        return SentInvoice(stripe_invoice_id=draft.id, status=status)
