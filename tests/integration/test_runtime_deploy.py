"""Deployments that really run: real identity, project and billing (in this process), runtime
with its loops, and a real `hangar serve agent` process that reports back. Apps are real
`python3 -m http.server` processes answering on their container address."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from hangar.agent.v1 import agent_pb2 as apb
from hangar.project.v1 import project_pb2 as ppb
from hangar.runtime.v1 import runtime_pb2 as pb
from hangar.runtime.v1 import runtime_pb2_grpc
from services.runtime.server import RuntimeApp
from shared.db import Database
from shared.ids import new_id
from shared.server import RunningServer, start_server
from tests.support.agent import RunningAgent, alive, start_agent_process
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
SERVE = 'exec python3 -m http.server "$PORT"'


@dataclass
class Live:
    stack: Stack
    app: RuntimeApp
    server: RunningServer
    agent: RunningAgent
    server_id: str
    region: str
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

    async def wait(self, deployment_id: str, md: object, *statuses: int) -> pb.Deployment:
        return await wait_for_deployment(self.runtime, deployment_id, md, statuses)

    async def agent_container(self, container_id: str) -> apb.Container:
        token = await self.stack.identity.service_token("runtime")
        return await self.agent.stub.GetContainer(
            apb.GetContainerRequest(container_id=container_id), metadata=bearer(token)
        )

    async def containers(self, project_id: str, md: object) -> list[pb.Container]:
        reply = await self.runtime.ListContainers(
            pb.ListContainersRequest(project_id=project_id), metadata=md
        )
        return list(reply.containers)

    async def only_container(self, project_id: str, md: object, deployment_id: str) -> pb.Container:
        """The project's one container, once the listing has settled on `deployment_id`'s: the
        agent reports a replaced app's end a moment after its process is gone."""
        deadline = time.monotonic() + 30
        while True:
            listed = await self.containers(project_id, md)
            if len(listed) == 1 and listed[0].deployment_id == deployment_id:
                return listed[0]
            assert time.monotonic() < deadline, f"containers did not settle: {listed}"
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def live(database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Live]:
    async with running_stack(database_url, db_passwords) as stack:
        region = f"deploy-{new_id()}"
        runtime_address = f"127.0.0.1:{free_port()}"
        # Every test is another organization on this one server: single-tenant, as on a
        # development machine, so that an agent without isolation (the process driver) takes
        # them all (tenancy is tested in test_runtime_isolation.py).
        settings = live_runtime_settings(
            stack.identity, stack.project_address, runtime_address, single_tenant=True
        )
        db = await Database.connect(settings.service_database_url(), max_size=20)
        app = RuntimeApp(settings, db)
        server = await start_server(app, runtime_address, grace=0.5)
        name = f"agent-{new_id()}"
        # Sleep stops apps here at once (the container driver's first step, freezing, is
        # tested with the driver in test_agent_containers.py).
        env = {
            **agent_env(stack.identity, runtime_address, name),
            "HANGAR_AGENT_FREEZE_SECONDS": "0",
        }
        agent = start_agent_process(stack.identity.address, env)
        server_id = await register_server(db, name, region, agent.address, 1024, 1000)
        channel = grpc.aio.insecure_channel(runtime_address)
        try:
            yield Live(stack, app, server, agent, server_id, region, channel)
        finally:
            await channel.close()
            await agent.close()
            await server.stop()


async def _gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def _http(address: str, path: str = "/") -> httpx.Response:
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        return await client.get(f"http://{address}{path}")


async def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def test_the_agent_heartbeats_and_its_server_is_active(live: Live) -> None:
    async def beating() -> bool:
        async with live.app.db.session() as s:
            row = await s.fetchrow(
                "SELECT status, last_heartbeat_at FROM runtime.servers WHERE id = $1",
                live.server_id,
            )
        return row is not None and row["last_heartbeat_at"] is not None

    deadline = time.monotonic() + 15
    while not await beating():
        assert time.monotonic() < deadline, "no heartbeat from the agent"
        await asyncio.sleep(0.2)


async def test_a_command_runs_serves_http_with_its_secret_and_stops_when_replaced(
    live: Live, database_url: str
) -> None:
    tenant = await live.stack.tenant("developer", "viewer")
    dev, viewer = tenant.members["developer"].md, tenant.members["viewer"].md
    project = await live.project(tenant, ram_mb=128, cpu_millis=100)
    greeting = f"hello-{secrets.token_hex(6)}"
    await live.stack.project.SetSecret(
        ppb.SetSecretRequest(project_id=project.id, name="GREETING", value=greeting),
        metadata=dev,
    )
    command = f'printf %s "$GREETING" > greeting.txt; {SERVE}'
    created = await live.deploy(project.id, dev, command)
    # The call returns before the app runs: clients poll.
    assert created.status in (D.DEPLOYMENT_STATUS_SCHEDULING, D.DEPLOYMENT_STATUS_STARTING)
    assert created.capacity_reserved and created.server_id == live.server_id
    assert (created.resources.ram_mb, created.resources.cpu_millis) == (128, 100)
    first = await live.wait(created.id, viewer, D.DEPLOYMENT_STATUS_RUNNING)
    assert first.secrets_version and first.capacity_reserved

    (container,) = await live.containers(project.id, viewer)
    assert container.status == D.CONTAINER_STATUS_RUNNING
    assert container.deployment_id == first.id and container.server_id == live.server_id
    assert container.sleep_status == D.SLEEP_STATUS_AWAKE
    served = await _http(container.address, "/greeting.txt")
    assert served.status_code == 200 and served.text == greeting
    pid = (await live.agent_container(container.id)).pid
    assert alive(pid)
    assert (await assert_invariant(database_url, [live.server_id]))[live.server_id]

    # A second deployment supersedes the first: its process ends, its capacity returns.
    second = await live.deploy(project.id, dev, f"echo two; {SERVE}")
    await live.wait(second.id, dev, D.DEPLOYMENT_STATUS_RUNNING)
    old = await live.wait(first.id, dev, D.DEPLOYMENT_STATUS_SUPERSEDED)
    assert not old.capacity_reserved and second.id in old.status_reason
    assert await _gone(pid), "the superseded app still runs"
    now_running = await live.only_container(project.id, viewer, second.id)
    assert (await _http(now_running.address)).status_code == 200
    second_pid = (await live.agent_container(now_running.id)).pid

    # Rollback over gRPC: the first spec runs again, the second ends rolled_back.
    rollback = await live.runtime.RollbackDeployment(
        pb.RollbackDeploymentRequest(id=second.id), metadata=dev
    )
    assert rollback.rolled_back_from == second.id and rollback.command == command
    await live.wait(rollback.id, dev, D.DEPLOYMENT_STATUS_RUNNING)
    rolled = await live.wait(second.id, dev, D.DEPLOYMENT_STATUS_ROLLED_BACK)
    assert not rolled.capacity_reserved
    assert await _gone(second_pid)
    back = await live.only_container(project.id, viewer, rollback.id)
    assert (await _http(back.address, "/greeting.txt")).text == greeting

    # Cancel while starting: the half-started app is stopped and its capacity released.
    slow = await live.deploy(project.id, dev, f"sleep 30; {SERVE}")
    await live.wait(slow.id, dev, D.DEPLOYMENT_STATUS_STARTING)
    slow_container = next(
        c for c in await live.containers(project.id, viewer) if c.deployment_id == slow.id
    )
    slow_pid = (await live.agent_container(slow_container.id)).pid
    cancelled = await live.runtime.CancelDeployment(
        pb.CancelDeploymentRequest(id=slow.id), metadata=dev
    )
    assert cancelled.status == D.DEPLOYMENT_STATUS_CANCELLED and not cancelled.capacity_reserved
    assert await _gone(slow_pid), "the cancelled app still runs"
    counters = await assert_invariant(database_url, [live.server_id])
    assert counters[live.server_id].reserved.ram_mb >= 128  # the rollback still runs


async def test_a_replaced_app_drains_then_stops(live: Live) -> None:
    # The drain time is long (a minute) while the new release takes over, so the old app is
    # certainly still there when looked at; then it is cut to nothing and the next sweep stops
    # it. Both reconcilers (the sweep's stop_ended, the agents' check) leave it alone before.
    live.app.deployer.drain_seconds = 60.0
    try:
        tenant = await live.stack.tenant("developer")
        dev = tenant.members["developer"].md
        project = await live.project(tenant, ram_mb=64, cpu_millis=50)
        first = await live.deploy(project.id, dev, SERVE)
        await live.wait(first.id, dev, D.DEPLOYMENT_STATUS_RUNNING)
        (old,) = await live.containers(project.id, dev)
        pid = (await live.agent_container(old.id)).pid
        second = await live.deploy(project.id, dev, f"echo two; {SERVE}")
        await live.wait(second.id, dev, D.DEPLOYMENT_STATUS_RUNNING)
        replaced = await live.wait(first.id, dev, D.DEPLOYMENT_STATUS_SUPERSEDED)
        assert not replaced.capacity_reserved
        await live.app.deployer.stop_ended()
        # The agents' check, once ours: the app's own loop may hold its lock for a pass.
        deadline = time.monotonic() + 60
        while await live.app.deployer.reconcile() is None:
            assert time.monotonic() < deadline, "the agents' check never became free"
            await asyncio.sleep(0.05)
        assert alive(pid), "the replaced app stopped before its drain time"
        assert (await _http(old.address)).status_code == 200  # still answers in-flight work
        live.app.deployer.drain_seconds = 0.0
        await live.app.deployer.stop_ended()
        assert await _gone(pid), "the drained app still runs"
    finally:
        live.app.deployer.drain_seconds = 0.0


async def test_a_command_that_exits_at_once_fails_with_its_exit_code_and_releases(
    live: Live, database_url: str
) -> None:
    tenant = await live.stack.tenant("developer")
    dev = tenant.members["developer"].md
    project = await live.project(tenant, ram_mb=200, cpu_millis=100)
    before = (await assert_invariant(database_url, [live.server_id]))[live.server_id].reserved
    created = await live.deploy(project.id, dev, "echo bye; exit 3")
    failed = await live.wait(created.id, dev, D.DEPLOYMENT_STATUS_FAILED)
    assert failed.exit_code == 3 and "code 3" in failed.status_reason
    assert not failed.capacity_reserved
    after = (await assert_invariant(database_url, [live.server_id]))[live.server_id].reserved
    assert after == before
    assert await live.containers(project.id, dev) == []


async def test_illegal_transitions_and_images_are_refused(live: Live) -> None:
    tenant = await live.stack.tenant("developer")
    dev = tenant.members["developer"].md
    project = await live.project(tenant)
    # Images run only in the container sandbox: a region where no server runs it refuses.
    elsewhere = await live.stack.create(tenant, region=f"bare-{new_id()[:12]}")
    image = pb.CreateDeploymentRequest(
        project_id=elsewhere.id, deployment=pb.Deployment(image="nginx:1.27")
    )
    assert await _code(live.runtime.CreateDeployment(image, metadata=dev)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    created = await live.deploy(project.id, dev, SERVE)
    await live.wait(created.id, dev, D.DEPLOYMENT_STATUS_RUNNING)
    precondition = grpc.StatusCode.FAILED_PRECONDITION
    cancel = pb.CancelDeploymentRequest(id=created.id)
    assert await _code(live.runtime.CancelDeployment(cancel, metadata=dev)) == precondition
    rollback = pb.RollbackDeploymentRequest(id=created.id)  # nothing ran before it
    assert await _code(live.runtime.RollbackDeployment(rollback, metadata=dev)) == precondition
    got = await live.runtime.GetDeployment(pb.GetDeploymentRequest(id=created.id), metadata=dev)
    assert got.status == D.DEPLOYMENT_STATUS_RUNNING and got.capacity_reserved


async def test_project_deletion_stops_the_app_and_releases_capacity(
    live: Live, database_url: str
) -> None:
    tenant = await live.stack.tenant("developer")
    dev = tenant.members["developer"].md
    project = await live.project(tenant, ram_mb=100, cpu_millis=50)
    before = (await assert_invariant(database_url, [live.server_id]))[live.server_id].reserved
    created = await live.deploy(project.id, dev, SERVE)
    await live.wait(created.id, dev, D.DEPLOYMENT_STATUS_RUNNING)
    (container,) = await live.containers(project.id, dev)
    pid = (await live.agent_container(container.id)).pid
    await live.stack.project.DeleteProject(
        ppb.DeleteProjectRequest(id=project.id), metadata=tenant.owner.md
    )
    assert await _gone(pid), "the deleted project's app still runs"
    async with live.app.db.session() as s:
        row = await s.fetchrow(
            "SELECT status, capacity_reserved, status_reason FROM runtime.deployments"
            " WHERE id = $1",
            created.id,
        )
    assert row["status"] == "failed" and not row["capacity_reserved"]
    assert "deleted" in row["status_reason"]
    after = (await assert_invariant(database_url, [live.server_id]))[live.server_id].reserved
    assert after == before
    # Applying the event again changes nothing (idempotent).
    async with live.app.db.transaction() as tx:
        assert await live.app.deployer.end_project(tx, project.id) == 0


async def test_every_org_scoped_rpc_across_tenants(live: Live) -> None:
    tenant = await live.stack.tenant("developer", "viewer")
    dev, viewer = tenant.members["developer"].md, tenant.members["viewer"].md
    project = await live.project(tenant)
    deployment = await live.deploy(project.id, dev, SERVE)
    await live.wait(deployment.id, dev, D.DEPLOYMENT_STATUS_RUNNING)
    stranger = (await live.stack.tenant()).owner.md  # owns another organization
    rt = live.runtime
    denied = grpc.StatusCode.PERMISSION_DENIED

    def calls(project_id: str, deployment_id: str, who: object) -> dict[str, object]:
        return {
            "CreateDeployment": rt.CreateDeployment(
                pb.CreateDeploymentRequest(
                    project_id=project_id, deployment=pb.Deployment(command=SERVE)
                ),
                metadata=who,
            ),
            "ListDeployments": rt.ListDeployments(
                pb.ListDeploymentsRequest(project_id=project_id), metadata=who
            ),
            "GetDeployment": rt.GetDeployment(
                pb.GetDeploymentRequest(id=deployment_id), metadata=who
            ),
            "RollbackDeployment": rt.RollbackDeployment(
                pb.RollbackDeploymentRequest(id=deployment_id), metadata=who
            ),
            "CancelDeployment": rt.CancelDeployment(
                pb.CancelDeploymentRequest(id=deployment_id), metadata=who
            ),
            "ListContainers": rt.ListContainers(
                pb.ListContainersRequest(project_id=project_id), metadata=who
            ),
        }

    # Outsiders: PERMISSION_DENIED, whether or not the thing exists (AIP-193).
    for target in ((project.id, deployment.id), (new_id(), new_id())):
        for name, call in calls(*target, stranger).items():
            assert await _code(call) == denied, (name, target)
    # Viewers read; writing needs developer.
    viewer_calls = calls(project.id, deployment.id, viewer)
    for name in ("CreateDeployment", "RollbackDeployment", "CancelDeployment"):
        assert await _code(viewer_calls[name]) == denied, name  # type: ignore[arg-type]
    for name in ("ListDeployments", "GetDeployment", "ListContainers"):
        await viewer_calls[name]  # type: ignore[misc]
    # Anonymous callers are UNAUTHENTICATED; agents and other services are not users.
    anonymous = rt.ListContainers(pb.ListContainersRequest(project_id=project.id))
    assert await _code(anonymous) == grpc.StatusCode.UNAUTHENTICATED
    user_beat = rt.Heartbeat(pb.HeartbeatRequest(server_id=live.server_id), metadata=dev)
    assert await _code(user_beat) == denied
    token = await live.stack.identity.service_token("project")
    project_beat = rt.Heartbeat(
        pb.HeartbeatRequest(server_id=live.server_id), metadata=bearer(token)
    )
    assert await _code(project_beat) == denied
    # Nothing the outsiders or the viewer tried changed the deployment.
    got = await rt.GetDeployment(pb.GetDeploymentRequest(id=deployment.id), metadata=dev)
    assert got.status == D.DEPLOYMENT_STATUS_RUNNING
    listed = await rt.ListDeployments(
        pb.ListDeploymentsRequest(project_id=project.id), metadata=dev
    )
    assert [d.id for d in listed.deployments] == [deployment.id]


async def test_a_silent_server_goes_down_takes_no_placement_and_comes_back_on_a_beat(
    live: Live,
) -> None:
    region = f"silent-{new_id()}"
    name = f"silent-{new_id()}"
    server_id = await register_server(live.app.db, name, region, "127.0.0.1:1", 512, 500)
    async with live.app.db.transaction() as tx:
        await tx.execute(
            "UPDATE runtime.servers SET last_heartbeat_at = now() - interval '1 hour'"
            " WHERE id = $1",
            server_id,
        )
    deadline = time.monotonic() + 10
    while True:
        async with live.app.db.session() as s:
            status = await s.fetchval("SELECT status FROM runtime.servers WHERE id = $1", server_id)
        if status == "down":
            break
        assert time.monotonic() < deadline, "the silent server is still active"
        await asyncio.sleep(0.2)
    from tests.support.runtime import spec

    queued = await live.app.scheduler.create(spec(region, 64, 10))
    assert not queued.server_id
    await live.app.scheduler.cancel(queued.id)
    token = await live.stack.identity.service_token("agent")
    reply = await live.runtime.Heartbeat(
        pb.HeartbeatRequest(server_id=name), metadata=bearer(token)
    )
    assert reply.server_status == D.SERVER_STATUS_ACTIVE


async def _eventually(check: object, within: float = 15.0) -> object:
    deadline = time.monotonic() + within
    while True:
        value = await check()  # type: ignore[operator]
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_an_idle_app_sleeps_keeps_its_capacity_and_wakes_on_the_next_request(
    live: Live, database_url: str
) -> None:
    """The sleep flow (docs/architecture.md, main flow 5) through the real path: the sleep
    controller finds the idle container
    (the clock is moved past the project's sleep_after_seconds), the agent stops the app and
    keeps its port; the next request starts it again and is served by it."""
    from datetime import UTC, datetime, timedelta

    tenant = await live.stack.tenant("viewer")
    owner, viewer = tenant.owner.md, tenant.members["viewer"].md
    project = await live.project(tenant, sleep_enabled=True, sleep_after_seconds=60)
    deployment = await live.deploy(project.id, owner, SERVE)
    await live.wait(deployment.id, owner, D.DEPLOYMENT_STATUS_RUNNING)
    (container,) = await live.containers(project.id, viewer)
    assert (await _http(container.address)).status_code == 200
    first_pid = (await live.agent_container(container.id)).pid
    reserved = (await assert_invariant(database_url, [live.server_id]))[live.server_id].reserved

    # Not idle yet at the real clock: nothing sleeps.
    assert (await live.app.sleeper.sleep_idle()).slept == 0
    later = datetime.now(UTC) + timedelta(hours=1)
    # Runtime may not know the last request yet (heartbeats carry it): the agent then
    # refuses (NOT_IDLE) with the request it saw, runtime records it, the next pass sleeps it.
    passes = [await live.app.sleeper.sleep_idle(now=later)]
    while not passes[-1].slept and len(passes) < 3:
        passes.append(await live.app.sleeper.sleep_idle(now=later))
    assert passes[-1].slept >= 1 and all(p.busy for p in passes[:-1]), passes
    (asleep,) = await live.containers(project.id, viewer)
    assert asleep.sleep_status == D.SLEEP_STATUS_SLEEPING
    assert asleep.status == D.CONTAINER_STATUS_RUNNING
    assert await _gone(first_pid), "the sleeping app still runs"
    running = await live.runtime.GetDeployment(
        pb.GetDeploymentRequest(id=deployment.id), metadata=viewer
    )
    assert running.status == D.DEPLOYMENT_STATUS_RUNNING and running.capacity_reserved
    now_reserved = (await assert_invariant(database_url, [live.server_id]))[live.server_id]
    assert now_reserved.reserved == reserved  # capacity stays reserved while asleep

    # The next request wakes it and is served by the started app.
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        assert (await client.get(f"http://{container.address}/")).status_code == 200
    woken = await live.agent_container(container.id)
    assert woken.sleep_status == apb.SLEEP_STATUS_AWAKE and woken.pid not in (0, first_pid)

    async def reported_awake() -> bool:
        (seen,) = await live.containers(project.id, viewer)
        return seen.sleep_status == D.SLEEP_STATUS_AWAKE and seen.HasField("last_request_at")

    await _eventually(reported_awake)

    # Sleep turned off on the project: the controller leaves it awake however idle.
    await live.stack.project.UpdateProject(
        ppb.UpdateProjectRequest(
            project=ppb.Project(id=project.id, sleep_enabled=False),
            update_mask={"paths": ["sleep_enabled"]},
        ),
        metadata=owner,
    )

    async def sleep_off() -> bool:
        row = await live.app.db.pool.fetchval(
            "SELECT sleep_after_seconds IS NULL FROM runtime.deployments WHERE id = $1",
            deployment.id,
        )
        return bool(row)

    await _eventually(sleep_off)
    await live.app.sleeper.sleep_idle(now=later + timedelta(days=1))
    (still,) = await live.containers(project.id, viewer)
    assert still.sleep_status == D.SLEEP_STATUS_AWAKE
    await live.stack.project.DeleteProject(  # its app stops, its capacity returns
        ppb.DeleteProjectRequest(id=project.id), metadata=owner
    )


async def test_two_sleep_controllers_at_once_sleep_each_idle_app_once(live: Live) -> None:
    """Two runtime replicas' passes at the same moment: one runs, the other stands aside
    (advisory lock), so no agent is asked twice."""
    from datetime import UTC, datetime, timedelta

    from services.runtime.sleeper import SleepController

    tenant = await live.stack.tenant()
    owner = tenant.owner.md
    project = await live.project(tenant, sleep_enabled=True, sleep_after_seconds=60)
    deployment = await live.deploy(project.id, owner, SERVE)
    await live.wait(deployment.id, owner, D.DEPLOYMENT_STATUS_RUNNING)
    (container,) = await live.containers(project.id, owner)
    replica = SleepController(live.app.db, live.app.agents)
    later = datetime.now(UTC) + timedelta(hours=1)
    passes = await asyncio.gather(
        live.app.sleeper.sleep_idle(now=later), replica.sleep_idle(now=later)
    )
    assert sum(p.slept for p in passes) == 1, passes
    assert (await live.agent_container(container.id)).sleep_status == apb.SLEEP_STATUS_SLEEPING
    again = await asyncio.gather(
        live.app.sleeper.sleep_idle(now=later), replica.sleep_idle(now=later)
    )
    assert sum(p.slept for p in again) == 0  # asleep: no longer idle-and-awake
    await live.stack.project.DeleteProject(ppb.DeleteProjectRequest(id=project.id), metadata=owner)
