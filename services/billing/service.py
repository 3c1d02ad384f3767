"""Billing's use cases: authorize, apply the rules, read or change the store, and write each
change with its outbox event and audit entry in one transaction."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from services.billing import store, webhooks
from services.billing.cycle import BillingCycle
from services.billing.domain import (
    METRICS,
    Clock,
    Metric,
    Plan,
    downgrade_blocked,
    overage,
    overage_cents,
    period_containing,
    validate_allocation,
)
from services.billing.provisioning import Subscriptions
from shared import pagination
from shared.audit import record_audit
from shared.auth import Authorizer, require_caller, require_service
from shared.db import Database, Session
from shared.errors import InvalidArgument, NotFound, PermissionDenied
from shared.ids import new_id
from shared.outbox import write_event
from shared.pagination import Page
from shared.resources import Resources
from shared.validation import require_id

SCHEMA = "billing"
MAX_PAGE_SIZE = 500
MAX_USAGE_BATCH = 10_000

READ = "billing.read"
MANAGE = "billing.manage"

log = logging.getLogger(__name__)


class UsageIn(Protocol):
    """One usage record as a caller sent it; `metric` and `recorded_at` are None if unset.
    Read in order, each field only once the ones before it passed (the first fault is named)."""

    @property
    def metric(self) -> str | None: ...
    @property
    def organization_id(self) -> str: ...
    @property
    def project_id(self) -> str: ...
    @property
    def quantity(self) -> int: ...
    @property
    def recorded_at(self) -> datetime | None: ...
    @property
    def idempotency_key(self) -> str: ...


@dataclass(frozen=True)
class MetricUsage:
    metric: Metric
    used: int
    included: int
    overage: int
    overage_cents: int


@dataclass(frozen=True)
class UsageSummary:
    organization_id: str
    plan_id: str
    period_start: datetime
    period_end: datetime
    metrics: list[MetricUsage]


def _usage_rows(records: Sequence[UsageIn]) -> list[store.UsageRow]:
    if len(records) > MAX_USAGE_BATCH:
        raise InvalidArgument.field("records", f"at most {MAX_USAGE_BATCH} per call")
    rows: list[store.UsageRow] = []
    for i, r in enumerate(records):
        metric = r.metric
        if metric is None:
            raise InvalidArgument.field(f"records[{i}].metric", "required")
        if not r.organization_id or not r.project_id or not r.idempotency_key:
            raise InvalidArgument.field(
                f"records[{i}]", "organization_id, project_id and idempotency_key are required"
            )
        if r.quantity < 0:
            raise InvalidArgument.field(f"records[{i}].quantity", "must not be negative")
        recorded_at = r.recorded_at
        if recorded_at is None:
            raise InvalidArgument.field(f"records[{i}].recorded_at", "required")
        rows.append(
            (
                new_id(),
                r.organization_id,
                r.project_id,
                metric,
                r.quantity,
                recorded_at,
                r.idempotency_key,
            )
        )
    return rows


async def _audit(
    tx: Session,
    *,
    organization_id: str,
    action: str,
    target_type: str,
    target_id: str,
    metadata: Mapping[str, Any],
) -> None:
    """Record an audit entry in this transaction (relayed to identity by shared's relay)."""
    await record_audit(
        tx,
        SCHEMA,
        organization_id=organization_id,
        action=action,
        target_type=target_type,
        target_id=target_id,
        metadata=dict(metadata),
    )


class Billing:
    """Every BillingService use case; api.py only translates protos."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        authorizer: Authorizer,
        subscriptions: Subscriptions,
        cycle: BillingCycle,
        *,
        stripe_webhook_secret: str,
    ) -> None:
        self.db = db
        self.clock = clock
        self.authorizer = authorizer
        self.subscriptions = subscriptions
        self.cycle = cycle
        self.stripe_webhook_secret = stripe_webhook_secret

    # ---------------------------------------------------------------------- plans

    async def list_plans(self) -> list[Plan]:
        require_caller()
        async with self.db.session() as s:
            return await store.list_plans(s)

    async def get_plan(self, plan_id: str) -> Plan:
        require_caller()
        async with self.db.session() as s:
            return await store.get_plan(s, require_id(plan_id, "id"))

    # -------------------------------------------------------------- subscriptions

    async def get_subscription(self, organization_id: str) -> store.Subscription:
        await self.authorizer.require(organization_id, READ)

        async def read() -> store.Subscription:
            async with self.db.session() as s:
                return await store.get_subscription(s, organization_id)

        return await self.subscriptions.opening(organization_id, read)

    async def change_plan(self, organization_id: str, plan_id: str) -> store.Subscription:
        await self.authorizer.require(organization_id, MANAGE)
        plan_id = require_id(plan_id, "plan_id")
        sub, changed = await self.subscriptions.opening(
            organization_id, lambda: self._change_plan(organization_id, plan_id)
        )
        if changed is None:
            return sub
        # Stripe follows after the commit: at once when it answers, else on the cycle's next
        # pass (the row stays out of step, plan_version ahead of stripe_plan_version).
        try:
            await self.cycle.sync_subscription(sub.id)
        except Exception:
            log.warning("Stripe sync after ChangePlan failed; the cycle retries", exc_info=True)
        return changed

    async def _change_plan(
        self, organization_id: str, plan_id: str
    ) -> tuple[store.Subscription, store.Subscription | None]:
        """(the subscription as it was, as it is now; None when the plan was already set)."""
        async with self.db.transaction() as tx:
            plan = await store.get_plan(tx, plan_id)
            sub = await store.get_subscription(tx, organization_id, for_update=True)
            if sub.status.is_dead:
                raise NotFound("this organization has no active subscription")
            if sub.plan_id == plan.id:
                return sub, None
            downgrade_blocked(plan.id, plan.pool, sub.allocated)
            changed = await store.change_plan(tx, sub.id, plan)
            await write_event(
                tx,
                SCHEMA,
                "subscription.plan_changed",
                organization_id=sub.organization_id,
                aggregate_id=sub.id,
                payload={"from": sub.plan_id, "to": plan.id},
            )
            await _audit(
                tx,
                organization_id=sub.organization_id,
                action="billing.plan_changed",
                target_type="subscription",
                target_id=sub.id,
                metadata={"from": sub.plan_id, "to": plan.id},
            )
        return sub, changed

    async def close_organization(self, tx: Session, organization_id: str) -> None:
        """identity's organization.deleted: cancel the live subscription and free its pool.

        Stripe is not called here (this runs inside the event cursor's transaction): the
        cycle's Stripe sync cancels the Stripe subscription on its next pass."""
        sub = await store.cancel_organization(tx, organization_id, self.clock.now())
        if sub is None:
            return
        await write_event(
            tx,
            SCHEMA,
            "subscription.canceled",
            organization_id=organization_id,
            aggregate_id=sub.id,
            payload={},
        )
        await _audit(
            tx,
            organization_id=organization_id,
            action="billing.subscription_canceled",
            target_type="subscription",
            target_id=sub.id,
            metadata={},
        )

    # ---------------------------------------------------------------- allocations

    async def reserve_allocation(
        self, organization_id: str, project_id: str, size: Resources
    ) -> store.Allocation:
        require_service("project")
        org = require_id(organization_id, "organization_id")
        project = require_id(project_id, "project_id")
        validate_allocation(size)

        async def reserve() -> store.Allocation:
            async with self.db.transaction() as tx:
                allocation, changed = await store.reserve_allocation(tx, org, project, size)
                if changed:
                    await _audit(
                        tx,
                        organization_id=org,
                        action="billing.allocation_reserved",
                        target_type="project",
                        target_id=project,
                        metadata=dict(size.items()),
                    )
            return allocation

        return await self.subscriptions.opening(org, reserve)

    async def release_allocation(self, organization_id: str, project_id: str) -> None:
        require_service("project")
        org = require_id(organization_id, "organization_id")
        project = require_id(project_id, "project_id")
        async with self.db.transaction() as tx:
            if await store.release_allocation(tx, org, project):
                await _audit(
                    tx,
                    organization_id=org,
                    action="billing.allocation_released",
                    target_type="project",
                    target_id=project,
                    metadata={},
                )

    async def list_allocations(
        self, organization_id: str, page_size: int, page_token: str
    ) -> Page[store.Allocation]:
        require_service("project")
        limit = pagination.page_size(page_size, maximum=MAX_PAGE_SIZE)
        key = pagination.decode_page_token(page_token, (str,))
        after = key[0] if key else ""
        async with self.db.session() as s:
            rows = await store.list_allocations(s, organization_id, after, limit + 1)
        return pagination.page_of(rows, limit, lambda a: [a.project_id])

    # ---------------------------------------------------------------------- usage

    async def record_usage(self, records: Sequence[UsageIn]) -> tuple[int, int]:
        """(accepted, duplicates) of a batch, stored all or nothing."""
        require_service("runtime")
        rows = _usage_rows(records)
        if not rows:
            return 0, 0
        async with self.db.transaction() as tx:
            return await store.record_usage(tx, rows)

    async def usage_summary(
        self, organization_id: str, period_containing_instant: datetime | None
    ) -> UsageSummary:
        """The usage of the current period, or of the period holding the given instant."""
        await self.authorizer.require(organization_id, READ)
        async with self.db.session() as s:
            sub = await self.subscriptions.opening(
                organization_id, lambda: store.get_subscription(s, organization_id)
            )
            plan = await store.get_plan(s, sub.plan_id)
            if period_containing_instant is not None:
                start, end = period_containing(sub.created_at, period_containing_instant)
            else:
                start, end = sub.current_period_start, sub.current_period_end
            totals = await store.usage_totals(s, sub.id, start, end)
        return UsageSummary(
            organization_id=sub.organization_id,
            plan_id=plan.id,
            period_start=start,
            period_end=end,
            metrics=[
                MetricUsage(
                    metric=m,
                    used=totals[m],
                    included=plan.included[m],
                    overage=overage(totals[m], plan.included[m]),
                    overage_cents=overage_cents(totals[m], plan.included[m], plan.unit_cents[m]),
                )
                for m in METRICS
            ],
        )

    # ------------------------------------------------------------------- invoices

    async def list_invoices(
        self, organization_id: str, page_size: int, page_token: str
    ) -> Page[store.Invoice]:
        await self.authorizer.require(organization_id, READ)
        limit = pagination.page_size(page_size, maximum=MAX_PAGE_SIZE)
        after = None
        key = pagination.decode_page_token(page_token, (str, str))
        if key:
            created, invoice_id = key
            try:
                after = (datetime.fromisoformat(created), invoice_id)
            except ValueError:
                raise InvalidArgument.field(
                    "page_token", "not a page token from this list"
                ) from None
        async with self.db.session() as s:
            rows = await store.list_invoices(s, organization_id, after, limit + 1)
        return pagination.page_of(rows, limit, lambda i: [i.created_at.isoformat(), i.id])

    async def get_invoice(self, invoice_id: str) -> store.Invoice:
        require_caller()
        async with self.db.session() as s:
            invoice = await store.get_invoice(s, require_id(invoice_id, "id"))
        if invoice is None:
            # AIP-193: nobody learns whether an invoice id exists without access to it.
            raise PermissionDenied("no access to this invoice, or it does not exist")
        await self.authorizer.require(invoice.organization_id, READ)
        return invoice

    # ------------------------------------------------------------------- webhooks

    async def handle_stripe_webhook(self, body: bytes, signature: str) -> webhooks.WebhookResult:
        return await webhooks.handle(self.db, body, signature, self.stripe_webhook_secret)
