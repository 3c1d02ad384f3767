"""A server's agent killed (SIGKILL) while its apps run, and started again: runtime never
fails the deployments (the apps run on; the new agent adopts them before it answers), the
reserved counters stay exact, the apps' logs come through (those written meanwhile too),
and what runtime no longer wants is stopped once the agent is back. Runtime and the agent
are real processes."""

from __future__ import annotations

import asyncio
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from hangar.agent.v1 import agent_pb2 as apb
from hangar.runtime.v1 import runtime_pb2 as pb
from hangar.runtime.v1 import runtime_pb2_grpc
from services.runtime.scheduler import Scheduler
from shared.db import Database
from shared.ids import new_id
from shared.resources import Resources
from shared.settings import Settings
from tests.support.agent import RunningAgent, alive, start_agent_process
from tests.support.identity import bearer
from tests.support.procs import ServiceProcess, free_port
from tests.support.project import Stack, running_stack
from tests.support.runtime import (
    agent_env,
    assert_invariant,
    live_runtime_settings,
    register_server,
    settings_env,
    wait_for_deployment,
)

pytestmark = pytest.mark.slow

TICKER = (
    'i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 0.1; done & '
    'exec python3 -m http.server "$PORT"'
)
HTTP_SERVER = 'exec python3 -m http.server "$PORT"'


@dataclass
class Fleet:
    stack: Stack
    settings: Settings
    db: Database
    runtime: ServiceProcess
    agent: RunningAgent
    agent_name: str
    region: str
    server_id: str
    state_dir: str

    def start_agent(self) -> None:
        self.agent = start_agent_process(
            self.stack.identity.address,
            {
                **agent_env(self.stack.identity, self.settings.listen_address, self.agent_name),
                "HANGAR_AGENT_DRIVER": "process",
            },
            address=self.agent.address,
            state_dir=self.state_dir,
        )

    async def kill_agent(self) -> None:
        assert self.agent.process is not None
        self.agent.process.kill()
        self.agent.state_dir = ""  # the next agent's
        await self.agent.close()


@pytest.fixture
async def fleet(database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Fleet]:
    async with running_stack(database_url, db_passwords) as stack:
        address = f"127.0.0.1:{free_port()}"
        settings = live_runtime_settings(stack.identity, stack.project_address, address)
        db = await Database.connect(settings.service_database_url(), max_size=5)
        name = f"agent-{new_id()}"
        placeholder = RunningAgent(f"127.0.0.1:{free_port()}")
        region = f"restart-{new_id()}"
        fleet = Fleet(
            stack,
            settings,
            db,
            runtime=None,  # type: ignore[arg-type]
            agent=placeholder,
            agent_name=name,
            region=region,
            server_id="",
            state_dir=tempfile.mkdtemp(prefix="hangar-agent-"),
        )
        fleet.start_agent()
        fleet.server_id = await register_server(db, name, region, fleet.agent.address, 1024, 1000)
        fleet.runtime = ServiceProcess.start("runtime", address, settings_env(settings))
        try:
            yield fleet
        finally:
            fleet.runtime.stop()
            fleet.agent.state_dir = fleet.state_dir
            await fleet.agent.close()
            await db.close()


async def until(condition: Callable[[], Awaitable[bool]], what: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.1)


def last_tick(path: Path) -> int:
    """The last tick the app wrote to its output file (in the agent's state directory)."""
    return max(ticks(path.read_text().splitlines()), default=0)


def ticks(lines: list[str]) -> set[int]:
    return {int(m.group(1)) for line in lines if (m := re.fullmatch(r"tick (\d+)", line))}


async def test_a_killed_and_restarted_agent_leaves_its_deployments_running(
    fleet: Fleet, database_url: str
) -> None:
    stack = fleet.stack
    channel = grpc.aio.insecure_channel(fleet.settings.listen_address)
    runtime = runtime_pb2_grpc.RuntimeServiceStub(channel)
    watching = asyncio.Event()
    seen: set[int] = set()
    try:
        tenant = await stack.tenant("developer")
        dev = tenant.members["developer"].md
        web = await stack.create(tenant, region=fleet.region, ram_mb=128, cpu_millis=100)
        other = await stack.create(tenant, region=fleet.region, ram_mb=64, cpu_millis=50)
        kept = await runtime.CreateDeployment(
            pb.CreateDeploymentRequest(project_id=web.id, deployment=pb.Deployment(command=TICKER)),
            metadata=dev,
        )
        dropped = await runtime.CreateDeployment(
            pb.CreateDeploymentRequest(
                project_id=other.id, deployment=pb.Deployment(command=HTTP_SERVER)
            ),
            metadata=dev,
        )
        for deployment in (kept, dropped):
            await wait_for_deployment(runtime, deployment.id, dev, [pb.DEPLOYMENT_STATUS_RUNNING])
        found = await assert_invariant(database_url, [fleet.server_id])
        assert found[fleet.server_id].reserved == Resources(192, 150)
        (container,) = (
            await runtime.ListContainers(pb.ListContainersRequest(project_id=web.id), metadata=dev)
        ).containers
        (dropped_container,) = (
            await runtime.ListContainers(
                pb.ListContainersRequest(project_id=other.id), metadata=dev
            )
        ).containers

        async def watch() -> None:  # what a client polling the deployment would see
            while watching.is_set():
                got = await runtime.GetDeployment(pb.GetDeploymentRequest(id=kept.id), metadata=dev)
                seen.add(got.status)
                await asyncio.sleep(0.1)

        watching.set()
        watcher = asyncio.create_task(watch())

        token = await stack.identity.service_token("runtime")
        app = await fleet.agent.stub.GetContainer(
            apb.GetContainerRequest(container_id=container.id), metadata=bearer(token)
        )
        output = Path(fleet.state_dir) / "apps" / container.id / "stdout"
        await fleet.kill_agent()
        assert alive(app.pid)  # the app runs on without its agent
        at_kill = last_tick(output)
        # While the agent is away, the other project's deployment ends (its container is
        # then one nobody wants), releasing its capacity at once.
        await Scheduler(fleet.db).fail(dropped.id, "ended while the agent was away")
        found = await assert_invariant(database_url, [fleet.server_id])
        assert found[fleet.server_id].reserved == Resources(128, 100)

        async def wrote_meanwhile() -> bool:
            return last_tick(output) >= at_kill + 20

        await until(wrote_meanwhile, "output written without an agent")
        fleet.start_agent()
        written_meanwhile = last_tick(output)
        agent = fleet.agent

        async def stopped(container_id: str) -> bool:
            got = await agent.stub.GetContainer(
                apb.GetContainerRequest(container_id=container_id), metadata=bearer(token)
            )
            return got.status == apb.CONTAINER_STATUS_EXITED and got.reason == "stopped"

        # Runtime stops what it no longer wants: the ended deployment's container, and one
        # it has never heard of (as when its organization was deleted with its rows).
        stranger = f"c-{secrets.token_hex(4)}"
        await agent.stub.StartContainer(
            apb.StartContainerRequest(container_id=stranger, command=HTTP_SERVER),
            metadata=bearer(token),
        )
        await until(lambda: stopped(dropped_container.id), "the unwanted container stopped")
        await until(lambda: stopped(stranger), "the unknown container stopped")

        # The kept app answers through its address again, its logs came through, and its
        # deployment never left running.
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            assert (await client.get(f"http://{container.address}/")).status_code == 200
        listed = (
            await runtime.ListContainers(pb.ListContainersRequest(project_id=web.id), metadata=dev)
        ).containers
        assert [(c.id, c.status) for c in listed] == [(container.id, pb.CONTAINER_STATUS_RUNNING)]

        async def logs_caught_up() -> bool:
            reply = await runtime.QueryLogs(
                pb.QueryLogsRequest(project_id=web.id, contains="tick", page_size=1000),
                metadata=dev,
            )
            shipped = ticks([entry.line for entry in reply.entries])
            return (
                bool(shipped)
                and max(shipped) > written_meanwhile
                and set(range(1, max(shipped) + 1)) <= shipped
            )

        await until(logs_caught_up, "every tick in runtime's logs", within=60)
        watching.clear()
        await watcher
        assert seen == {pb.DEPLOYMENT_STATUS_RUNNING}
        final = await runtime.GetDeployment(pb.GetDeploymentRequest(id=kept.id), metadata=dev)
        assert final.status == pb.DEPLOYMENT_STATUS_RUNNING and final.capacity_reserved
        found = await assert_invariant(database_url, [fleet.server_id])
        assert found[fleet.server_id].reserved == Resources(128, 100)
    finally:
        watching.clear()
        await channel.close()
