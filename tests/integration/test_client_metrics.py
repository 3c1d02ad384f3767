"""The agent's calls are counted when the process has metrics: its telemetry (ShipMetrics,
on the agent's `Clients`) and the service token it gets from identity on a channel of its
own, scraped from GET /metrics after real gRPC calls to in-process servers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from hangar.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from services.agent.shipping import AgentTelemetry
from shared.auth import ServiceTokenSource
from shared.clients import Clients
from shared.metrics import Metrics, serve_metrics
from shared.settings import Settings
from tests.support.metrics import scrape, value
from tests.unit.test_agent_metrics import CountingDriver

RUNTIME = "hangar.runtime.v1.RuntimeService"
IDENTITY = "hangar.identity.v1.IdentityService"
HANDLED = "grpc_client_handled_total"


class Runtime(runtime_pb2_grpc.RuntimeServiceServicer):
    def __init__(self) -> None:
        self.samples: list[runtime_pb2.MetricSample] = []
        self.tokens: list[str] = []

    async def ShipMetrics(self, request, context):  # type: ignore[no-untyped-def]
        self.tokens.append(dict(context.invocation_metadata() or ()).get("authorization", ""))
        self.samples.extend(request.samples)
        return runtime_pb2.ShipMetricsResponse()


class Identity(identity_pb2_grpc.IdentityServiceServicer):
    async def IssueServiceToken(self, request, context):  # type: ignore[no-untyped-def]
        reply = identity_pb2.IssueServiceTokenResponse(token=f"token-of-{request.service}")
        reply.expires_at.seconds = int(time.time()) + 3600
        return reply


@pytest.fixture
async def services() -> AsyncIterator[tuple[Runtime, str]]:
    runtime = Runtime()
    server = grpc.aio.server()
    runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(runtime, server)
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(Identity(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield runtime, f"127.0.0.1:{port}"
    await server.stop(None)


async def test_the_agents_shipments_and_its_token_are_counted(
    services: tuple[Runtime, str],
) -> None:
    runtime, address = services
    settings = replace(
        Settings(service="agent"),
        addresses={"runtime": address, "identity": address},
        service_secrets={"agent": "agent-secret"},
    )
    metrics = Metrics()
    endpoint = await serve_metrics(metrics, "127.0.0.1:0")
    # As AgentApp makes them: its own service token source and its metrics.
    token_source = ServiceTokenSource(settings, metrics=metrics)
    clients = Clients(settings.addresses, token_provider=token_source, metrics=metrics)
    telemetry = AgentTelemetry(settings, CountingDriver(), clients)  # type: ignore[arg-type]
    try:
        before = await scrape(endpoint.port)
        assert telemetry.metrics.sample() >= 1  # the server's totals
        assert await telemetry.metrics.ship() >= 1
        assert await telemetry.metrics.ship() == 0  # nothing pending: no call
        after = await scrape(endpoint.port)
    finally:
        await telemetry.close()
        await clients.close()
        await token_source.close()
        await endpoint.close()
    assert runtime.samples and runtime.tokens == ["Bearer token-of-agent"]
    shipped = {"grpc_service": RUNTIME, "grpc_method": "ShipMetrics", "grpc_code": "OK"}
    token = {"grpc_service": IDENTITY, "grpc_method": "IssueServiceToken", "grpc_code": "OK"}
    for labels in (shipped, token):
        assert value(after, HANDLED, **labels) - value(before, HANDLED, **labels) == 1, labels
