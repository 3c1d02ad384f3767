"""BillingService servicer: proto in -> domain call -> proto out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc
from google.protobuf import empty_pb2

from hangar.billing.v1 import billing_pb2, billing_pb2_grpc
from hangar.events.v1 import events_pb2
from services.billing import store, webhooks
from services.billing.domain import (
    METRICS,
    Metric,
    Plan,
    Resources,
    SubscriptionStatus,
    downgrade_blocked,
    overage,
    overage_cents,
    period_containing,
    validate_allocation,
)
from shared import pagination
from shared.auth import require_caller, require_service
from shared.errors import InvalidArgument, NotFound, PermissionDenied
from shared.ids import new_id
from shared.outbox import write_event
from shared.proto import optional_timestamp

if TYPE_CHECKING:
    from services.billing.server import BillingApp

MAX_PAGE_SIZE = 500

log = logging.getLogger(__name__)

READ = "billing.read"
MANAGE = "billing.manage"
MAX_USAGE_BATCH = 10_000

_METRIC_TO_PROTO = {
    Metric.RAM_MB_SECONDS: billing_pb2.USAGE_METRIC_RAM_MB_SECONDS,
    Metric.CPU_MILLIS_SECONDS: billing_pb2.USAGE_METRIC_CPU_MILLIS_SECONDS,
    Metric.BANDWIDTH_BYTES: billing_pb2.USAGE_METRIC_BANDWIDTH_BYTES,
}
_METRIC_FROM_PROTO = {v: k.value for k, v in _METRIC_TO_PROTO.items()}
_SUBSCRIPTION_STATUS = {
    SubscriptionStatus.ACTIVE: billing_pb2.SUBSCRIPTION_STATUS_ACTIVE,
    SubscriptionStatus.TRIALING: billing_pb2.SUBSCRIPTION_STATUS_ACTIVE,
    SubscriptionStatus.PAST_DUE: billing_pb2.SUBSCRIPTION_STATUS_PAST_DUE,
    SubscriptionStatus.UNPAID: billing_pb2.SUBSCRIPTION_STATUS_UNPAID,
    SubscriptionStatus.CANCELED: billing_pb2.SUBSCRIPTION_STATUS_CANCELED,
    SubscriptionStatus.INCOMPLETE_EXPIRED: billing_pb2.SUBSCRIPTION_STATUS_CANCELED,
}
_INVOICE_STATUS = {
    "draft": billing_pb2.INVOICE_STATUS_DRAFT,
    "open": billing_pb2.INVOICE_STATUS_OPEN,
    "paid": billing_pb2.INVOICE_STATUS_PAID,
    "uncollectible": billing_pb2.INVOICE_STATUS_UNCOLLECTIBLE,
    "void": billing_pb2.INVOICE_STATUS_VOID,
}


def _resources(r: Resources) -> billing_pb2.Resources:
    return billing_pb2.Resources(
        ram_mb=r.ram_mb, cpu_millis=r.cpu_millis, bandwidth_gb=r.bandwidth_gb
    )


def plan_to_proto(plan: Plan) -> billing_pb2.Plan:
    return billing_pb2.Plan(
        id=plan.id,
        name=plan.name,
        price_cents=plan.price_cents,
        included=_resources(plan.pool),
        included_ram_mb_seconds=plan.included[Metric.RAM_MB_SECONDS],
        included_cpu_millis_seconds=plan.included[Metric.CPU_MILLIS_SECONDS],
        included_bandwidth_bytes=plan.included[Metric.BANDWIDTH_BYTES],
        overage_cents_per_ram_mb_second=str(plan.unit_cents[Metric.RAM_MB_SECONDS]),
        overage_cents_per_cpu_millis_second=str(plan.unit_cents[Metric.CPU_MILLIS_SECONDS]),
        overage_cents_per_bandwidth_byte=str(plan.unit_cents[Metric.BANDWIDTH_BYTES]),
        stripe_price_id=plan.stripe_price_id,
    )


def subscription_to_proto(sub: store.Subscription) -> billing_pb2.Subscription:
    return billing_pb2.Subscription(
        organization_id=sub.organization_id,
        plan_id=sub.plan_id,
        status=_SUBSCRIPTION_STATUS.get(sub.status, billing_pb2.SUBSCRIPTION_STATUS_UNSPECIFIED),
        current_period_start=optional_timestamp(sub.current_period_start),
        current_period_end=optional_timestamp(sub.current_period_end),
        pool=_resources(sub.pool),
        allocated=_resources(sub.allocated),
        stripe_customer_id=sub.stripe_customer_id,
        stripe_subscription_id=sub.stripe_subscription_id,
    )


def allocation_to_proto(a: store.Allocation) -> billing_pb2.Allocation:
    return billing_pb2.Allocation(
        organization_id=a.organization_id,
        project_id=a.project_id,
        resources=_resources(a.resources),
        created_at=optional_timestamp(a.created_at),
        updated_at=optional_timestamp(a.updated_at),
    )


def invoice_to_proto(inv: store.Invoice) -> billing_pb2.Invoice:
    return billing_pb2.Invoice(
        id=inv.id,
        organization_id=inv.organization_id,
        subscription_id=inv.subscription_id,
        period_start=optional_timestamp(inv.period_start),
        period_end=optional_timestamp(inv.period_end),
        status=_INVOICE_STATUS[inv.status.value],
        lines=[
            billing_pb2.InvoiceLine(
                description=line.description,
                metric=_METRIC_TO_PROTO[line.metric],
                quantity=line.quantity,
                unit_price_cents=str(line.unit_cents),
                amount_cents=line.amount_cents,
                adjustment=line.adjustment,
            )
            for line in inv.lines
        ],
        total_cents=inv.total_cents,
        currency=inv.currency,
        stripe_invoice_id=inv.stripe_invoice_id,
        sent=inv.sent,
        created_at=optional_timestamp(inv.created_at),
        due_at=optional_timestamp(inv.due_at),
    )


def _require_id(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument.field(field, "required")
    return value


def _usage_rows(request: billing_pb2.RecordUsageRequest) -> list[store.UsageRow]:
    if len(request.records) > MAX_USAGE_BATCH:
        raise InvalidArgument.field("records", f"at most {MAX_USAGE_BATCH} per call")
    rows: list[store.UsageRow] = []
    for i, r in enumerate(request.records):
        metric = _METRIC_FROM_PROTO.get(r.metric)
        if metric is None:
            raise InvalidArgument.field(f"records[{i}].metric", "required")
        if not r.organization_id or not r.project_id or not r.idempotency_key:
            raise InvalidArgument.field(
                f"records[{i}]", "organization_id, project_id and idempotency_key are required"
            )
        if r.quantity < 0:
            raise InvalidArgument.field(f"records[{i}].quantity", "must not be negative")
        if not r.HasField("recorded_at"):
            raise InvalidArgument.field(f"records[{i}].recorded_at", "required")
        recorded_at = r.recorded_at.ToDatetime(tzinfo=UTC)
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


class BillingApi(billing_pb2_grpc.BillingServiceServicer):
    def __init__(self, app: BillingApp) -> None:
        self.app = app
        self.db = app.db

    # ---------------------------------------------------------------------- plans

    async def ListPlans(self, request, context):  # type: ignore[no-untyped-def]
        require_caller()
        async with self.db.session() as s:
            plans = await store.list_plans(s)
        return billing_pb2.ListPlansResponse(plans=[plan_to_proto(p) for p in plans])

    async def GetPlan(self, request, context):  # type: ignore[no-untyped-def]
        require_caller()
        async with self.db.session() as s:
            plan = await store.get_plan(s, _require_id(request.id, "id"))
        return plan_to_proto(plan)

    # -------------------------------------------------------------- subscriptions

    async def GetSubscription(self, request, context):  # type: ignore[no-untyped-def]
        await self.app.authorizer.require(request.organization_id, READ)
        await self.app.subscriptions.ensure(request.organization_id)
        async with self.db.session() as s:
            sub = await store.get_subscription(s, request.organization_id)
        return subscription_to_proto(sub)

    async def ChangePlan(self, request, context):  # type: ignore[no-untyped-def]
        await self.app.authorizer.require(request.organization_id, MANAGE)
        plan_id = _require_id(request.plan_id, "plan_id")
        await self.app.subscriptions.ensure(request.organization_id)
        async with self.db.transaction() as tx:
            plan = await store.get_plan(tx, plan_id)
            sub = await store.get_subscription(tx, request.organization_id, for_update=True)
            if sub.status.is_dead:
                raise NotFound("this organization has no active subscription")
            if sub.plan_id == plan.id:
                return subscription_to_proto(sub)
            downgrade_blocked(plan.id, plan.pool, sub.allocated)
            changed = await store.change_plan(tx, sub.id, plan)
            await write_event(
                tx,
                "billing",
                "subscription.plan_changed",
                organization_id=sub.organization_id,
                aggregate_id=sub.id,
                payload={"from": sub.plan_id, "to": plan.id},
            )
            await self.app.audit(
                tx,
                organization_id=sub.organization_id,
                action="billing.plan_changed",
                target_type="subscription",
                target_id=sub.id,
                metadata={"from": sub.plan_id, "to": plan.id},
            )
        # Stripe follows after the commit: at once when it answers, else on the cycle's next
        # pass (the row stays out of step, plan_version ahead of stripe_plan_version).
        try:
            await self.app.cycle.sync_subscription(sub.id)
        except Exception:
            log.warning("Stripe sync after ChangePlan failed; the cycle retries", exc_info=True)
        return subscription_to_proto(changed)

    # ---------------------------------------------------------------- allocations

    async def ReserveAllocation(self, request, context):  # type: ignore[no-untyped-def]
        require_service("project")
        org = _require_id(request.organization_id, "organization_id")
        project = _require_id(request.project_id, "project_id")
        size = Resources(
            request.resources.ram_mb, request.resources.cpu_millis, request.resources.bandwidth_gb
        )
        validate_allocation(size)
        await self.app.subscriptions.ensure(org)
        async with self.db.transaction() as tx:
            allocation, changed = await store.reserve_allocation(tx, org, project, size)
            if changed:
                await self.app.audit(
                    tx,
                    organization_id=org,
                    action="billing.allocation_reserved",
                    target_type="project",
                    target_id=project,
                    metadata=dict(size.items()),
                )
        return allocation_to_proto(allocation)

    async def ReleaseAllocation(self, request, context):  # type: ignore[no-untyped-def]
        require_service("project")
        org = _require_id(request.organization_id, "organization_id")
        project = _require_id(request.project_id, "project_id")
        async with self.db.transaction() as tx:
            if await store.release_allocation(tx, org, project):
                await self.app.audit(
                    tx,
                    organization_id=org,
                    action="billing.allocation_released",
                    target_type="project",
                    target_id=project,
                    metadata={},
                )
        return empty_pb2.Empty()

    async def ListAllocations(self, request, context):  # type: ignore[no-untyped-def]
        require_service("project")
        limit = pagination.page_size(request.page_size, maximum=MAX_PAGE_SIZE)
        after = store.decode_page_token(request.page_token)
        async with self.db.session() as s:
            rows = await store.list_allocations(s, request.organization_id, after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return billing_pb2.ListAllocationsResponse(
            allocations=[allocation_to_proto(a) for a in rows],
            next_page_token=store.encode_page_token(rows[-1].project_id) if more else "",
        )

    # ---------------------------------------------------------------------- usage

    async def RecordUsage(self, request, context):  # type: ignore[no-untyped-def]
        require_service("runtime")
        rows = _usage_rows(request)
        if not rows:
            return billing_pb2.RecordUsageResponse()
        async with self.db.transaction() as tx:
            accepted, duplicates = await store.record_usage(tx, rows)
        return billing_pb2.RecordUsageResponse(accepted=accepted, duplicates=duplicates)

    async def GetUsageSummary(self, request, context):  # type: ignore[no-untyped-def]
        await self.app.authorizer.require(request.organization_id, READ)
        await self.app.subscriptions.ensure(request.organization_id)
        async with self.db.session() as s:
            sub = await store.get_subscription(s, request.organization_id)
            plan = await store.get_plan(s, sub.plan_id)
            if request.HasField("period_start"):
                instant = request.period_start.ToDatetime(tzinfo=UTC)
                start, end = period_containing(sub.created_at, instant)
            else:
                start, end = sub.current_period_start, sub.current_period_end
            totals = await store.usage_totals(s, sub.id, start, end)
        return billing_pb2.UsageSummary(
            organization_id=sub.organization_id,
            plan_id=plan.id,
            period_start=optional_timestamp(start),
            period_end=optional_timestamp(end),
            metrics=[
                billing_pb2.MetricUsage(
                    metric=_METRIC_TO_PROTO[m],
                    used=totals[m],
                    included=plan.included[m],
                    overage=overage(totals[m], plan.included[m]),
                    overage_cents=overage_cents(totals[m], plan.included[m], plan.unit_cents[m]),
                )
                for m in METRICS
            ],
        )

    # ------------------------------------------------------------------- invoices

    async def ListInvoices(self, request, context):  # type: ignore[no-untyped-def]
        await self.app.authorizer.require(request.organization_id, READ)
        limit = pagination.page_size(request.page_size, maximum=MAX_PAGE_SIZE)
        after = None
        if request.page_token:
            created, _, invoice_id = store.decode_page_token(request.page_token).partition("|")
            try:
                after = (datetime.fromisoformat(created), invoice_id)
            except ValueError:
                raise InvalidArgument.field(
                    "page_token", "not a token from a previous page"
                ) from None
        async with self.db.session() as s:
            rows = await store.list_invoices(s, request.organization_id, after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        token = ""
        if more:
            token = store.encode_page_token(f"{rows[-1].created_at.isoformat()}|{rows[-1].id}")
        return billing_pb2.ListInvoicesResponse(
            invoices=[invoice_to_proto(i) for i in rows], next_page_token=token
        )

    async def GetInvoice(self, request, context):  # type: ignore[no-untyped-def]
        require_caller()
        async with self.db.session() as s:
            invoice = await store.get_invoice(s, _require_id(request.id, "id"))
        if invoice is None:
            # AIP-193: nobody learns whether an invoice id exists without access to it.
            raise PermissionDenied("no access to this invoice, or it does not exist")
        await self.app.authorizer.require(invoice.organization_id, READ)
        return invoice_to_proto(invoice)

    # ------------------------------------------------------------------- webhooks

    async def HandleStripeWebhook(self, request, context):  # type: ignore[no-untyped-def]
        result = await webhooks.handle(
            self.db,
            request.body.data,
            request.stripe_signature,
            self.app.settings.stripe_webhook_secret,
        )
        return billing_pb2.HandleStripeWebhookResponse(
            event_id=result.event_id, duplicate=result.duplicate
        )

    # --------------------------------------------------------------------- events

    async def WatchEvents(
        self, request: events_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.Event]:
        require_service()
        async for event in self.app.feed.watch(request, context):
            yield event
