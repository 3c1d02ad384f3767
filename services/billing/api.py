"""BillingService servicer: proto in -> use case (service.Billing) -> proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TypeAlias

import grpc
from google.protobuf import empty_pb2

from hangar.billing.v1 import billing_pb2 as pb
from hangar.billing.v1 import billing_pb2_grpc
from hangar.events.v1 import events_pb2
from services.billing import store
from services.billing.domain import Metric, Plan, SubscriptionStatus
from services.billing.service import Billing, UsageSummary
from shared.auth import require_service
from shared.outbox import OutboxFeed
from shared.proto import optional_timestamp
from shared.resources import Resources

Context: TypeAlias = grpc.aio.ServicerContext

_METRIC_TO_PROTO = {
    Metric.RAM_MB_SECONDS: pb.USAGE_METRIC_RAM_MB_SECONDS,
    Metric.CPU_MILLIS_SECONDS: pb.USAGE_METRIC_CPU_MILLIS_SECONDS,
    Metric.BANDWIDTH_BYTES: pb.USAGE_METRIC_BANDWIDTH_BYTES,
}
_METRIC_FROM_PROTO = {v: k.value for k, v in _METRIC_TO_PROTO.items()}
_SUBSCRIPTION_STATUS = {
    SubscriptionStatus.ACTIVE: pb.SUBSCRIPTION_STATUS_ACTIVE,
    SubscriptionStatus.TRIALING: pb.SUBSCRIPTION_STATUS_ACTIVE,
    SubscriptionStatus.PAST_DUE: pb.SUBSCRIPTION_STATUS_PAST_DUE,
    SubscriptionStatus.UNPAID: pb.SUBSCRIPTION_STATUS_UNPAID,
    SubscriptionStatus.CANCELED: pb.SUBSCRIPTION_STATUS_CANCELED,
    SubscriptionStatus.INCOMPLETE_EXPIRED: pb.SUBSCRIPTION_STATUS_CANCELED,
}
_INVOICE_STATUS = {
    "draft": pb.INVOICE_STATUS_DRAFT,
    "open": pb.INVOICE_STATUS_OPEN,
    "paid": pb.INVOICE_STATUS_PAID,
    "uncollectible": pb.INVOICE_STATUS_UNCOLLECTIBLE,
    "void": pb.INVOICE_STATUS_VOID,
}


def plan_to_proto(plan: Plan) -> pb.Plan:
    return pb.Plan(
        id=plan.id,
        name=plan.name,
        price_cents=plan.price_cents,
        included=plan.pool.to_proto(),
        included_ram_mb_seconds=plan.included[Metric.RAM_MB_SECONDS],
        included_cpu_millis_seconds=plan.included[Metric.CPU_MILLIS_SECONDS],
        included_bandwidth_bytes=plan.included[Metric.BANDWIDTH_BYTES],
        overage_cents_per_ram_mb_second=str(plan.unit_cents[Metric.RAM_MB_SECONDS]),
        overage_cents_per_cpu_millis_second=str(plan.unit_cents[Metric.CPU_MILLIS_SECONDS]),
        overage_cents_per_bandwidth_byte=str(plan.unit_cents[Metric.BANDWIDTH_BYTES]),
        stripe_price_id=plan.stripe_price_id,
    )


def subscription_to_proto(sub: store.Subscription) -> pb.Subscription:
    return pb.Subscription(
        organization_id=sub.organization_id,
        plan_id=sub.plan_id,
        status=_SUBSCRIPTION_STATUS.get(sub.status, pb.SUBSCRIPTION_STATUS_UNSPECIFIED),
        current_period_start=optional_timestamp(sub.current_period_start),
        current_period_end=optional_timestamp(sub.current_period_end),
        pool=sub.pool.to_proto(),
        allocated=sub.allocated.to_proto(),
        stripe_customer_id=sub.stripe_customer_id,
        stripe_subscription_id=sub.stripe_subscription_id,
    )


def allocation_to_proto(a: store.Allocation) -> pb.Allocation:
    return pb.Allocation(
        organization_id=a.organization_id,
        project_id=a.project_id,
        resources=a.resources.to_proto(),
        created_at=optional_timestamp(a.created_at),
        updated_at=optional_timestamp(a.updated_at),
    )


def invoice_to_proto(inv: store.Invoice) -> pb.Invoice:
    return pb.Invoice(
        id=inv.id,
        organization_id=inv.organization_id,
        subscription_id=inv.subscription_id,
        period_start=optional_timestamp(inv.period_start),
        period_end=optional_timestamp(inv.period_end),
        status=_INVOICE_STATUS[inv.status.value],
        lines=[
            pb.InvoiceLine(
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
        hosted_invoice_url=inv.hosted_invoice_url,
        sent=inv.sent,
        created_at=optional_timestamp(inv.created_at),
        due_at=optional_timestamp(inv.due_at),
    )


def usage_summary_to_proto(summary: UsageSummary) -> pb.UsageSummary:
    return pb.UsageSummary(
        organization_id=summary.organization_id,
        plan_id=summary.plan_id,
        period_start=optional_timestamp(summary.period_start),
        period_end=optional_timestamp(summary.period_end),
        metrics=[
            pb.MetricUsage(
                metric=_METRIC_TO_PROTO[m.metric],
                used=m.used,
                included=m.included,
                overage=m.overage,
                overage_cents=m.overage_cents,
            )
            for m in summary.metrics
        ],
    )


class _UsageRecordIn:
    """A UsageRecord as service.UsageIn, read off the proto as the use case asks for it."""

    __slots__ = ("_record",)

    def __init__(self, record: pb.UsageRecord) -> None:
        self._record = record

    @property
    def metric(self) -> str | None:
        return _METRIC_FROM_PROTO.get(self._record.metric)

    @property
    def organization_id(self) -> str:
        return self._record.organization_id

    @property
    def project_id(self) -> str:
        return self._record.project_id

    @property
    def quantity(self) -> int:
        return self._record.quantity

    @property
    def recorded_at(self) -> datetime | None:
        if not self._record.HasField("recorded_at"):
            return None
        at: datetime = self._record.recorded_at.ToDatetime(tzinfo=UTC)
        return at

    @property
    def idempotency_key(self) -> str:
        return self._record.idempotency_key


class BillingApi(billing_pb2_grpc.BillingServiceServicer):
    def __init__(self, billing: Billing, feed: OutboxFeed) -> None:
        self.billing = billing
        self.feed = feed

    # ---------------------------------------------------------------------- plans

    async def ListPlans(
        self, request: pb.ListPlansRequest, context: Context
    ) -> pb.ListPlansResponse:
        plans = await self.billing.list_plans()
        return pb.ListPlansResponse(plans=[plan_to_proto(p) for p in plans])

    async def GetPlan(self, request: pb.GetPlanRequest, context: Context) -> pb.Plan:
        return plan_to_proto(await self.billing.get_plan(request.id))

    # -------------------------------------------------------------- subscriptions

    async def GetSubscription(
        self, request: pb.GetSubscriptionRequest, context: Context
    ) -> pb.Subscription:
        sub = await self.billing.get_subscription(request.organization_id)
        return subscription_to_proto(sub)

    async def ChangePlan(self, request: pb.ChangePlanRequest, context: Context) -> pb.Subscription:
        sub = await self.billing.change_plan(request.organization_id, request.plan_id)
        return subscription_to_proto(sub)

    # ---------------------------------------------------------------- allocations

    async def ReserveAllocation(
        self, request: pb.ReserveAllocationRequest, context: Context
    ) -> pb.Allocation:
        allocation = await self.billing.reserve_allocation(
            request.organization_id, request.project_id, Resources.from_proto(request.resources)
        )
        return allocation_to_proto(allocation)

    async def ReleaseAllocation(
        self, request: pb.ReleaseAllocationRequest, context: Context
    ) -> empty_pb2.Empty:
        await self.billing.release_allocation(request.organization_id, request.project_id)
        return empty_pb2.Empty()

    async def ListAllocations(
        self, request: pb.ListAllocationsRequest, context: Context
    ) -> pb.ListAllocationsResponse:
        page = await self.billing.list_allocations(
            request.organization_id, request.page_size, request.page_token
        )
        return pb.ListAllocationsResponse(
            allocations=[allocation_to_proto(a) for a in page.items],
            next_page_token=page.next_page_token,
        )

    # ---------------------------------------------------------------------- usage

    async def RecordUsage(
        self, request: pb.RecordUsageRequest, context: Context
    ) -> pb.RecordUsageResponse:
        accepted, duplicates = await self.billing.record_usage(
            [_UsageRecordIn(r) for r in request.records]
        )
        return pb.RecordUsageResponse(accepted=accepted, duplicates=duplicates)

    async def GetUsageSummary(
        self, request: pb.GetUsageSummaryRequest, context: Context
    ) -> pb.UsageSummary:
        instant = (
            request.period_start.ToDatetime(tzinfo=UTC)
            if request.HasField("period_start")
            else None
        )
        summary = await self.billing.usage_summary(request.organization_id, instant)
        return usage_summary_to_proto(summary)

    # ------------------------------------------------------------------- invoices

    async def ListInvoices(
        self, request: pb.ListInvoicesRequest, context: Context
    ) -> pb.ListInvoicesResponse:
        page = await self.billing.list_invoices(
            request.organization_id, request.page_size, request.page_token
        )
        return pb.ListInvoicesResponse(
            invoices=[invoice_to_proto(i) for i in page.items],
            next_page_token=page.next_page_token,
        )

    async def GetInvoice(self, request: pb.GetInvoiceRequest, context: Context) -> pb.Invoice:
        return invoice_to_proto(await self.billing.get_invoice(request.id))

    # ------------------------------------------------------------------- webhooks

    async def HandleStripeWebhook(
        self, request: pb.HandleStripeWebhookRequest, context: Context
    ) -> pb.HandleStripeWebhookResponse:
        result = await self.billing.handle_stripe_webhook(
            request.body.data, request.stripe_signature
        )
        return pb.HandleStripeWebhookResponse(event_id=result.event_id, duplicate=result.duplicate)

    # --------------------------------------------------------------------- events

    async def WatchEvents(
        self, request: events_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[events_pb2.Event]:
        require_service()
        async for event in self.feed.watch(request, context):
            yield event
