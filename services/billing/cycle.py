"""The billing cycle: close ended periods into invoices, send them to Stripe, keep Stripe
customers and subscriptions in step. Safe with any number of replicas: a due period is
claimed with FOR UPDATE SKIP LOCKED (the (subscription_id, period_start) unique key stands
behind that); an invoice to send is claimed by booking its next attempt in a short
transaction, and Stripe is called after it commits, with no lock held; a subscription's
Stripe sync runs under a per-subscription advisory lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from services.billing import store
from services.billing.domain import (
    METRICS,
    Clock,
    InvoiceDraft,
    InvoiceStatus,
    Plan,
    adjustment_line,
    next_period_end,
    period_line,
)
from services.billing.stripe_gateway import InvoiceToSend, PriceRef, SendFailed, StripeGateway
from shared.audit import record_audit
from shared.db import Database, Session
from shared.loops import run_every
from shared.outbox import write_event

log = logging.getLogger(__name__)

DUE_AFTER = timedelta(days=30)


class BillingCycle:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        gateway: StripeGateway | None = None,
        *,
        interval_seconds: float = 60.0,
        stripe_prices: Mapping[str, str] | None = None,
        retry_base_seconds: float = 60.0,
        retry_max_seconds: float = 6 * 3600.0,
    ) -> None:
        self.db = db
        self.clock = clock
        self.gateway = gateway
        self.interval_seconds = interval_seconds
        self.stripe_prices = dict(stripe_prices or {})
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self._prices: dict[str, PriceRef] | None = None

    async def run(self) -> None:
        """The background loop: one pass per interval, errors logged and retried."""
        await run_every(self.interval_seconds, self.run_once, "billing cycle pass")

    async def run_once(self) -> int:
        """Close every due period; then send and sync with Stripe. Returns invoices made."""
        made = 0
        while await self.close_one_period():
            made += 1
        if self.gateway is not None:
            await self.sync_stripe()
            await self.send_due_invoices()
        return made

    async def close_one_period(self) -> bool:
        now = self.clock.now()
        async with self.db.transaction() as tx:
            sub = await store.claim_due_subscription(tx, now)
            if sub is None:
                return False
            plan = await store.get_plan(tx, sub.plan_id)
            invoice_id = await store.insert_invoice(tx, sub, plan.currency)
            if invoice_id is not None:
                await self._fill_invoice(tx, sub, plan, invoice_id, now)
            next_end = next_period_end(sub.created_at, sub.current_period_end)
            await store.advance_period(tx, sub.id, sub.current_period_end, next_end)
        return True

    async def _fill_invoice(
        self, tx: Session, sub: store.Subscription, plan: Plan, invoice_id: str, now: datetime
    ) -> None:
        billed = await store.bill_unbilled_usage(tx, sub, invoice_id)
        current = dict.fromkeys(METRICS, 0)
        draft = InvoiceDraft()
        late: list[store.BilledUsage] = []
        for usage in billed:
            if usage.period_start is None:
                current[usage.metric] += usage.quantity
            else:
                late.append(usage)
        draft.lines += [
            period_line(plan, metric, current[metric], sub.current_period_start)
            for metric in METRICS
        ]
        for usage in sorted(late, key=lambda u: (u.period_start, u.metric)):
            assert usage.period_start is not None
            earlier = await store.earlier_invoice(tx, sub.id, usage.period_start)
            terms = next(
                (x for x in earlier.lines if x.metric is usage.metric and not x.adjustment), None
            )
            included = terms.included if terms else plan.included[usage.metric]
            unit = terms.unit_cents if terms else plan.unit_cents[usage.metric]
            before = await store.billed_quantity(tx, earlier, usage.metric, invoice_id)
            draft.lines.append(
                adjustment_line(
                    usage.metric,
                    late=usage.quantity,
                    billed_before=before,
                    included=included,
                    unit_cents=unit,
                    period_start=usage.period_start,
                )
            )
        # Nothing owed is settled at once; anything else waits for Stripe (or stays unsent).
        status = InvoiceStatus.PAID if draft.total_cents == 0 else InvoiceStatus.DRAFT
        invoice = await store.finish_invoice(
            tx, invoice_id, draft.lines, draft.total_cents, status, now + DUE_AFTER
        )
        await write_event(
            tx,
            "billing",
            "invoice.updated",
            organization_id=sub.organization_id,
            aggregate_id=invoice.id,
            payload={
                "status": invoice.status.value,
                "total_cents": invoice.total_cents,
                "period_start": invoice.period_start.isoformat(),
            },
        )
        await record_audit(
            tx,
            "billing",
            organization_id=sub.organization_id,
            action="billing.invoice_created",
            target_type="invoice",
            target_id=invoice.id,
            metadata={"total_cents": invoice.total_cents, "status": invoice.status.value},
            actor_id="service:billing",
        )

    # ------------------------------------------------------------------ Stripe sync

    async def ensure_catalog(self) -> dict[str, PriceRef]:
        """Each plan's Stripe price: from settings, else found or created in Stripe (once
        per process); recorded on the plan row so ListPlans shows it."""
        assert self.gateway is not None
        if self._prices is not None:
            return self._prices
        async with self.db.session() as s:
            plans = await store.all_plans(s)
        prices: dict[str, PriceRef] = {}
        for plan in plans:
            configured = self.stripe_prices.get(plan.id)
            if configured:
                prices[plan.id] = PriceRef(configured)
            else:
                prices[plan.id] = await self.gateway.ensure_plan(plan)
        async with self.db.transaction() as tx:
            for plan_id, price in prices.items():
                await store.set_plan_stripe_price(tx, plan_id, price.id)
        self._prices = prices
        return prices

    async def sync_stripe(self) -> int:
        """Bring every subscription's Stripe side in step (customer, subscription on the
        current plan, canceled when ours ended). One that fails is logged and retried on the
        next pass; it does not hold up the rest. Returns how many were synced."""
        assert self.gateway is not None
        await self.ensure_catalog()
        synced, after = 0, ""
        while True:
            async with self.db.session() as s:
                batch = await store.subscriptions_out_of_step(s, after)
            if not batch:
                return synced
            for sub in batch:
                try:
                    synced += await self.sync_subscription(sub.id)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.warning("Stripe sync of subscription %s failed", sub.id, exc_info=True)
            after = batch[-1].id

    async def sync_subscription(self, subscription_id: str) -> bool:
        """Sync one subscription with Stripe. A session-level advisory lock (not a row lock:
        ReserveAllocation keeps writing the row) makes replicas take turns; the one that
        finds it taken skips. Returns False when skipped or there was nothing to do."""
        if self.gateway is None:
            return False
        key = f"billing.stripe-sync:{subscription_id}"
        async with self.db.advisory_lock(key) as held:
            if held is None:
                return False
            return await self._sync_locked(subscription_id)

    async def _sync_locked(self, subscription_id: str) -> bool:
        assert self.gateway is not None
        prices = await self.ensure_catalog()
        async with self.db.session() as s:
            sub = await store.get_subscription_by_id(s, subscription_id)
        if sub.status.is_dead:
            if not sub.stripe_subscription_id or sub.stripe_canceled_at is not None:
                return False
            await self.gateway.cancel_subscription(sub.stripe_subscription_id, sub.id)
            async with self.db.transaction() as tx:
                await store.set_stripe_canceled(tx, sub.id, self.clock.now())
                await self._audit(tx, sub, "billing.stripe_subscription_canceled", {})
            return True
        customer_id = sub.stripe_customer_id
        changed = False
        if not customer_id:
            customer_id = await self.gateway.create_customer(sub.organization_id, sub.id)
            async with self.db.transaction() as tx:
                await store.set_stripe_customer(tx, sub.id, customer_id)
            changed = True
        price = prices.get(sub.plan_id)
        if price is None:
            return changed
        if not sub.stripe_subscription_id:
            stripe_id = await self.gateway.create_subscription(
                customer_id, sub.id, sub.plan_id, price
            )
            async with self.db.transaction() as tx:
                await store.set_stripe_subscription(tx, sub.id, stripe_id, sub.plan_version)
                await self._audit(
                    tx,
                    sub,
                    "billing.stripe_subscription_created",
                    {"stripe_subscription_id": stripe_id, "plan_id": sub.plan_id},
                )
            return True
        if sub.stripe_plan_version != sub.plan_version:
            await self.gateway.update_subscription_plan(
                sub.stripe_subscription_id, sub.id, sub.plan_id, price, sub.plan_version
            )
            async with self.db.transaction() as tx:
                await store.set_stripe_plan_version(tx, sub.id, sub.plan_version)
                await self._audit(
                    tx,
                    sub,
                    "billing.stripe_subscription_updated",
                    {"plan_id": sub.plan_id, "price": price.id},
                )
            return True
        return changed

    async def _audit(
        self, tx: Session, sub: store.Subscription, action: str, metadata: dict[str, Any]
    ) -> None:
        await record_audit(
            tx,
            "billing",
            organization_id=sub.organization_id,
            action=action,
            target_type="subscription",
            target_id=sub.id,
            metadata=metadata,
            actor_id="service:billing",
        )

    # --------------------------------------------------------------- invoice sending

    async def send_due_invoices(self) -> int:
        """Send every invoice that is due now; each at most once per pass."""
        seen: set[str] = set()
        while (invoice_id := await self.send_one_invoice()) and invoice_id not in seen:
            seen.add(invoice_id)
        return len(seen)

    async def send_one_invoice(self) -> str:
        """Claim one due invoice, send it with no lock held, record what happened.

        The claim (a short transaction) counts the attempt and books the next one, so a
        second replica skips this invoice while Stripe is called, and one whose send keeps
        failing backs off (base x 2^(attempts-1)) while the others go through. Returns the
        invoice id, or "" when none is due."""
        assert self.gateway is not None
        async with self.db.transaction() as tx:
            invoice = await store.claim_invoice_to_send(
                tx, self.clock.now(), self.retry_base_seconds, self.retry_max_seconds
            )
        if invoice is None:
            return ""
        try:
            async with self.db.session() as s:
                sub = await store.get_subscription_by_id(s, invoice.subscription_id)
            customer_id = sub.stripe_customer_id
            if not customer_id:
                customer_id = await self.gateway.create_customer(sub.organization_id, sub.id)
                async with self.db.transaction() as tx:
                    await store.set_stripe_customer(tx, sub.id, customer_id)
            sent = await self.gateway.send_invoice(
                InvoiceToSend(
                    id=invoice.id,
                    organization_id=invoice.organization_id,
                    subscription_id=invoice.subscription_id,
                    customer_id=customer_id,
                    period_start=invoice.period_start,
                    period_end=invoice.period_end,
                    currency=invoice.currency,
                    lines=invoice.lines,
                    stripe_invoice_id=invoice.stripe_invoice_id,
                )
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            draft = exc.stripe_invoice_id if isinstance(exc, SendFailed) else ""
            error = f"{type(exc).__name__}: {exc}"
            async with self.db.transaction() as tx:
                await store.record_send_failure(tx, invoice.id, error, draft)
            log.warning(
                "sending invoice %s failed (attempt %d, next at %s): %s",
                invoice.id,
                invoice.send_attempts,
                invoice.next_attempt_at,
                error,
            )
            return invoice.id
        async with self.db.transaction() as tx:
            updated = await store.mark_invoice_sent(
                tx, invoice.id, sent.stripe_invoice_id, sent.status, sent.hosted_invoice_url
            )
            if updated is None:
                return invoice.id
            await write_event(
                tx,
                "billing",
                "invoice.updated",
                organization_id=updated.organization_id,
                aggregate_id=updated.id,
                payload={"status": updated.status.value, "sent": True},
            )
            await record_audit(
                tx,
                "billing",
                organization_id=updated.organization_id,
                action="billing.invoice_sent",
                target_type="invoice",
                target_id=updated.id,
                metadata={
                    "stripe_invoice_id": updated.stripe_invoice_id,
                    "attempts": updated.send_attempts,
                },
                actor_id="service:billing",
            )
        return invoice.id
