"""Failover: a server whose agent falls silent is marked down, and what ran there starts
again on another server of its region (a new release, reason failover), with capacity
counted once; when the silent agent comes back, the container it kept running is stopped,
not doubled. Runtime and both agents are real processes (the agents' process driver, whose
apps outlive a SIGKILLed agent, like a machine cut off the network)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from hangar.agent.v1 import agent_pb2
from hangar.runtime.v1 import runtime_pb2 as pb
from hangar.runtime.v1 import runtime_pb2_grpc
from shared.db import Database
from shared.ids import new_id
from shared.migrate import migrate
from shared.resources import Resources
from shared.settings import Settings
from tests.support.agent import RunningAgent, start_agent_process
from tests.support.procs import ServiceProcess, free_port
from tests.support.project import Stack, running_stack
from tests.support.runtime import (
    agent_env,
    assert_invariant,
    live_runtime_settings,
    region_name,
    register_server,
    settings_env,
    wait_for_deployment,
)

pytestmark = pytest.mark.slow

HTTP_SERVER = 'exec python3 -m http.server "$PORT"'
HEARTBEAT_TIMEOUT = 3.0


@dataclass
class Agent:
    name: str
    state_dir: str
    running: RunningAgent
    server_id: str = ""


@dataclass
class Fleet:
    stack: Stack
    settings: Settings
    db: Database
    runtime: ServiceProcess
    region: str
    agents: list[Agent]

    def start_agent(self, agent: Agent, address: str = "") -> None:
        agent.running = start_agent_process(
            self.stack.identity.address,
            {
                **agent_env(self.stack.identity, self.settings.listen_address, agent.name),
                "HANGAR_AGENT_DRIVER": "process",
            },
            address=address or agent.running.address,
            state_dir=agent.state_dir,
        )

    def by_server(self, server_id: str) -> Agent:
        return next(a for a in self.agents if a.server_id == server_id)


@pytest.fixture(scope="module")
def failover_db(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    """A database of this module's own: a runtime fails over whatever is placed on a down
    server, and other modules leave servers that have gone silent."""
    url = create_database("hangar_failover")
    migrate(url, db_passwords)
    return url


@pytest.fixture
async def fleet(failover_db: str, db_passwords: dict[str, str]) -> AsyncIterator[Fleet]:
    async with running_stack(failover_db, db_passwords) as stack:
        address = f"127.0.0.1:{free_port()}"
        settings = live_runtime_settings(
            stack.identity,
            stack.project_address,
            address,
            runtime_heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT,
        )
        db = await Database.connect(settings.service_database_url(), max_size=5)
        region = region_name("failover")
        fleet = Fleet(stack, settings, db, None, region, [])  # type: ignore[arg-type]
        for _ in range(2):
            agent = Agent(
                f"agent-{new_id()}",
                tempfile.mkdtemp(prefix="hangar-agent-"),
                RunningAgent(f"127.0.0.1:{free_port()}"),
            )
            fleet.start_agent(agent)
            agent.server_id = await register_server(
                db, agent.name, region, agent.running.address, 1024, 1000
            )
            fleet.agents.append(agent)
        fleet.runtime = ServiceProcess.start("runtime", address, settings_env(settings))
        try:
            yield fleet
        finally:
            fleet.runtime.stop()
            for agent in fleet.agents:
                agent.running.state_dir = agent.state_dir
                await agent.running.close()
            await db.close()


@asynccontextmanager
async def running_release(
    fleet: Fleet, ram_mb: int, cpu_millis: int, deployment: pb.Deployment
) -> AsyncIterator[tuple[runtime_pb2_grpc.RuntimeServiceStub, Any, Any, pb.Deployment]]:
    """Runtime's API, a developer's metadata, a project of the fleet's region with these
    resources, and `deployment` of it once running."""
    channel = grpc.aio.insecure_channel(fleet.settings.listen_address)
    runtime = runtime_pb2_grpc.RuntimeServiceStub(channel)
    try:
        tenant = await fleet.stack.tenant("developer")
        dev = tenant.members["developer"].md
        project = await fleet.stack.create(
            tenant, region=fleet.region, ram_mb=ram_mb, cpu_millis=cpu_millis
        )
        created = await runtime.CreateDeployment(
            pb.CreateDeploymentRequest(project_id=project.id, deployment=deployment),
            metadata=dev,
        )
        running = await wait_for_deployment(
            runtime, created.id, dev, [pb.DEPLOYMENT_STATUS_RUNNING]
        )
        yield runtime, dev, project, running
    finally:
        await channel.close()


async def until(condition: Callable[[], Awaitable[bool]], what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.1)


async def test_a_silent_server_s_app_starts_again_elsewhere_and_comes_back_stopped(
    fleet: Fleet, failover_db: str
) -> None:
    stack = fleet.stack
    release = running_release(fleet, 128, 100, pb.Deployment(command=HTTP_SERVER))
    async with release as (runtime, dev, project, first):
        silent = fleet.by_server(first.server_id)
        other = next(a for a in fleet.agents if a is not silent)
        servers = [a.server_id for a in fleet.agents]

        # The agent dies without a word; its app runs on (nobody stops it).
        assert silent.running.process is not None
        silent.running.process.kill()
        address = silent.running.address

        failed = await wait_for_deployment(
            runtime, first.id, dev, [pb.DEPLOYMENT_STATUS_FAILED], within=60
        )
        assert "stopped answering" in failed.status_reason

        async def moved() -> pb.Deployment | None:
            listed = await runtime.ListDeployments(
                pb.ListDeploymentsRequest(project_id=project.id), metadata=dev
            )
            return next(
                (
                    d
                    for d in listed.deployments
                    if d.release_reason == pb.RELEASE_REASON_FAILOVER
                    and d.status == pb.DEPLOYMENT_STATUS_RUNNING
                ),
                None,
            )

        await until(lambda: _truthy(moved()), "the release running on the other server")
        again = await moved()
        assert again is not None and again.server_id == other.server_id
        assert again.command == first.command
        books = await assert_invariant(failover_db, servers)
        assert books[silent.server_id].reserved == Resources(0, 0)  # released once
        assert books[other.server_id].reserved == Resources(128, 100)

        # The silent agent comes back (adopting the app it left running): runtime stops that
        # stale container; the project still runs once, on the other server.
        fleet.start_agent(silent, address)
        token = await stack.identity.service_token("runtime")

        async def stale_stopped() -> bool:
            listed = await silent.running.stub.ListContainers(
                agent_pb2.ListContainersRequest(),
                metadata=(("authorization", f"Bearer {token}"),),
            )
            return all(
                c.status in (agent_pb2.CONTAINER_STATUS_EXITED, agent_pb2.CONTAINER_STATUS_FAILED)
                for c in listed.containers
            )

        await until(stale_stopped, "the stale container on the returning server to stop")
        listed = await runtime.ListDeployments(
            pb.ListDeploymentsRequest(project_id=project.id), metadata=dev
        )
        serving = [d for d in listed.deployments if d.status == pb.DEPLOYMENT_STATUS_RUNNING]
        assert [d.id for d in serving] == [again.id]
        books = await assert_invariant(failover_db, servers)
        assert books[silent.server_id].reserved == Resources(0, 0)


async def _truthy(value: Awaitable[object]) -> bool:
    return bool(await value)


async def test_a_replica_on_a_silent_server_starts_again_while_its_sibling_serves_on(
    fleet: Fleet, failover_db: str
) -> None:
    release = running_release(fleet, 256, 200, pb.Deployment(command=HTTP_SERVER, replicas=2))
    async with release as (runtime, dev, project, first):

        async def replicas() -> list[pb.Deployment]:
            listed = await runtime.ListDeployments(
                pb.ListDeploymentsRequest(project_id=project.id), metadata=dev
            )
            return sorted(
                (d for d in listed.deployments if d.replica_set_id == first.id),
                key=lambda d: (d.replica_index, d.created_at.ToDatetime()),
            )

        both = await replicas()
        assert [d.status for d in both] == [pb.DEPLOYMENT_STATUS_RUNNING] * 2
        assert len({d.server_id for d in both}) == 2  # one on each server
        assert all(d.resources.ram_mb == 128 and d.resources.cpu_millis == 100 for d in both)
        lost, survivor = both
        silent = fleet.by_server(lost.server_id)
        assert silent.running.process is not None
        silent.running.process.kill()

        async def replaced() -> bool:
            found = await replicas()
            return any(
                d.release_reason == pb.RELEASE_REASON_FAILOVER
                and d.status == pb.DEPLOYMENT_STATUS_RUNNING
                for d in found
            )

        await until(replaced, "replica 0 running again on the other server", within=120)
        found = await replicas()
        again = next(d for d in found if d.release_reason == pb.RELEASE_REASON_FAILOVER)
        assert (again.replica_set_id, again.replica_index) == (first.id, 0)
        # The only server left: next to its sibling, since no other has room.
        assert again.server_id == survivor.server_id
        kept = next(d for d in found if d.id == survivor.id)
        assert kept.status == pb.DEPLOYMENT_STATUS_RUNNING  # it served all along
        assert kept.updated_at == survivor.updated_at  # and never changed state
        books = await assert_invariant(failover_db, [a.server_id for a in fleet.agents])
        assert books[silent.server_id].reserved == Resources(0, 0)
        assert books[survivor.server_id].reserved == Resources(256, 200)
