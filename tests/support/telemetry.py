"""Telemetry for tests: runtime (with its telemetry RPCs) beside real identity, project and
billing (tests/support/runtime.py), on a fixed loopback port so it can be restarted under
the agent's feet; containers registered straight in runtime's tables for projects made
through project.CreateProject; apps run through the agent's ProcessDriver; the agent's
shippers authenticate with the agent's real service token (ServiceTokenSource against
identity.IssueServiceToken, as `hangar serve agent` does)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from hangar.runtime.v1 import runtime_pb2 as pb
from hangar.runtime.v1 import runtime_pb2_grpc
from services.agent.domain import ContainerSpec
from services.agent.drivers import ProcessDriver
from services.agent.shipping import RUNTIME_SERVICE, LogShipper, MetricShipper
from services.runtime import store
from shared.auth import ServiceTokenSource
from shared.clients import TokenProvider, open_channel
from shared.db import Database
from shared.ids import new_id
from shared.resources import Resources
from tests.support.project import Member, Tenant
from tests.support.runtime import Metadata, Neighbours, Runtime, launch_runtime

__all__ = ["Fleet", "Placed", "Runtime", "fleet"]


@dataclass
class Fleet:
    """Runtime replicas sharing one database, beside the module's identity, project and
    billing; the agent's token source for shippers and ShipLogs/ShipMetrics calls."""

    neighbours: Neighbours
    started: list[Runtime] = field(default_factory=list)
    _agent: ServiceTokenSource | None = None

    async def start(self, port: int = 0, *, billing_address: str = "", **settings: Any) -> Runtime:
        values = {
            "telemetry_sample_seconds": 1.0,
            "telemetry_usage_window_seconds": 60.0,
            "telemetry_usage_lateness_seconds": 0.0,
            **settings,
        }
        running = await launch_runtime(
            self.neighbours, port, billing_address=billing_address, **values
        )
        self.started.append(running)
        return running

    async def stop(self, runtime: Runtime) -> None:
        if runtime in self.started:
            self.started.remove(runtime)
            await runtime.stop()

    async def tenant(self, *roles: str) -> Tenant:
        return await self.neighbours.tenant(*roles)

    async def new_project(self, *roles: str) -> tuple[Tenant, str, str]:
        """(tenant, organization id, project id): a new organization and a project in it."""
        tenant = await self.neighbours.tenant(*roles)
        return tenant, tenant.org_id, await self.neighbours.project(tenant)

    async def user(self) -> Member:
        return await self.neighbours.user()

    @property
    def agent_token(self) -> TokenProvider:
        """The agent's token provider: identity.IssueServiceToken with the agent's secret."""
        if self._agent is None:
            identity = self.neighbours.stack.identity
            self._agent = ServiceTokenSource(replace(identity.settings, service="agent"))
        return self._agent

    async def agent(self) -> Metadata:
        """The agent's real token as call metadata."""
        return (("authorization", f"Bearer {await self.agent_token()}"),)

    async def close(self) -> None:
        for runtime in list(self.started):
            await self.stop(runtime)
        if self._agent is not None:
            await self._agent.close()


@pytest.fixture
async def fleet(neighbours: Neighbours) -> AsyncIterator[Fleet]:
    running = Fleet(neighbours)
    yield running
    await running.close()


@dataclass(frozen=True)
class Placed:
    server_id: str
    deployment_id: str
    container_id: str
    project_id: str
    organization_id: str


async def place_container(
    db: Database, project_id: str, organization_id: str, server_id: str = ""
) -> Placed:
    """A server (unless given), a running deployment and its container, straight in the store
    (what CreateDeployment and the agent's start report will have written)."""
    async with db.transaction() as tx:
        if not server_id:
            server = await store.insert_server(
                tx,
                name=f"telemetry-{new_id()[:10]}",
                region="local",
                agent_address="127.0.0.1:1",
                capacity=Resources(4096, 4000),
            )
            server_id = server.id
        deployment_id = await tx.fetchval(
            """INSERT INTO runtime.deployments (id, project_id, organization_id, server_id,
                   status, command, ram_mb, cpu_millis, region, replica_set_id)
               VALUES ($1, $2, $3, $4, 'starting', 'app', 128, 100, 'local', $1) RETURNING id""",
            new_id(),
            project_id,
            organization_id,
            server_id,
        )
        container_id = await tx.fetchval(
            """INSERT INTO runtime.containers (id, project_id, deployment_id, server_id, status,
                   started_at)
               VALUES ($1, $2, $3, $4, 'running', now()) RETURNING id""",
            new_id(),
            project_id,
            deployment_id,
            server_id,
        )
    return Placed(server_id, deployment_id, container_id, project_id, organization_id)


# ------------------------------------------------------------------------------ agent


@asynccontextmanager
async def agent_channel(
    address: str, token_provider: TokenProvider
) -> AsyncIterator[runtime_pb2_grpc.RuntimeServiceStub]:
    """What the agent's shippers talk through (its service token on every call)."""
    channel = open_channel(address, services=[RUNTIME_SERVICE], token_provider=token_provider)
    try:
        yield runtime_pb2_grpc.RuntimeServiceStub(channel)
    finally:
        await channel.close()


@asynccontextmanager
async def shipping_agent(
    runtime_address: str,
    token_provider: TokenProvider,
    *,
    server: str = "",
    log_lines: int = 5000,
    metrics_interval: float = 0.0,
    batch_lines: int = 2000,
) -> AsyncIterator[tuple[ProcessDriver, LogShipper, MetricShipper]]:
    """A ProcessDriver running real app processes, with its shippers running against
    runtime (the metric loop only when metrics_interval > 0)."""
    driver = ProcessDriver(start_timeout=10, stop_grace=1, log_lines=log_lines)
    async with agent_channel(runtime_address, token_provider) as stub:
        logs = LogShipper(driver, stub, lambda: server, batch_lines=batch_lines)
        metrics = MetricShipper(
            driver, stub, lambda: server, interval_seconds=metrics_interval or 1.0
        )
        tasks = [asyncio.create_task(logs.run())]
        if metrics_interval > 0:
            tasks.append(asyncio.create_task(metrics.run()))
        try:
            yield driver, logs, metrics
        finally:
            await driver.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def run_app(driver: ProcessDriver, placed: Placed, command: str) -> None:
    """Start `command` as the placed container (it need not listen on its port)."""
    await driver.start(
        ContainerSpec(
            container_id=placed.container_id,
            deployment_id=placed.deployment_id,
            project_id=placed.project_id,
            command=command,
        )
    )


# ------------------------------------------------------------------------------ reads


async def stored_lines(admin_url: str, container_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(admin_url)
    try:
        return await conn.fetch(
            "SELECT sequence, line, stream, emitted_at FROM runtime.logs"
            " WHERE container_id = $1 ORDER BY sequence",
            container_id,
        )
    finally:
        await conn.close()


async def eventually(check: Callable[[], Any], within: float = 5.0, every: float = 0.05) -> Any:
    """Await `check()` until it returns something truthy; its last value otherwise fails."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {value!r}")
        await asyncio.sleep(every)


def ts(value: datetime) -> Any:
    from google.protobuf import timestamp_pb2

    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def log_line(container_id: str, sequence: int, text: str, at: datetime) -> pb.LogLine:
    return pb.LogLine(
        container_id=container_id,
        stream=pb.LOG_STREAM_STDOUT,
        line=text,
        emitted_at=ts(at),
        sequence=sequence,
    )
