"""Stripe through the official SDK (`StripeClient` and its `.v1.*` services, async calls).

Every write carries a deterministic idempotency key, so a retry after a crash or a second
billing replica never makes a second customer, subscription, invoice or invoice item (within
Stripe's 24 h key window; past it, a retried send reuses the draft it recorded instead).

The catalog. A Hangar plan is sold in Stripe under one recurring monthly price. A
deployment either names it (settings: HANGAR_STRIPE_PRICES = {"pro": "price_..."}, a Price
made in the Dashboard) or lets billing create it at start: a Product `hangar-<plan>` and a
Plan `hangar-<plan>-<currency>-<cents>-month`, both with caller-chosen ids, so creating them
is idempotent across restarts and replicas (a changed price makes a new id, never an edit).
These are made with the Plans API, which Stripe keeps serving and treats as Prices, and
which localstripe implements (it has no Prices API); subscription items then name them with
`plan`, and configured Prices with `price`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import stripe

from services.billing.domain import (
    InvoiceLine,
    InvoiceStatus,
    Plan,
    customer_key,
    invoice_item_key,
    invoice_key,
    stripe_plan_id,
    stripe_product_id,
    stripe_subscription_cancel_key,
    stripe_subscription_key,
    stripe_subscription_update_key,
)
from shared.settings import Settings


@dataclass(frozen=True)
class PriceRef:
    """What a subscription item is put on: a Price id, or (legacy_plan) a Stripe Plan id."""

    id: str
    legacy_plan: bool = False

    def item(self) -> dict[str, str]:
        return {"plan": self.id} if self.legacy_plan else {"price": self.id}


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
    stripe_invoice_id: str = ""  # the draft an earlier attempt made, if any


@dataclass(frozen=True)
class SentInvoice:
    stripe_invoice_id: str
    status: InvoiceStatus
    hosted_invoice_url: str = ""


class SendFailed(Exception):
    """A send that failed after Stripe made the draft: the draft id is kept for the retry."""

    def __init__(self, message: str, stripe_invoice_id: str) -> None:
        super().__init__(message)
        self.stripe_invoice_id = stripe_invoice_id


class StripeGateway(Protocol):
    async def ensure_plan(self, plan: Plan) -> PriceRef: ...

    async def create_customer(self, organization_id: str, subscription_id: str) -> str: ...

    async def create_subscription(
        self, customer_id: str, subscription_id: str, plan_id: str, price: PriceRef
    ) -> str: ...

    async def update_subscription_plan(
        self,
        stripe_subscription_id: str,
        subscription_id: str,
        plan_id: str,
        price: PriceRef,
        plan_version: int,
    ) -> None: ...

    async def cancel_subscription(
        self, stripe_subscription_id: str, subscription_id: str
    ) -> None: ...

    async def send_invoice(self, invoice: InvoiceToSend) -> SentInvoice: ...


def _is_missing(exc: stripe.StripeError) -> bool:
    return exc.http_status == 404


def _already_exists(exc: stripe.StripeError) -> bool:
    """Stripe: 400 resource_already_exists; localstripe: 409 Conflict."""
    return exc.http_status == 409 or (
        exc.http_status == 400 and exc.code == "resource_already_exists"
    )


class SdkStripeGateway:
    def __init__(
        self, api_key: str, api_base: str = "", http_client: stripe.HTTPClient | None = None
    ) -> None:
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=2,
            http_client=http_client,
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

    async def ensure_plan(self, plan: Plan) -> PriceRef:
        """The Stripe Plan for this Hangar plan's terms: found, or created with its Product."""
        plan_id = stripe_plan_id(plan)
        try:
            await self.client.v1.plans.retrieve_async(plan_id)
            return PriceRef(plan_id, legacy_plan=True)
        except stripe.InvalidRequestError as exc:
            if not _is_missing(exc):
                raise
        product_id = stripe_product_id(plan.id)
        try:
            await self.client.v1.products.retrieve_async(product_id)
        except stripe.InvalidRequestError as exc:
            if not _is_missing(exc):
                raise
            try:
                await self.client.v1.products.create_async(
                    params={
                        "id": product_id,
                        "name": f"Hangar {plan.name}",
                        "metadata": {"hangar_plan_id": plan.id},
                    },
                    options={"idempotency_key": f"hangar-prod-{plan.id}"},
                )
            except stripe.StripeError as again:
                if not _already_exists(again):  # another replica made it first
                    raise
        try:
            await self.client.v1.plans.create_async(
                params={
                    "id": plan_id,
                    "product": product_id,
                    "amount": plan.price_cents,
                    "currency": plan.currency,
                    "interval": "month",
                    "nickname": plan.name,
                    "metadata": {"hangar_plan_id": plan.id},
                },
                options={"idempotency_key": f"hangar-plan-{plan_id}"},
            )
        except stripe.StripeError as exc:
            if not _already_exists(exc):
                raise
        return PriceRef(plan_id, legacy_plan=True)

    async def create_subscription(
        self, customer_id: str, subscription_id: str, plan_id: str, price: PriceRef
    ) -> str:
        item: Any = price.item()
        created = await self.client.v1.subscriptions.create_async(
            params={
                "customer": customer_id,
                "items": [item],
                "metadata": {"hangar_subscription_id": subscription_id, "hangar_plan": plan_id},
            },
            options={"idempotency_key": stripe_subscription_key(subscription_id, plan_id)},
        )
        return created.id

    async def update_subscription_plan(
        self,
        stripe_subscription_id: str,
        subscription_id: str,
        plan_id: str,
        price: PriceRef,
        plan_version: int,
    ) -> None:
        """Put the subscription's one item on the plan's price (Stripe prorates by default).
        The item's id is read first: an item without an id would be added, not replaced."""
        current = await self.client.v1.subscriptions.retrieve_async(stripe_subscription_id)
        items = current["items"]["data"]
        item: Any = {**price.item()}
        if items:
            item["id"] = items[0]["id"]
        await self.client.v1.subscriptions.update_async(
            stripe_subscription_id,
            params={"items": [item], "metadata": {"hangar_plan": plan_id}},
            options={
                "idempotency_key": stripe_subscription_update_key(
                    subscription_id, plan_version, plan_id
                )
            },
        )

    async def cancel_subscription(self, stripe_subscription_id: str, subscription_id: str) -> None:
        """Cancel now; one that is gone or already canceled counts as done."""
        try:
            await self.client.v1.subscriptions.cancel_async(
                stripe_subscription_id,
                options={"idempotency_key": stripe_subscription_cancel_key(subscription_id)},
            )
        except stripe.InvalidRequestError as exc:
            if _is_missing(exc):
                return
            current = await self.client.v1.subscriptions.retrieve_async(stripe_subscription_id)
            if current.status not in ("canceled", "incomplete_expired"):
                raise

    async def send_invoice(self, invoice: InvoiceToSend) -> SentInvoice:
        """Draft invoice, one item per charged line attached to it, then finalize.

        A retry resumes: the draft an earlier attempt recorded is reused (re-read; if it is
        no longer a draft it was finalized, and that is the answer), and items already on it
        (by their `hangar_line_key`) are not added again, so nothing depends on idempotency
        keys outliving Stripe's 24 h window."""
        metadata = {
            "hangar_invoice_id": invoice.id,
            "hangar_subscription_id": invoice.subscription_id,
            "hangar_organization_id": invoice.organization_id,
        }
        attached: set[str] = set()
        draft_id = invoice.stripe_invoice_id
        if draft_id:
            existing = await self.client.v1.invoices.retrieve_async(draft_id)
            if existing.status and existing.status != "draft":
                return SentInvoice(draft_id, _invoice_status(existing.status))
            items = await self.client.v1.invoice_items.list_async(
                params={"invoice": draft_id, "limit": 100}
            )
            attached = {_line_key(item) for item in items.data}
        else:
            draft = await self.client.v1.invoices.create_async(
                params={
                    "customer": invoice.customer_id,
                    "currency": invoice.currency,
                    "collection_method": "charge_automatically",
                    "auto_advance": False,
                    "pending_invoice_items_behavior": "exclude",
                    "metadata": metadata,
                },
                options={
                    "idempotency_key": invoice_key(invoice.subscription_id, invoice.period_start)
                },
            )
            assert draft.id is not None
            draft_id = draft.id
        try:
            for line in invoice.lines:
                if line.amount_cents <= 0:
                    continue
                key = invoice_item_key(invoice.subscription_id, invoice.period_start, line)
                if key in attached:
                    continue
                await self.client.v1.invoice_items.create_async(
                    params={
                        "customer": invoice.customer_id,
                        "invoice": draft_id,
                        "amount": line.amount_cents,
                        "currency": invoice.currency,
                        "description": line.description,
                        "metadata": {
                            **metadata,
                            "metric": line.metric.value,
                            "hangar_line_key": key,
                        },
                    },
                    options={"idempotency_key": key},
                )
            final = await self.client.v1.invoices.finalize_invoice_async(
                draft_id,
                params={"auto_advance": True},
                options={"idempotency_key": f"hangar-fin-{draft_id}"},
            )
        except stripe.StripeError as exc:
            raise SendFailed(str(exc), draft_id) from exc
        return SentInvoice(
            stripe_invoice_id=draft_id,
            status=_invoice_status(final.status),
            hosted_invoice_url=hosted_url(final),
        )


def hosted_url(invoice: Any) -> str:
    """Stripe's hosted_invoice_url of an invoice (a StripeObject or a webhook's dict), when
    it is an http(s) URL; "" otherwise."""
    value = invoice["hosted_invoice_url"] if "hosted_invoice_url" in invoice else None
    text = str(value or "")
    return text if text.startswith(("https://", "http://")) and len(text) <= 2048 else ""


def _line_key(item: Any) -> str:
    """The hangar_line_key of an invoice item (StripeObjects are not dicts: no .get)."""
    metadata = item["metadata"] if "metadata" in item else None
    if not metadata or "hangar_line_key" not in metadata:
        return ""
    return str(metadata["hangar_line_key"])


def _invoice_status(value: str | None) -> InvoiceStatus:
    try:
        return InvoiceStatus(value or "open")
    except ValueError:
        return InvoiceStatus.OPEN
