"""A server without isolation runs one organization's apps at a time: placement through the
front door (CreateDeployment over gRPC, with real identity, billing and project behind it)
on a real PostgreSQL, with concurrent callers; servers report their isolation with each
heartbeat, and admins read it in GET /v1/servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from hangar.runtime.v1 import runtime_pb2 as rpb
from hangar.type.v1 import resources_pb2
from services.agent.drivers import ProcessDriver
from services.agent.reporting import RuntimeReporter
from services.gateway.app import Gateway
from services.runtime import store
from services.runtime.domain import DeploymentState, Isolation, unisolated_reason
from services.runtime.scheduler import Scheduler
from shared.clients import Clients
from shared.ids import new_id
from shared.settings import SERVICES, Settings
from tests.integration.test_gateway_transcoding import serving
from tests.support.project import Tenant
from tests.support.runtime import (
    Neighbours,
    Runtime,
    add_servers,
    assert_invariant,
    launch_runtime,
    neighbours,  # noqa: F401  (module fixture)
    region_name,
    spec,
)

D = rpb.DeploymentStatus
Metadata = tuple[tuple[str, str], ...]
COMMAND = "python3 -m http.server $PORT"


async def _runtime(neighbours: Neighbours, **settings: object) -> Runtime:  # noqa: F811
    # Agents at add_servers' addresses never answer: placed deployments keep their capacity
    # while runtime retries the start, which outlives the test.
    return await launch_runtime(
        neighbours, runtime_start_timeout_seconds=600.0, call_timeout_seconds=60.0, **settings
    )


@pytest.fixture
async def runtime(neighbours: Neighbours) -> AsyncIterator[Runtime]:  # noqa: F811
    started = await _runtime(neighbours)
    yield started
    await started.stop()


@pytest.fixture
async def single_tenant_runtime(neighbours: Neighbours) -> AsyncIterator[Runtime]:  # noqa: F811
    started = await _runtime(neighbours, single_tenant=True)
    yield started
    await started.stop()


class Org:
    """An organization with a project in a region, deploying as its developer."""

    def __init__(self, tenant: Tenant, project_id: str) -> None:
        self.id = tenant.org_id
        self.project_id = project_id
        self.md: Metadata = tenant.members["developer"].md

    @classmethod
    async def make(cls, neighbours: Neighbours, region: str) -> Org:  # noqa: F811
        tenant = await neighbours.tenant("developer")
        project = await neighbours.stack.create(tenant, region=region, ram_mb=100, cpu_millis=100)
        return cls(tenant, project.id)

    async def deploy(self, runtime: Runtime) -> rpb.Deployment:
        return await runtime.stub.CreateDeployment(
            rpb.CreateDeploymentRequest(
                project_id=self.project_id, deployment=rpb.Deployment(command=COMMAND)
            ),
            metadata=self.md,
            timeout=120,
        )

    async def get(self, runtime: Runtime, deployment: rpb.Deployment) -> rpb.Deployment:
        return await runtime.stub.GetDeployment(
            rpb.GetDeploymentRequest(id=deployment.id), metadata=self.md
        )

    async def cancel(self, runtime: Runtime, *deployments: rpb.Deployment) -> None:
        await asyncio.gather(
            *(
                runtime.stub.CancelDeployment(
                    rpb.CancelDeploymentRequest(id=d.id), metadata=self.md, timeout=60
                )
                for d in deployments
            )
        )


async def _tenant_of(runtime: Runtime, server_id: str) -> str | None:
    async with runtime.db.session() as s:
        return (await store.get_server(s, server_id)).tenant_organization_id


async def test_another_organization_waits_for_an_unisolated_server_until_it_is_free(
    runtime: Runtime,
    neighbours: Neighbours,  # noqa: F811
    database_url: str,
) -> None:
    region = region_name("alone")
    (server,) = await add_servers(runtime.db, region, 1, 1024, 1000, isolation=Isolation.NONE)
    a, b = await Org.make(neighbours, region), await Org.make(neighbours, region)

    first, second = await a.deploy(runtime), await a.deploy(runtime)
    assert (first.status, first.server_id) == (D.DEPLOYMENT_STATUS_SCHEDULING, server)
    assert (second.status, second.server_id) == (D.DEPLOYMENT_STATUS_SCHEDULING, server)
    assert await _tenant_of(runtime, server) == a.id

    refused = await b.deploy(runtime)
    assert refused.status == D.DEPLOYMENT_STATUS_QUEUED
    assert not refused.server_id and not refused.capacity_reserved
    assert refused.status_reason == unisolated_reason(region)
    await runtime.app.scheduler.place_queued()  # the retry loop's pass: still in the way
    still = await b.get(runtime, refused)
    assert (still.status, still.status_reason) == (refused.status, refused.status_reason)

    await a.cancel(runtime, first)  # one of A's apps is left: still A's server
    await runtime.app.scheduler.place_queued()
    assert (await b.get(runtime, refused)).status == D.DEPLOYMENT_STATUS_QUEUED
    await a.cancel(runtime, second)  # A's last app gone: the server is free
    assert await _tenant_of(runtime, server) is None
    await runtime.app.scheduler.place_queued()
    placed = await b.get(runtime, refused)
    assert (placed.status, placed.server_id) == (D.DEPLOYMENT_STATUS_SCHEDULING, server)
    assert placed.capacity_reserved and placed.status_reason == ""
    assert await _tenant_of(runtime, server) == b.id
    await b.cancel(runtime, placed)
    assert await _tenant_of(runtime, server) is None
    await assert_invariant(database_url, [server])


async def test_another_organization_is_placed_on_an_isolating_server_beside_the_first(
    runtime: Runtime,
    neighbours: Neighbours,  # noqa: F811
    database_url: str,
) -> None:
    region = region_name("isolated")
    # The unisolated server (room for two) is the better fit; B may not use it once A runs
    # there.
    (bare,) = await add_servers(runtime.db, region, 1, 200, 200, isolation=Isolation.NONE)
    (boxed,) = await add_servers(runtime.db, region, 1, 4096, 4000)
    a, b = await Org.make(neighbours, region), await Org.make(neighbours, region)

    on_bare = await a.deploy(runtime)
    assert on_bare.server_id == bare
    next_to_a = await a.deploy(runtime)
    assert next_to_a.server_id == bare  # its own organization's server: still the best fit
    beside = await b.deploy(runtime)
    assert (beside.status, beside.server_id) == (D.DEPLOYMENT_STATUS_SCHEDULING, boxed)
    also = await a.deploy(runtime)  # bare is full now: A goes beside B
    assert (also.status, also.server_id) == (D.DEPLOYMENT_STATUS_SCHEDULING, boxed)
    await assert_invariant(database_url, [bare, boxed])
    await a.cancel(runtime, on_bare, next_to_a, also)
    await b.cancel(runtime, beside)
    assert await _tenant_of(runtime, bare) is None and await _tenant_of(runtime, boxed) is None


async def test_past_its_deadline_a_deployment_kept_out_by_another_organization_says_so(
    runtime: Runtime, database_url: str
) -> None:
    region = region_name("kept-out")
    (server,) = await add_servers(runtime.db, region, 1, 1024, 1000, isolation=Isolation.NONE)
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    scheduler = Scheduler(runtime.db, schedule_timeout_seconds=60, clock=lambda: now[0])
    holder = await scheduler.create(spec(region, 100, 100, organization_id=new_id()))
    assert holder.server_id == server
    waiting = await scheduler.create(spec(region, 100, 100, organization_id=new_id()))
    assert waiting.status is DeploymentState.QUEUED
    assert waiting.status_reason == unisolated_reason(region)
    now[0] += timedelta(seconds=61)
    await scheduler.place_queued()
    async with runtime.db.session() as s:
        failed = await store.get_deployment(s, waiting.id)
    assert failed.status is DeploymentState.FAILED and not failed.capacity_reserved
    assert failed.status_reason.startswith(unisolated_reason(region))
    await scheduler.cancel(holder.id)
    await assert_invariant(database_url, [server])


async def test_single_tenant_mode_places_any_organization_on_an_unisolated_server(
    single_tenant_runtime: Runtime,
    neighbours: Neighbours,  # noqa: F811
    database_url: str,
) -> None:
    runtime = single_tenant_runtime
    region = region_name("single")
    (server,) = await add_servers(runtime.db, region, 1, 1024, 1000, isolation=Isolation.NONE)
    a, b = await Org.make(neighbours, region), await Org.make(neighbours, region)
    first, second = await a.deploy(runtime), await b.deploy(runtime)
    assert (first.status, first.server_id) == (D.DEPLOYMENT_STATUS_SCHEDULING, server)
    assert (second.status, second.server_id) == (D.DEPLOYMENT_STATUS_SCHEDULING, server)
    await assert_invariant(database_url, [server])
    await a.cancel(runtime, first)
    await b.cancel(runtime, second)


async def test_two_organizations_racing_onto_one_empty_unisolated_server_never_share_it(
    runtime: Runtime,
    neighbours: Neighbours,  # noqa: F811
    database_url: str,
) -> None:
    region = region_name("tenancy-race")
    # Room for every call of both organizations: only tenancy can refuse them.
    (server,) = await add_servers(runtime.db, region, 1, 100_000, 100_000, isolation=Isolation.NONE)
    a, b = await Org.make(neighbours, region), await Org.make(neighbours, region)
    per_org = 40
    seen: list[int] = []
    stop = asyncio.Event()

    async def watch_tenants() -> None:
        conn = await asyncpg.connect(database_url)  # a superuser, reading while calls run
        try:
            while not stop.is_set():
                seen.append(
                    await conn.fetchval(
                        "SELECT count(DISTINCT organization_id) FROM runtime.deployments"
                        " WHERE server_id = $1 AND capacity_reserved",
                        server,
                    )
                )
                await asyncio.sleep(0.002)
        finally:
            await conn.close()

    watcher = asyncio.create_task(watch_tenants())
    created = await asyncio.gather(*(org.deploy(runtime) for _ in range(per_org) for org in (a, b)))
    stop.set()
    await watcher
    try:
        by_org = {a.id: created[0::2], b.id: created[1::2]}
        placed = {
            org: [d for d in ds if d.status == D.DEPLOYMENT_STATUS_SCHEDULING]
            for org, ds in by_org.items()
        }
        winners = [org for org, ds in placed.items() if ds]
        assert len(winners) == 1, {org: len(ds) for org, ds in placed.items()}
        (winner,) = winners
        (loser,) = set(by_org) - {winner}
        assert len(placed[winner]) == per_org
        assert all(d.server_id == server for d in placed[winner])
        assert all(
            d.status == D.DEPLOYMENT_STATUS_QUEUED and not d.server_id for d in by_org[loser]
        )
        assert seen and max(seen) <= 1
        assert await _tenant_of(runtime, server) == winner
        # A queue pass gives every waiting one the reason (a call that raced the winner's
        # commit may not have known it yet).
        await runtime.app.scheduler.place_queued()
        org = a if loser == a.id else b
        waiting = await asyncio.gather(*(org.get(runtime, d) for d in by_org[loser]))
        assert {(d.status, d.status_reason) for d in waiting} == {
            (D.DEPLOYMENT_STATUS_QUEUED, unisolated_reason(region))
        }
        await assert_invariant(database_url, [server])
    finally:
        # Leave nothing for later tests' runtimes to retry: every deployment ends.
        await a.cancel(runtime, *by_org[a.id])
        await b.cancel(runtime, *by_org[b.id])
    assert await _tenant_of(runtime, server) is None
    await assert_invariant(database_url, [server])


class _IsolatingDriver(ProcessDriver):
    """A driver that says its apps are isolated (the container driver's claim)."""

    isolation = "container"


async def _listed(runtime: Runtime, admin: Metadata, server_id: str) -> rpb.Server:
    token = ""
    while True:
        page = await runtime.stub.ListServers(
            rpb.ListServersRequest(page_size=500, page_token=token), metadata=admin
        )
        for server in page.servers:
            if server.id == server_id:
                return server
        token = page.next_page_token
        assert token, f"server {server_id} is not listed"


async def test_heartbeats_record_the_agents_isolation_and_servers_list_it(
    runtime: Runtime,
    neighbours: Neighbours,  # noqa: F811
) -> None:
    admin = (await neighbours.platform_admin()).md
    name = f"iso-{new_id()}"
    registered = await runtime.stub.RegisterServer(
        rpb.RegisterServerRequest(
            server=rpb.Server(
                name=name,
                region="local",
                agent_address="127.0.0.1:1",
                capacity=resources_pb2.Resources(ram_mb=512, cpu_millis=500),
            )
        ),
        metadata=admin,
    )
    assert registered.isolation == rpb.SERVER_ISOLATION_NONE  # unspecified: none
    declared = await runtime.stub.RegisterServer(
        rpb.RegisterServerRequest(
            server=rpb.Server(
                name=f"{name}-boxed",
                region="local",
                agent_address="127.0.0.1:1",
                capacity=resources_pb2.Resources(ram_mb=512, cpu_millis=500),
                isolation=rpb.SERVER_ISOLATION_CONTAINER,
            )
        ),
        metadata=admin,
    )
    assert declared.isolation == rpb.SERVER_ISOLATION_CONTAINER

    agent = await neighbours.service("agent")
    await runtime.stub.Heartbeat(
        rpb.HeartbeatRequest(server_id=registered.id, isolation=rpb.SERVER_ISOLATION_CONTAINER),
        metadata=agent,
    )
    assert (await _listed(runtime, admin, registered.id)).isolation == (
        rpb.SERVER_ISOLATION_CONTAINER
    )
    await runtime.stub.Heartbeat(rpb.HeartbeatRequest(server_id=name), metadata=agent)
    listed = await _listed(runtime, admin, registered.id)
    assert listed.isolation == rpb.SERVER_ISOLATION_CONTAINER  # an agent that does not say
    assert listed.HasField("last_heartbeat_at")

    # The agent's own reporter says what its driver has.
    token = await neighbours.service_token("agent")

    async def agent_token() -> str:
        return token

    clients = Clients({"runtime": runtime.address}, token_provider=agent_token)
    try:
        for driver, expected in (
            (ProcessDriver(), rpb.SERVER_ISOLATION_NONE),
            (_IsolatingDriver(), rpb.SERVER_ISOLATION_CONTAINER),
            (ProcessDriver(), rpb.SERVER_ISOLATION_NONE),
        ):
            try:
                await RuntimeReporter(driver, clients, server=name).beat()
            finally:
                await driver.close()
            got = await runtime.stub.GetServer(
                rpb.GetServerRequest(id=registered.id), metadata=admin
            )
            assert got.isolation == expected
    finally:
        await clients.close()

    # Through the gateway, as an admin reads it.
    await runtime.stub.Heartbeat(
        rpb.HeartbeatRequest(server_id=name, isolation=rpb.SERVER_ISOLATION_CONTAINER),
        metadata=agent,
    )
    addresses = {service: runtime.address for service in SERVICES}
    gateway = Gateway(Settings(service="gateway", addresses=addresses, call_timeout_seconds=10.0))
    with serving(gateway) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:
            headers = {"Authorization": admin[0][1]}
            one = (await http.get(f"/v1/servers/{registered.id}", headers=headers)).json()
            assert one["isolation"] == "SERVER_ISOLATION_CONTAINER", one
            isolation: dict[str, str] = {}
            params = {"pageSize": "500"}
            while True:
                page = (await http.get("/v1/servers", headers=headers, params=params)).json()
                isolation.update({s["id"]: s.get("isolation", "") for s in page["servers"]})
                if not page.get("nextPageToken"):
                    break
                params["pageToken"] = page["nextPageToken"]
            assert isolation[declared.id] == "SERVER_ISOLATION_CONTAINER"
            assert isolation[registered.id] == "SERVER_ISOLATION_CONTAINER"
