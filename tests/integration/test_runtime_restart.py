"""Restarts as runtime sees them: real identity, project and billing (in this process),
runtime with its loops, and a real `hangar serve agent` process that restarts crashed apps
itself and reports it. A deployment whose app keeps crashing is CRASH_LOOP (its capacity
still reserved) and running again once the app stays up; a release that never becomes
healthy leaves the one serving alone; a project's restart policy and liveness check are
set through the gateway and reach the agent with each new deployment.

The agent runs apps as plain processes here (HANGAR_AGENT_DRIVER=process) so that a test
can break and mend an app through a file on this machine; restarts in containers are tested
with the agent's drivers in test_agent_restart.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from hangar.agent.v1 import agent_pb2 as apb
from hangar.project.v1 import project_pb2 as ppb
from hangar.runtime.v1 import runtime_pb2 as pb
from hangar.runtime.v1 import runtime_pb2_grpc
from services.gateway.app import Gateway
from services.runtime.server import RuntimeApp
from shared.db import Database
from shared.ids import new_id
from shared.server import RunningServer, start_server
from shared.settings import Settings
from tests.integration.test_gateway_transcoding import serving
from tests.support.agent import RunningAgent, start_agent_process
from tests.support.identity import bearer
from tests.support.procs import free_port
from tests.support.project import Stack, Tenant, running_stack
from tests.support.runtime import (
    agent_env,
    assert_invariant,
    live_runtime_settings,
    register_server,
    wait_for_deployment,
)

pytestmark = pytest.mark.slow

D = pb
SERVE = 'exec python3 -m http.server --bind 127.0.0.1 "$PORT"'
CRASH_LOOP_AFTER = 3  # quick crashes in a row (the agent's setting here)


@dataclass
class Live:
    stack: Stack
    app: RuntimeApp
    server: RunningServer
    agent: RunningAgent
    server_id: str
    region: str
    runtime_address: str
    channel: grpc.aio.Channel

    @property
    def runtime(self) -> runtime_pb2_grpc.RuntimeServiceStub:
        return runtime_pb2_grpc.RuntimeServiceStub(self.channel)

    async def project(self, tenant: Tenant, **fields: object) -> ppb.Project:
        return await self.stack.create(tenant, region=self.region, **fields)

    async def deploy(self, project_id: str, md: object, command: str) -> pb.Deployment:
        return await self.runtime.CreateDeployment(
            pb.CreateDeploymentRequest(
                project_id=project_id, deployment=pb.Deployment(command=command)
            ),
            metadata=md,
        )

    async def wait(
        self, deployment_id: str, md: object, *statuses: int, within: float = 60
    ) -> pb.Deployment:
        return await wait_for_deployment(self.runtime, deployment_id, md, statuses, within)

    async def containers(self, project_id: str, md: object) -> list[pb.Container]:
        reply = await self.runtime.ListContainers(
            pb.ListContainersRequest(project_id=project_id), metadata=md
        )
        return list(reply.containers)

    async def container_of(self, deployment_id: str, project_id: str, md: object) -> pb.Container:
        (found,) = [
            c for c in await self.containers(project_id, md) if c.deployment_id == deployment_id
        ]
        return found

    async def agent_container(self, container_id: str) -> apb.Container:
        token = await self.stack.identity.service_token("runtime")
        return await self.agent.stub.GetContainer(
            apb.GetContainerRequest(container_id=container_id), metadata=bearer(token)
        )


@pytest.fixture(scope="module")
async def live(database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Live]:
    async with running_stack(database_url, db_passwords) as stack:
        region = f"restart-{new_id()}"
        runtime_address = f"127.0.0.1:{free_port()}"
        settings = live_runtime_settings(
            stack.identity, stack.project_address, runtime_address, single_tenant=True
        )
        db = await Database.connect(settings.service_database_url(), max_size=20)
        app = RuntimeApp(settings, db)
        server = await start_server(app, runtime_address, grace=0.5)
        name = f"agent-{new_id()}"
        env = {
            **agent_env(stack.identity, runtime_address, name),
            "HANGAR_AGENT_DRIVER": "process",
            "HANGAR_AGENT_START_TIMEOUT_SECONDS": "8",
            "HANGAR_AGENT_RESTART_BACKOFF_SECONDS": "0.05",
            "HANGAR_AGENT_RESTART_MAX_BACKOFF_SECONDS": "0.2",
            "HANGAR_AGENT_RESTART_STABLE_SECONDS": "1",
            "HANGAR_AGENT_CRASH_LOOP_RESTARTS": str(CRASH_LOOP_AFTER),
        }
        agent = start_agent_process(stack.identity.address, env)
        server_id = await register_server(db, name, region, agent.address, 1024, 1000)
        channel = grpc.aio.insecure_channel(runtime_address)
        try:
            yield Live(stack, app, server, agent, server_id, region, runtime_address, channel)
        finally:
            await channel.close()
            await agent.close()
            await server.stop()


async def _http(address: str, path: str = "/") -> httpx.Response:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        return await client.get(f"http://{address}{path}")


async def _until(check: Any, what: str, within: float = 60) -> Any:
    deadline = time.monotonic() + within
    while not (found := await check()):
        assert time.monotonic() < deadline, f"no {what}"
        await asyncio.sleep(0.1)
    return found


async def test_a_crash_looping_deployment_keeps_its_capacity_and_runs_again_once_mended(
    live: Live, database_url: str, tmp_path: Path
) -> None:
    tenant = await live.stack.tenant("developer")
    dev = tenant.members["developer"].md
    project = await live.project(tenant, ram_mb=128, cpu_millis=100)
    broken = tmp_path / "broken"
    command = (
        f'if [ -e {broken} ]; then echo "cannot start: {broken.name}" >&2; exit 4; fi; {SERVE}'
    )
    created = await live.deploy(project.id, dev, command)
    await live.wait(created.id, dev, D.DEPLOYMENT_STATUS_RUNNING)
    before = await live.container_of(created.id, project.id, dev)
    assert (await _http(before.address)).status_code == 200
    pid = (await live.agent_container(before.id)).pid

    # It breaks: killed, and every start after that fails at once.
    broken.touch()
    os.kill(pid, signal.SIGKILL)
    looping = await live.wait(created.id, dev, D.DEPLOYMENT_STATUS_CRASH_LOOP)
    reason = looping.status_reason
    assert reason.startswith("exited with code 4 (crash loop: restarted"), reason
    assert "last log lines:\ncannot start: broken" in reason
    assert looping.capacity_reserved  # still placed
    counters = await assert_invariant(database_url, [live.server_id])
    assert counters[live.server_id].reserved.ram_mb >= 128
    container = await live.container_of(created.id, project.id, dev)
    assert container.id == before.id and container.address == before.address
    assert container.crash_loop and container.restart_count >= CRASH_LOOP_AFTER - 1
    assert container.last_exit_reason == "exited with code 4"
    # Its event and audit entry say why, without the app's output (the trail is kept).
    async with live.app.db.session() as s:
        said = await s.fetch(
            """SELECT type, payload FROM runtime.outbox
                WHERE aggregate_id = $1 AND payload::text LIKE '%crash_loop%'""",
            created.id,
        )
    assert len(said) >= 2 and all("cannot start" not in row["payload"] for row in said)

    # Mended: the next start answers, stays up, and the deployment runs again.
    broken.unlink()
    running = await live.wait(created.id, dev, D.DEPLOYMENT_STATUS_RUNNING)
    assert running.status_reason == "" and running.capacity_reserved
    after = await live.container_of(created.id, project.id, dev)
    assert after.status == D.CONTAINER_STATUS_RUNNING and not after.crash_loop
    assert after.address == before.address and after.restart_count >= container.restart_count
    assert (await _http(after.address)).status_code == 200
    assert await assert_invariant(database_url, [live.server_id])

    # A crash-looping deployment can be cancelled: it stops and releases its capacity.
    broken.touch()
    os.kill((await live.agent_container(after.id)).pid, signal.SIGKILL)
    await live.wait(created.id, dev, D.DEPLOYMENT_STATUS_CRASH_LOOP)
    cancelled = await live.runtime.CancelDeployment(
        pb.CancelDeploymentRequest(id=created.id), metadata=dev
    )
    assert cancelled.status == D.DEPLOYMENT_STATUS_CANCELLED and not cancelled.capacity_reserved

    async def stopped() -> bool:
        return (await live.agent_container(after.id)).status == apb.CONTAINER_STATUS_EXITED and (
            await live.containers(project.id, dev) == []
        )

    await _until(stopped, "stop of the cancelled app")
    assert await assert_invariant(database_url, [live.server_id])


async def test_a_release_that_never_becomes_healthy_leaves_the_previous_one_serving(
    live: Live, database_url: str
) -> None:
    tenant = await live.stack.tenant("developer")
    dev = tenant.members["developer"].md
    project = await live.project(tenant, ram_mb=100, cpu_millis=100, health_check_path="/healthz")
    good = await live.deploy(project.id, dev, f"echo ok > healthz; {SERVE}")
    await live.wait(good.id, dev, D.DEPLOYMENT_STATUS_RUNNING)
    serving_one = await live.container_of(good.id, project.id, dev)
    before = (await assert_invariant(database_url, [live.server_id]))[live.server_id].reserved

    # A release that crashes during its start-up, then one that never answers /healthz.
    crashing = await live.deploy(project.id, dev, "echo 'bad release: no config' >&2; exit 5")
    failed = await live.wait(crashing.id, dev, D.DEPLOYMENT_STATUS_FAILED)
    assert failed.status_reason.startswith("exited with code 5 during start-up")
    assert "last log lines:\nbad release: no config" in failed.status_reason
    assert failed.exit_code == 5 and not failed.capacity_reserved
    silent = await live.deploy(project.id, dev, SERVE)  # no healthz file: 404
    timed_out = await live.wait(silent.id, dev, D.DEPLOYMENT_STATUS_FAILED)
    assert timed_out.status_reason.startswith("not healthy within 8s")
    assert not timed_out.capacity_reserved

    still = await live.runtime.GetDeployment(pb.GetDeploymentRequest(id=good.id), metadata=dev)
    assert still.status == D.DEPLOYMENT_STATUS_RUNNING and still.capacity_reserved
    (container,) = await live.containers(project.id, dev)
    assert container.id == serving_one.id and container.restart_count == 0
    assert (await _http(container.address, "/healthz")).text == "ok\n"
    after = (await assert_invariant(database_url, [live.server_id]))[live.server_id].reserved
    assert after == before


def _violations(body: dict[str, Any]) -> list[str]:
    for detail in body.get("details", []):
        if detail["@type"] == "type.googleapis.com/google.rpc.BadRequest":
            return [v["field"] for v in detail["fieldViolations"]]
    return []


async def test_restart_settings_are_set_through_the_gateway_and_reach_the_agent(
    live: Live, tmp_path: Path
) -> None:
    tenant = await live.stack.tenant("developer")
    dev = tenant.members["developer"]
    project = await live.project(tenant, ram_mb=100, cpu_millis=100)
    assert project.restart_policy == ppb.RESTART_POLICY_ON_FAILURE
    assert (project.liveness_period_seconds, project.liveness_failure_threshold) == (10, 3)
    stack = live.stack
    addresses = {
        "identity": stack.identity.address,
        "project": stack.project_address,
        "billing": stack.billing_address,
        "runtime": live.runtime_address,
    }
    gateway = Gateway(Settings(service="gateway", addresses=addresses, call_timeout_seconds=10))
    headers = {"Authorization": f"Bearer {dev.token}"}
    with serving(gateway) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:
            bad = await http.patch(
                f"/v1/projects/{project.id}",
                headers=headers,
                json={"livenessPeriodSeconds": -5, "livenessCheckPath": "healthz"},
            )
            assert bad.status_code == 400, bad.text
            assert sorted(_violations(bad.json())) == [
                "project.liveness_check_path",
                "project.liveness_period_seconds",
            ]
            bad = await http.patch(
                f"/v1/projects/{project.id}?updateMask=restartPolicy,livenessFailureThreshold",
                headers=headers,
                json={"livenessFailureThreshold": 0},
            )
            assert bad.status_code == 400, bad.text
            assert sorted(_violations(bad.json())) == [
                "project.liveness_failure_threshold",
                "project.restart_policy",
            ]
            changed = await http.patch(
                f"/v1/projects/{project.id}",
                headers=headers,
                json={
                    "restartPolicy": "RESTART_POLICY_NEVER",
                    "livenessCheckPath": "/live",
                    "livenessPeriodSeconds": 5,
                    "livenessFailureThreshold": 2,
                },
            )
            assert changed.status_code == 200, changed.text
            read = (await http.get(f"/v1/projects/{project.id}", headers=headers)).json()
            assert read["restartPolicy"] == "RESTART_POLICY_NEVER"
            assert (read["livenessCheckPath"], read["livenessPeriodSeconds"]) == ("/live", 5)
            assert read["livenessFailureThreshold"] == 2

    # The next deployment takes them (the liveness check passes: /live answers).
    command = f"mkdir live; {SERVE}"
    created = await live.deploy(project.id, dev.md, command)
    await live.wait(created.id, dev.md, D.DEPLOYMENT_STATUS_RUNNING)
    async with live.app.db.session() as s:
        row = await s.fetchrow(
            """SELECT restart_policy, liveness_check_path, liveness_period_seconds,
                      liveness_failure_threshold FROM runtime.deployments WHERE id = $1""",
            created.id,
        )
    assert row is not None and tuple(row.values()) == ("never", "/live", 5, 2)
    # Under never, a crash ends the deployment instead of a restart.
    container = await live.container_of(created.id, project.id, dev.md)
    os.kill((await live.agent_container(container.id)).pid, signal.SIGKILL)
    failed = await live.wait(created.id, dev.md, D.DEPLOYMENT_STATUS_FAILED)
    assert failed.status_reason.startswith("killed by SIGKILL"), failed.status_reason
    assert not failed.capacity_reserved
    assert (await live.agent_container(container.id)).restart_count == 0
