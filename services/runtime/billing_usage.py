"""Runtime's calls to billing: usage reports become RecordUsage calls with runtime's service
token. Nothing here touches the database."""

from __future__ import annotations

from collections.abc import Sequence

from hangar.billing.v1 import billing_pb2, billing_pb2_grpc
from services.runtime.telemetry import UsageReport
from shared.clients import Clients
from shared.proto import timestamp
from shared.usage import UsageMetric

BILLING_SERVICE = billing_pb2.DESCRIPTOR.services_by_name["BillingService"]
_USAGE_OUT = {
    UsageMetric.RAM_MB_SECONDS: billing_pb2.USAGE_METRIC_RAM_MB_SECONDS,
    UsageMetric.CPU_MILLIS_SECONDS: billing_pb2.USAGE_METRIC_CPU_MILLIS_SECONDS,
    UsageMetric.BANDWIDTH_BYTES: billing_pb2.USAGE_METRIC_BANDWIDTH_BYTES,
}


class RemoteBillingUsage:
    """A UsageSender: billing.RecordUsage with runtime's service token."""

    def __init__(self, clients: Clients) -> None:
        self.clients = clients

    async def __call__(self, reports: Sequence[UsageReport]) -> None:
        stub = self.clients.stub("billing", billing_pb2_grpc.BillingServiceStub, BILLING_SERVICE)
        # wait_for_ready: a billing that is coming back gets the call once it is reachable.
        await stub.RecordUsage(usage_request(reports), wait_for_ready=True)


def usage_request(reports: Sequence[UsageReport]) -> billing_pb2.RecordUsageRequest:
    return billing_pb2.RecordUsageRequest(
        records=[
            billing_pb2.UsageRecord(
                organization_id=r.organization_id,
                project_id=r.project_id,
                metric=_USAGE_OUT[r.metric],
                quantity=r.quantity,
                recorded_at=timestamp(r.window_start),
                idempotency_key=r.idempotency_key,
            )
            for r in reports
        ]
    )
