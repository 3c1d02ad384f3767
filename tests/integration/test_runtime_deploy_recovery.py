"""Runtime killed in the middle of deployments (SIGKILL, no clean-up) and started again: what
was placed is handed to the agent, what was starting finishes, and what the agent no longer
runs ends failed with its capacity released. Runtime and the agent are real processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from hangar.runtime.v1 import runtime_pb2 as pb
from hangar.runtime.v1 import runtime_pb2_grpc
from services.runtime.scheduler import Scheduler
from services.runtime.store import DeploymentSpec
from shared.db import Database
from shared.ids import new_id
from shared.resources import Resources
from shared.settings import Settings
from tests.support.agent import RunningAgent, start_agent_process
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

D = pb
SLOW_SERVE = 'sleep {delay}; exec python3 -m http.server "$PORT"'


@dataclass
class Processes:
    stack: Stack
    settings: Settings
    db: Database
    runtime: ServiceProcess
    agent: RunningAgent
    agent_name: str
    region: str
    server_id: str

    def start_runtime(self) -> None:
        self.runtime = ServiceProcess.start(
            "runtime", self.settings.listen_address, settings_env(self.settings)
        )

    def kill_runtime(self) -> None:
        self.runtime.kill()  # SIGKILL: no graceful anything

    def start_agent(self) -> None:
        self.agent = start_agent_process(
            self.stack.identity.address,
            agent_env(self.stack.identity, self.settings.listen_address, self.agent_name),
            address=self.agent.address,
        )


@pytest.fixture
async def procs(database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Processes]:
    async with running_stack(database_url, db_passwords) as stack:
        address = f"127.0.0.1:{free_port()}"
        settings = live_runtime_settings(stack.identity, stack.project_address, address)
        db = await Database.connect(settings.service_database_url(), max_size=5)
        name = f"agent-{new_id()}"
        agent = start_agent_process(
            stack.identity.address, agent_env(stack.identity, address, name)
        )
        region = f"recover-{new_id()}"
        server_id = await register_server(db, name, region, agent.address, 1024, 1000)
        runtime = ServiceProcess.start("runtime", address, settings_env(settings))
        running = Processes(stack, settings, db, runtime, agent, name, region, server_id)
        try:
            yield running
        finally:
            running.runtime.stop()
            await running.agent.close()
            await db.close()


async def test_killed_runtime_restarts_and_the_reconciler_converges(
    procs: Processes, database_url: str
) -> None:
    stack = procs.stack
    channel = grpc.aio.insecure_channel(procs.settings.listen_address)
    runtime = runtime_pb2_grpc.RuntimeServiceStub(channel)
    try:
        tenant = await stack.tenant("developer")
        dev = tenant.members["developer"].md
        slow = await stack.create(tenant, region=procs.region, ram_mb=128, cpu_millis=100)
        placed_only = await stack.create(tenant, region=procs.region, ram_mb=64, cpu_millis=50)

        # 1. Killed while the app starts: after the restart it reaches running.
        first = await runtime.CreateDeployment(
            pb.CreateDeploymentRequest(
                project_id=slow.id, deployment=pb.Deployment(command=SLOW_SERVE.format(delay=3))
            ),
            metadata=dev,
        )
        await wait_for_deployment(runtime, first.id, dev, [D.DEPLOYMENT_STATUS_STARTING])
        procs.kill_runtime()
        # Killed after placing a deployment and before handing it to the agent (made here,
        # as the dead runtime would have left it): scheduling, capacity reserved, no container.
        orphan = await Scheduler(procs.db).create(
            DeploymentSpec(
                project_id=placed_only.id,
                organization_id=tenant.org_id,
                resources=Resources(64, 50),
                region=procs.region,
                command=SLOW_SERVE.format(delay=0),
            )
        )
        assert orphan.status.value == "scheduling" and orphan.server_id == procs.server_id
        procs.start_runtime()
        await wait_for_deployment(runtime, first.id, dev, [D.DEPLOYMENT_STATUS_RUNNING])
        await wait_for_deployment(runtime, orphan.id, dev, [D.DEPLOYMENT_STATUS_RUNNING])
        reserved = (await assert_invariant(database_url, [procs.server_id]))[procs.server_id]
        assert reserved.reserved == Resources(192, 150)

        # 2. Killed while starting, and the agent restarted meanwhile (its apps are gone):
        # the reconciler ends everything that agent no longer runs as failed, and releases.
        second = await runtime.CreateDeployment(
            pb.CreateDeploymentRequest(
                project_id=slow.id, deployment=pb.Deployment(command=SLOW_SERVE.format(delay=30))
            ),
            metadata=dev,
        )
        await wait_for_deployment(runtime, second.id, dev, [D.DEPLOYMENT_STATUS_STARTING])
        procs.kill_runtime()
        await procs.agent.close()  # SIGTERM: the agent stops its apps
        procs.start_agent()
        procs.start_runtime()
        for deployment_id in (second.id, first.id, orphan.id):
            failed = await wait_for_deployment(
                runtime, deployment_id, dev, [D.DEPLOYMENT_STATUS_FAILED]
            )
            assert not failed.capacity_reserved
            assert "does not run it" in failed.status_reason, failed
        found = await assert_invariant(database_url, [procs.server_id])
        assert found[procs.server_id].reserved == Resources(0, 0)
    finally:
        await channel.close()
