"""Telemetry for tests: runtime with the telemetry RPCs on a fixed loopback port (so it can be
restarted under the agent's feet), containers registered straight in runtime's tables, apps
run through the agent's ProcessDriver, and the agent's shippers pointed at runtime with the
test token "service:agent"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import grpc
import pytest

from hangar.runtime.v1 import runtime_pb2 as pb
from hangar.runtime.v1 import runtime_pb2_grpc
from services.agent.domain import ContainerSpec
from services.agent.drivers import ProcessDriver
from services.agent.shipping import LogShipper, MetricShipper
from services.runtime import store
from services.runtime.api import RuntimeApi
from services.runtime.domain import Resources
from services.runtime.server import RuntimeApp
from services.runtime.telemetry import Telemetry, UsageReport, UsageSender
from services.runtime.telemetry_api import TelemetryApi
from shared.db import Database
from shared.ids import new_id
from shared.server import RunningServer, start_server
from tests.support import runtime as runtime_support
from tests.support.procs import free_port
from tests.support.runtime import Memberships, ProjectDirectory, TokenNames, runtime_settings

# The permissions the telemetry RPCs ask for (identity grants both to viewers).
runtime_support.NEEDED.setdefault("logs.read", 1)
runtime_support.NEEDED.setdefault("metrics.read", 1)

AGENT_TOKEN = "service:agent"


async def _no_billing(reports: Sequence[UsageReport]) -> None:
    raise ConnectionError("no billing in this test")


def _api_class() -> type[RuntimeApi]:
    """RuntimeApi with the telemetry RPCs (until RuntimeApi has TelemetryApi as a base)."""
    if issubclass(RuntimeApi, TelemetryApi):
        return RuntimeApi
    return type("TelemetryRuntimeApi", (TelemetryApi, RuntimeApi), {})


class TelemetryRuntimeApp(RuntimeApp):
    def __init__(self, *args: Any, send_usage: UsageSender = _no_billing, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Always ours: the test decides where usage goes.
        self.telemetry = Telemetry(self.db, self.settings, send_usage)

    def register(self, server: grpc.aio.Server) -> None:
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(_api_class()(self), server)

    async def close(self) -> None:
        await self.telemetry.close()
        await super().close()


@dataclass
class TelemetryRuntime:
    address: str
    app: TelemetryRuntimeApp
    server: RunningServer
    channel: grpc.aio.Channel
    members: Memberships
    projects: ProjectDirectory

    @property
    def stub(self) -> runtime_pb2_grpc.RuntimeServiceStub:
        return runtime_pb2_grpc.RuntimeServiceStub(self.channel)

    @property
    def db(self) -> Database:
        return self.app.db


@dataclass
class Fleet:
    """Runtime replicas sharing one database and one view of who may read what."""

    database_url: str
    db_passwords: dict[str, str]
    members: Memberships = field(default_factory=Memberships)
    started: list[TelemetryRuntime] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.projects = ProjectDirectory(self.members)

    async def start(
        self, port: int = 0, *, send_usage: UsageSender = _no_billing, **settings: Any
    ) -> TelemetryRuntime:
        values = {
            "telemetry_sample_seconds": 1.0,
            "telemetry_usage_window_seconds": 60.0,
            "telemetry_usage_lateness_seconds": 0.0,
            **settings,
        }
        config = runtime_settings(self.database_url, self.db_passwords, **values)
        db = await Database.connect(config.service_database_url(), min_size=1, max_size=20)
        app = TelemetryRuntimeApp(
            config,
            db,
            authorizer=self.members,
            projects=self.projects,
            background=False,
            send_usage=send_usage,
        )
        address = f"127.0.0.1:{port or free_port()}"
        server = await start_server(app, address, authenticator=TokenNames(), grace=0.2)
        channel = grpc.aio.insecure_channel(address)
        running = TelemetryRuntime(address, app, server, channel, self.members, self.projects)
        self.started.append(running)
        return running

    async def stop(self, runtime: TelemetryRuntime) -> None:
        if runtime in self.started:
            self.started.remove(runtime)
            await runtime.channel.close()
            await runtime.server.stop()

    def new_project(self, owner: str, org: str = "") -> tuple[str, str]:
        org = org or new_id()
        project = new_id()
        self.projects.organizations[project] = org
        self.members.roles[(org, owner)] = "owner"
        return org, project


@pytest.fixture
async def fleet(database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Fleet]:
    running = Fleet(database_url, db_passwords)
    yield running
    for runtime in list(running.started):
        await running.stop(runtime)


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
                   status, command, ram_mb, cpu_millis, region)
               VALUES ($1, $2, $3, $4, 'starting', 'app', 128, 100, 'local') RETURNING id""",
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


async def agent_token() -> str:
    return AGENT_TOKEN


@asynccontextmanager
async def agent_channel(address: str) -> AsyncIterator[runtime_pb2_grpc.RuntimeServiceStub]:
    """What the agent's shippers talk through (its service token on every call)."""
    from services.agent.shipping import RUNTIME_SERVICE
    from shared.clients import open_channel

    channel = open_channel(address, services=[RUNTIME_SERVICE], token_provider=agent_token)
    try:
        yield runtime_pb2_grpc.RuntimeServiceStub(channel)
    finally:
        await channel.close()


@asynccontextmanager
async def shipping_agent(
    runtime_address: str,
    *,
    server: str = "",
    log_lines: int = 5000,
    metrics_interval: float = 0.0,
    batch_lines: int = 2000,
) -> AsyncIterator[tuple[ProcessDriver, LogShipper, MetricShipper]]:
    """A ProcessDriver running real app processes, with its shippers running against
    runtime (the metric loop only when metrics_interval > 0)."""
    driver = ProcessDriver(start_timeout=10, stop_grace=1, log_lines=log_lines)
    async with agent_channel(runtime_address) as stub:
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
