"""The billing cycle: close ended periods into invoices, send them to Stripe, keep Stripe
customers and subscriptions in step. Safe with any number of replicas: each subscription and
each invoice is claimed with FOR UPDATE SKIP LOCKED, and the (subscription_id, period_start)
unique key stands behind that.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from services.billing import store
from services.billing.domain import (
    METRICS,
    Clock,
    InvoiceDraft,
    InvoiceStatus,
    adjustment_line,
    next_period_end,
    period_line,
)
from services.billing.stripe_gateway import InvoiceToSend, StripeGateway
from shared.audit import record_audit
from shared.db import Database, Session
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
    ) -> None:
        self.db = db
        self.clock = clock
        self.gateway = gateway
        self.interval_seconds = interval_seconds

    async def run(self) -> None:
        """The background loop: one pass per interval, errors logged and retried."""
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("billing cycle pass failed")
            await asyncio.sleep(self.interval_seconds)

    async def run_once(self) -> int:
        """Close every due period; then send and sync with Stripe. Returns invoices made."""
        made = 0
        while await self.close_one_period():
            made += 1
        if self.gateway is not None:
            await self.sync_stripe_customers()
            while await self.send_one_invoice():
                pass
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
        self, tx: Session, sub: store.Subscription, plan: store.Plan, invoice_id: str, now: datetime
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

    async def sync_stripe_customers(self) -> None:
        """Create the Stripe customer (and subscription, when the plan has a Stripe price)."""
        assert self.gateway is not None
        async with self.db.session() as s:
            pending = await store.subscriptions_missing_stripe(s)
        for sub in pending:
            customer_id = sub.stripe_customer_id
            if not customer_id:
                customer_id = await self.gateway.create_customer(sub.organization_id, sub.id)
                async with self.db.transaction() as tx:
                    await store.set_stripe_customer(tx, sub.id, customer_id)
            async with self.db.session() as s:
                plan = await store.get_plan(s, sub.plan_id)
            if not sub.stripe_subscription_id and plan.stripe_price_id:
                stripe_id = await self.gateway.create_subscription(
                    customer_id, sub.id, plan.id, plan.stripe_price_id
                )
                async with self.db.transaction() as tx:
                    await store.set_stripe_subscription(tx, sub.id, stripe_id)

    async def send_one_invoice(self) -> bool:
        """Send one unsent invoice; the row stays locked while Stripe is called."""
        assert self.gateway is not None
        async with self.db.transaction() as tx:
            invoice = await store.claim_unsent_invoice(tx)
            if invoice is None:
                return False
            sub = await store.get_subscription_by_id(tx, invoice.subscription_id)
            customer_id = sub.stripe_customer_id
            if not customer_id:
                customer_id = await self.gateway.create_customer(sub.organization_id, sub.id)
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
                )
            )
            updated = await store.mark_invoice_sent(
                tx, invoice.id, sent.stripe_invoice_id, sent.status
            )
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
                metadata={"stripe_invoice_id": updated.stripe_invoice_id},
                actor_id="service:billing",
            )
        return True
