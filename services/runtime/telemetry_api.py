"""RuntimeService's telemetry RPCs (a mixin of RuntimeApi): proto in -> telemetry -> proto out.

ShipLogs / ShipMetrics are internal (the agent's service token). QueryLogs, TailLogs and
QueryMetrics need `logs.read` / `metrics.read` (viewer) in the project's organization;
outsiders get PERMISSION_DENIED whether or not the project exists (AIP-193).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeAlias

import grpc
from google.protobuf import timestamp_pb2

from hangar.runtime.v1 import runtime_pb2 as pb
from services.runtime.domain import required
from services.runtime.telemetry import (
    Aggregation,
    IncomingLine,
    IncomingSample,
    LogEntry,
    LogQuery,
    MetricName,
    MetricQuery,
    Telemetry,
    utcnow,
)
from shared import pagination
from shared.auth import (
    Authorizer,
    require_caller,
    require_platform_admin,
    require_service,
    require_token_project,
)
from shared.errors import InvalidArgument
from shared.proto import timestamp

Context: TypeAlias = grpc.aio.ServicerContext

AGENT = "agent"
MAX_TAIL_LINES = 10_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STREAM_IN = {
    pb.LOG_STREAM_STDOUT: "stdout",
    pb.LOG_STREAM_STDERR: "stderr",
    pb.LOG_STREAM_BUILD: "build",
}
_STREAM_OUT = {value: key for key, value in _STREAM_IN.items()}
_METRIC_IN = {
    pb.METRIC_TYPE_MEMORY_RSS_BYTES: MetricName.MEMORY_RSS_BYTES,
    pb.METRIC_TYPE_CPU_MILLICORES: MetricName.CPU_MILLICORES,
    pb.METRIC_TYPE_NETWORK_RX_BYTES: MetricName.NETWORK_RX_BYTES,
    pb.METRIC_TYPE_NETWORK_TX_BYTES: MetricName.NETWORK_TX_BYTES,
}
_AGGREGATION_IN = {
    pb.AGGREGATION_UNSPECIFIED: Aggregation.AVG,
    pb.AGGREGATION_AVG: Aggregation.AVG,
    pb.AGGREGATION_MAX: Aggregation.MAX,
    pb.AGGREGATION_SUM: Aggregation.SUM,
}


class Projects(Protocol):
    async def organization_of(self, project_id: str) -> str: ...


class TelemetryHost(Protocol):
    """What the mixin needs from the app (RuntimeApp)."""

    telemetry: Telemetry
    authorizer: Authorizer
    projects: Projects


def _datetime(ts: timestamp_pb2.Timestamp) -> datetime:
    # Faster than ToDatetime, which matters at tens of thousands of lines a second.
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def entry_to_proto(e: LogEntry) -> pb.LogEntry:
    return pb.LogEntry(
        project_id=e.project_id,
        deployment_id=e.deployment_id,
        container_id=e.container_id,
        stream=_STREAM_OUT.get(e.stream, pb.LOG_STREAM_UNSPECIFIED),
        line=e.line,
        emitted_at=timestamp(e.emitted_at),
    )


class TelemetryApi:
    app: TelemetryHost

    async def _authorize_project(self, project_id: str, permission: str) -> str:
        require_caller()
        project_id = required(project_id, "project_id")
        require_token_project(project_id)
        organization_id = await self.app.projects.organization_of(project_id)
        await self.app.authorizer.require(organization_id, permission)
        return project_id

    # ------------------------------------------------------------------ from the agents

    async def ShipLogs(
        self, request_iterator: AsyncIterator[pb.ShipLogsRequest], context: Context
    ) -> pb.ShipLogsResponse:
        require_service(AGENT)
        ingest = self.app.telemetry.log_ingest()
        try:
            async for request in request_iterator:
                lines = [
                    IncomingLine(
                        line.container_id,
                        _STREAM_IN.get(line.stream, "system"),
                        line.line,
                        _datetime(line.emitted_at),
                        line.sequence,
                    )
                    for line in request.lines
                ]
                await ingest.add(lines)
            await ingest.finish()
        except BaseException:
            await ingest.abandon()
            raise
        return pb.ShipLogsResponse(
            acknowledged_sequences=ingest.acknowledged,
            rejected_lines=ingest.rejected,
            rejected_reason=ingest.rejected_reason,
        )

    async def ShipMetrics(
        self, request: pb.ShipMetricsRequest, context: Context
    ) -> pb.ShipMetricsResponse:
        require_service(AGENT)
        samples = [
            IncomingSample(
                s.container_id, _METRIC_IN.get(s.metric), s.value, _datetime(s.sampled_at)
            )
            for s in request.samples
        ]
        accepted, rejected = await self.app.telemetry.write_samples(request.server_id, samples)
        return pb.ShipMetricsResponse(accepted=accepted, rejected=rejected)

    # ------------------------------------------------------------------------ reading

    async def QueryLogs(
        self, request: pb.QueryLogsRequest, context: Context
    ) -> pb.QueryLogsResponse:
        project_id = await self._authorize_project(request.project_id, "logs.read")
        telemetry = self.app.telemetry
        now = utcnow()
        query = LogQuery(
            project_id=project_id,
            start=_datetime(request.start_time)
            if request.HasField("start_time")
            else now - telemetry.retention,
            end=_datetime(request.end_time) if request.HasField("end_time") else now,
            deployment_id=request.deployment_id.strip(),
            container_id=request.container_id.strip(),
            contains=request.contains,
        )
        entries, token = await telemetry.query_logs(
            query, pagination.page_size(request.page_size, 1000, default=100), request.page_token
        )
        return pb.QueryLogsResponse(
            entries=[entry_to_proto(e) for e in entries], next_page_token=token
        )

    async def TailLogs(
        self, request: pb.TailLogsRequest, context: Context
    ) -> AsyncIterator[pb.LogEntry]:
        project_id = await self._authorize_project(request.project_id, "logs.read")
        if not 0 <= request.tail_lines <= MAX_TAIL_LINES:
            raise InvalidArgument.field("tail_lines", f"between 0 and {MAX_TAIL_LINES}")
        await context.send_initial_metadata(())  # the gateway answers with headers at once
        telemetry = self.app.telemetry
        async with telemetry.hub.subscribe(project_id) as tail:
            # Subscribed (and listening) before reading history: nothing falls in between.
            for entry in tail.fresh(await telemetry.last_lines(project_id, request.tail_lines)):
                yield entry_to_proto(entry)
            async for batch in tail.batches():
                for entry in batch:
                    yield entry_to_proto(entry)

    async def QueryMetrics(
        self, request: pb.QueryMetricsRequest, context: Context
    ) -> pb.QueryMetricsResponse:
        """server_id alone, from a platform admin: that server's own totals. Otherwise the
        project's containers, narrowed to one container or to those on one server."""
        server_totals = False
        if request.server_id and not request.container_id and require_caller().is_platform_admin:
            require_platform_admin()
            server_totals = True
            project_id = request.project_id
        else:
            project_id = await self._authorize_project(request.project_id, "metrics.read")
        metric = _METRIC_IN.get(request.metric)
        if metric is None:
            raise InvalidArgument.field("metric", "required")
        aggregation = _AGGREGATION_IN.get(request.aggregation)
        if aggregation is None:
            raise InvalidArgument.field("aggregation", "AVG, MAX or SUM")
        end = _datetime(request.end_time) if request.HasField("end_time") else utcnow()
        start = (
            _datetime(request.start_time)
            if request.HasField("start_time")
            else end - timedelta(hours=1)
        )
        step = request.step.ToTimedelta() if request.HasField("step") else timedelta(seconds=60)
        series = await self.app.telemetry.query_metrics(
            MetricQuery(
                project_id=project_id,
                metric=metric,
                start=start,
                end=end,
                step=step,
                aggregation=aggregation,
                container_id=request.container_id.strip(),
                server_id=request.server_id.strip(),
                server_totals=server_totals,
            )
        )
        return pb.QueryMetricsResponse(
            series=[
                pb.MetricSeries(
                    container_id=s.container_id,
                    server_id=s.server_id,
                    metric=request.metric,
                    points=[pb.MetricPoint(time=timestamp(t), value=v) for t, v in s.points],
                )
                for s in series
            ]
        )
