"""RuntimeService over real gRPC, with real identity and project beside it: servers for
platform admins only (a user promoted as `hangar admin promote` does), deployments, containers,
logs and metrics inside their organization only.

Every org-scoped RPC, called by a member of another organization, for a project or deployment
that does not exist, by a viewer (reads yes, writes no), with no token and with a forged one,
answers as AIP-193 asks: PERMISSION_DENIED, never NOT_FOUND, to someone without access;
UNAUTHENTICATED without a token or with one identity did not sign. Tokens come from SignUp,
Login and IssueServiceToken; roles from identity's AddMember; the answer from identity's
Authorize (runtime's RemoteAuthorizer) and project's GetProject (runtime's RemoteProjects)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import duration_pb2

from hangar.events.v1 import events_pb2
from hangar.runtime.v1 import runtime_pb2 as pb
from hangar.runtime.v1 import runtime_pb2_grpc
from hangar.type.v1 import resources_pb2
from services.runtime import store
from shared.ids import new_id
from tests.support import runtime as runtime_fixtures
from tests.support.billing import forged
from tests.support.identity import bearer
from tests.support.project import Member, Tenant
from tests.support.runtime import (
    Metadata,
    Neighbours,
    Runtime,
    add_servers,
    assert_invariant,
    launch_runtime,
    region_name,
    spec,
)
from tests.support.telemetry import log_line, place_container

neighbours = runtime_fixtures.neighbours
runtime = runtime_fixtures.runtime
start_runtime = runtime_fixtures.start_runtime

DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def _server(name: str, region: str, ram: int = 2048, cpu: int = 2000) -> pb.RegisterServerRequest:
    return pb.RegisterServerRequest(
        server=pb.Server(
            name=name,
            region=region,
            agent_address="127.0.0.1:50060",
            capacity=resources_pb2.Resources(ram_mb=ram, cpu_millis=cpu),
        )
    )


async def _code(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_platform_admins_register_list_get_and_drain_servers(
    runtime: Runtime, neighbours: Neighbours
) -> None:
    region = region_name("api")
    root = (await neighbours.platform_admin()).md
    created = await runtime.stub.RegisterServer(_server(f"s-{new_id()}", region), metadata=root)
    assert created.id and created.status == pb.SERVER_STATUS_ACTIVE
    assert (created.capacity.ram_mb, created.reserved.ram_mb) == (2048, 0)
    got = await runtime.stub.GetServer(pb.GetServerRequest(id=created.id), metadata=root)
    assert got == created
    seen, token = [], ""
    while True:
        page = await runtime.stub.ListServers(
            pb.ListServersRequest(page_size=2, page_token=token), metadata=root
        )
        seen += [s.id for s in page.servers]
        token = page.next_page_token
        if not token:
            break
    assert created.id in seen and len(seen) == len(set(seen))
    drained = await runtime.stub.DrainServer(pb.DrainServerRequest(id=created.id), metadata=root)
    assert drained.status == pb.SERVER_STATUS_DRAINING
    # A draining server takes no new placement.
    d = await runtime.app.scheduler.create(spec(region, 64, 10))
    assert not d.server_id


async def test_servers_refuse_everyone_but_platform_admins(
    runtime: Runtime, neighbours: Neighbours
) -> None:
    request = _server(f"s-{new_id()}", "r")
    assert await _code(runtime.stub.RegisterServer(request)) == UNAUTHENTICATED
    tenant = await neighbours.tenant()  # an organization's owner is no platform admin
    for who in (tenant.owner.md, (await neighbours.user()).md, await neighbours.service("project")):
        assert await _code(runtime.stub.RegisterServer(request, metadata=who)) == DENIED
        assert await _code(runtime.stub.ListServers(pb.ListServersRequest(), metadata=who)) == (
            DENIED
        )
    admin = await neighbours.platform_admin()
    # The admin's own claims under a key identity never published.
    fake = bearer(forged(admin.token))
    assert await _code(runtime.stub.RegisterServer(request, metadata=fake)) == UNAUTHENTICATED
    await runtime.stub.RegisterServer(request, metadata=admin.md)
    assert await _code(runtime.stub.RegisterServer(request, metadata=admin.md)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    bad = _server(f"s-{new_id()}", "r", ram=0)
    assert await _code(runtime.stub.RegisterServer(bad, metadata=admin.md)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    missing = runtime.stub.GetServer(pb.GetServerRequest(id="nope"), metadata=admin.md)
    assert await _code(missing) == grpc.StatusCode.NOT_FOUND


async def test_deployments_across_tenants(
    runtime: Runtime, neighbours: Neighbours, database_url: str
) -> None:
    region = region_name("tenancy")
    (server,) = await add_servers(runtime.db, region, 1, ram_mb=1000, cpu_millis=1000)
    ours = await neighbours.tenant("viewer", "developer")
    theirs = await neighbours.tenant()
    project = await neighbours.project(ours, region=region)
    other_project = await neighbours.project(theirs, region=region)
    owner, viewer, developer = ours.owner, ours.members["viewer"], ours.members["developer"]
    mine = await runtime.app.scheduler.create(
        spec(region, 200, 100, project_id=project, organization_id=ours.org_id)
    )
    second = await runtime.app.scheduler.create(
        spec(region, 100, 100, project_id=project, organization_id=ours.org_id)
    )
    other = await runtime.app.scheduler.create(
        spec(region, 200, 100, project_id=other_project, organization_id=theirs.org_id)
    )
    get = runtime.stub.GetDeployment
    listing = runtime.stub.ListDeployments
    cancel = runtime.stub.CancelDeployment

    # Members read their organization's deployments.
    for who in (owner, viewer, developer):
        got = await get(pb.GetDeploymentRequest(id=mine.id), metadata=who.md)
        assert got.status == pb.DEPLOYMENT_STATUS_SCHEDULING and got.capacity_reserved
        assert got.server_id == server and got.command == mine.command
        page = await listing(pb.ListDeploymentsRequest(project_id=project), metadata=who.md)
        assert [d.id for d in page.deployments] == [second.id, mine.id]

    # Outsiders get PERMISSION_DENIED, whether or not the thing exists.
    for target in (other.id, "no-such-deployment"):
        assert await _code(get(pb.GetDeploymentRequest(id=target), metadata=owner.md)) == DENIED
        assert await _code(cancel(pb.CancelDeploymentRequest(id=target), metadata=owner.md)) == (
            DENIED
        )
    for target in (other_project, new_id()):
        request = pb.ListDeploymentsRequest(project_id=target)
        assert await _code(listing(request, metadata=owner.md)) == DENIED

    # Viewers read but do not cancel; developers and up cancel.
    assert await _code(cancel(pb.CancelDeploymentRequest(id=mine.id), metadata=viewer.md)) == (
        DENIED
    )
    cancelled = await cancel(pb.CancelDeploymentRequest(id=mine.id), metadata=owner.md)
    assert cancelled.status == pb.DEPLOYMENT_STATUS_CANCELLED and not cancelled.capacity_reserved
    assert owner.user_id in cancelled.status_reason
    again = cancel(pb.CancelDeploymentRequest(id=mine.id), metadata=owner.md)
    assert await _code(again) == grpc.StatusCode.FAILED_PRECONDITION
    by_developer = await cancel(pb.CancelDeploymentRequest(id=second.id), metadata=developer.md)
    assert by_developer.status == pb.DEPLOYMENT_STATUS_CANCELLED
    found = await assert_invariant(database_url, [server])
    assert found[server].reserved.ram_mb == 200  # only theirs still holds capacity


async def test_list_deployments_pages_newest_first(
    runtime: Runtime, neighbours: Neighbours
) -> None:
    tenant = await neighbours.tenant()
    region = region_name("paging")
    project = await neighbours.project(tenant, region=region)
    made = [
        await runtime.app.scheduler.create(
            spec(region, 64, 10, project_id=project, organization_id=tenant.org_id)
        )
        for _ in range(5)
    ]
    seen, token = [], ""
    while True:
        page = await runtime.stub.ListDeployments(
            pb.ListDeploymentsRequest(project_id=project, page_size=2, page_token=token),
            metadata=tenant.owner.md,
        )
        seen += [d.id for d in page.deployments]
        token = page.next_page_token
        if not token:
            break
    assert seen == [d.id for d in reversed(made)]
    async with runtime.db.session() as s:
        assert (await store.get_deployment(s, made[0].id)).status.value == "queued"


async def test_watch_events_streams_status_changes_to_services_only(
    runtime: Runtime, neighbours: Neighbours
) -> None:
    region = region_name("events")
    await add_servers(runtime.db, region, 1, ram_mb=500, cpu_millis=500)
    d = await runtime.app.scheduler.create(spec(region, 100, 100))
    await runtime.app.scheduler.cancel(d.id)
    request = events_pb2.WatchEventsRequest(types=["deployment.status_changed"])
    seen: list[tuple[str, str]] = []
    stream = runtime.stub.WatchEvents(request, metadata=await neighbours.service("billing"))
    async for event in stream:
        if event.aggregate_id == d.id:
            seen.append((event.payload["from"], event.payload["to"]))
            if len(seen) == 3:
                break
    stream.cancel()
    assert seen == [("", "queued"), ("queued", "scheduling"), ("scheduling", "cancelled")]
    tenant = await neighbours.tenant()
    for who in (tenant.owner.md, (await neighbours.platform_admin()).md):
        denied = runtime.stub.WatchEvents(request, metadata=who)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in denied:
                pass
        assert caught.value.code() == DENIED


async def test_routes_name_each_project_s_host_for_the_edge_only(
    runtime: Runtime, neighbours: Neighbours
) -> None:
    tenant = await neighbours.tenant()
    project_id = await neighbours.project(tenant)
    edge = await neighbours.service("edge")

    async def route() -> pb.Route | None:
        listed = await runtime.stub.ListRoutes(pb.ListRoutesRequest(), metadata=edge)
        return next((r for r in listed.routes if r.project_id == project_id), None)

    consuming = asyncio.create_task(runtime.app.project_events.run())  # project's feed
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while (found := await route()) is None:  # from project's project.created
            assert asyncio.get_running_loop().time() < deadline, "the project's route never came"
            await asyncio.sleep(0.1)
    finally:
        consuming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consuming
    assert len(found.hostnames) == 1 and found.hostnames[0].endswith(".localhost")
    assert list(found.upstreams) == [] and found.unavailable_reason == "no_deployment"
    hostnames = [
        h
        for r in (await runtime.stub.ListRoutes(pb.ListRoutesRequest(), metadata=edge)).routes
        for h in r.hostnames
    ]
    assert len(hostnames) == len(set(hostnames))  # a name routes to one project only
    for who in (
        tenant.owner.md,
        (await neighbours.platform_admin()).md,
        await neighbours.service("billing"),
        await neighbours.service("agent"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runtime.stub.ListRoutes(pb.ListRoutesRequest(), metadata=who)
        assert caught.value.code() == DENIED


# --------------------------------------------------------------- the tenancy matrix


@dataclass
class World:
    """One runtime; org A (owner, viewer) with a project, a deployment, a container and a
    stored log line; a stranger who owns org B (and a project there)."""

    runtime: Runtime
    tenant: Tenant
    project: str
    deployment: str
    stranger: Member

    @property
    def stub(self) -> runtime_pb2_grpc.RuntimeServiceStub:
        return self.runtime.stub

    @property
    def owner(self) -> Member:
        return self.tenant.owner

    @property
    def viewer(self) -> Member:
        return self.tenant.members["viewer"]


@pytest.fixture(scope="module")
async def world(neighbours: Neighbours) -> AsyncIterator[World]:
    running = await launch_runtime(neighbours)
    try:
        region = region_name("matrix")  # no server: CreateDeployment queues, starts nothing
        tenant = await neighbours.tenant("viewer")
        project = await neighbours.project(tenant, region=region)
        stranger = await neighbours.tenant()
        await neighbours.project(stranger, region=region)
        placed = await place_container(running.db, project, tenant.org_id)
        agent = await neighbours.service("agent")
        line = log_line(placed.container_id, 1, "hello", datetime.now(UTC))
        await running.stub.ShipLogs(iter([pb.ShipLogsRequest(lines=[line])]), metadata=agent)
        yield World(running, tenant, project, placed.deployment_id, stranger.owner)
    finally:
        await running.stop()


async def _tail(w: World, project: str, md: Metadata) -> None:
    """TailLogs answers with the project's last line, or fails with the RPC's status."""
    call = w.stub.TailLogs(pb.TailLogsRequest(project_id=project, tail_lines=1), metadata=md)
    try:
        entry = await call.read()
        assert entry.line == "hello", entry
    finally:
        call.cancel()


def _source_archive() -> bytes:
    """A valid source: a gzip-compressed tar holding one Procfile."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        procfile = b"web: python3 -m http.server $PORT\n"
        member = tarfile.TarInfo("Procfile")
        member.size = len(procfile)
        tar.addfile(member, io.BytesIO(procfile))
    return buffer.getvalue()


_PROCFILE_ONLY = _source_archive()
Call = Callable[[World, str, str, Metadata], Awaitable[object]]  # (world, project, deployment, md)
HOUR = duration_pb2.Duration(seconds=3600)

READS: dict[str, Call] = {
    "ListDeployments": lambda w, p, _d, md: w.stub.ListDeployments(
        pb.ListDeploymentsRequest(project_id=p), metadata=md
    ),
    "GetDeployment": lambda w, _p, d, md: w.stub.GetDeployment(
        pb.GetDeploymentRequest(id=d), metadata=md
    ),
    "ListContainers": lambda w, p, _d, md: w.stub.ListContainers(
        pb.ListContainersRequest(project_id=p), metadata=md
    ),
    "QueryLogs": lambda w, p, _d, md: w.stub.QueryLogs(
        pb.QueryLogsRequest(project_id=p), metadata=md
    ),
    "TailLogs": lambda w, p, _d, md: _tail(w, p, md),
    "ListSources": lambda w, p, _d, md: w.stub.ListSources(
        pb.ListSourcesRequest(project_id=p), metadata=md
    ),
    "QueryMetrics": lambda w, p, _d, md: w.stub.QueryMetrics(
        pb.QueryMetricsRequest(
            project_id=p,
            metric=pb.METRIC_TYPE_MEMORY_RSS_BYTES,
            aggregation=pb.AGGREGATION_AVG,
            step=HOUR,
        ),
        metadata=md,
    ),
}
WRITES: dict[str, Call] = {
    "CreateDeployment": lambda w, p, _d, md: w.stub.CreateDeployment(
        pb.CreateDeploymentRequest(project_id=p, deployment=pb.Deployment(command="sleep 60")),
        metadata=md,
    ),
    # The deployment is not running and nothing ran before it: the owner gets past the
    # permission check to FAILED_PRECONDITION; everyone else must not get that far.
    "RollbackDeployment": lambda w, _p, d, md: w.stub.RollbackDeployment(
        pb.RollbackDeploymentRequest(id=d), metadata=md
    ),
    "CancelDeployment": lambda w, _p, d, md: w.stub.CancelDeployment(
        pb.CancelDeploymentRequest(id=d), metadata=md
    ),
    "UploadSource": lambda w, p, _d, md: w.stub.UploadSource(
        iter([pb.UploadSourceRequest(project_id=p, chunk=_PROCFILE_ONLY)]), metadata=md
    ),
}
ORG_SCOPED = {**READS, **WRITES}
CALLERS = (
    "member of another org",
    "project or deployment that does not exist",
    "viewer",
    "no token",
    "forged",
)


def test_the_matrix_covers_every_org_scoped_rpc() -> None:
    service = pb.DESCRIPTOR.services_by_name["RuntimeService"]
    # Servers: platform admins; agents' and services' RPCs: their service tokens.
    not_org_scoped = {
        "RegisterServer",
        "ListServers",
        "GetServer",
        "DrainServer",
        "ReportContainerStatus",
        "Heartbeat",
        "ShipLogs",
        "ShipMetrics",
        "FetchArtifact",
        "PutArtifact",
        "ListRoutes",
        "WatchEvents",
        "WakeRoute",
        # Agent enrolment (docs/tls.md): platform admins, and the agent renewing its own.
        "CreateJoinToken",
        "RevokeAgentCertificate",
        "RenewAgentCertificate",
    }
    methods = {m.name for m in service.methods}
    assert not_org_scoped <= methods
    assert set(ORG_SCOPED) == methods - not_org_scoped


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("rpc", sorted(ORG_SCOPED))
async def test_org_scoped_rpcs_answer_only_the_organization_s_members(
    world: World, rpc: str, caller: str
) -> None:
    call, w = ORG_SCOPED[rpc], world
    # The owner gets past authentication and authorization.
    assert await _code(call(w, w.project, w.deployment, w.owner.md)) not in (
        DENIED,
        UNAUTHENTICATED,
    )
    project, deployment, md, expected = {
        "member of another org": (w.project, w.deployment, w.stranger.md, DENIED),
        # The owner of A, for a project (and a deployment) nobody has: the same answer as
        # for someone else's, so existence does not leak.
        "project or deployment that does not exist": (new_id(), new_id(), w.owner.md, DENIED),
        "viewer": (
            w.project,
            w.deployment,
            w.viewer.md,
            DENIED if rpc in WRITES else grpc.StatusCode.OK,
        ),
        "no token": (w.project, w.deployment, (), UNAUTHENTICATED),
        # The owner's own claims, signed by a key identity never published.
        "forged": (w.project, w.deployment, bearer(forged(w.owner.token)), UNAUTHENTICATED),
    }[caller]
    assert await _code(call(w, project, deployment, md)) == expected


async def _fetch(w: World, sha256: str, md: Metadata) -> bytes:
    call = w.stub.FetchArtifact(pb.FetchArtifactRequest(sha256=sha256), metadata=md)
    return b"".join([message.chunk async for message in call])


async def test_artifacts_are_the_agent_s_alone(world: World, neighbours: Neighbours) -> None:
    """Uploaded sources and slugs reach agents (their service token), never users: not even
    the owner of the project they belong to."""
    w = world
    agent = await neighbours.service("agent")
    source = await w.stub.UploadSource(
        iter([pb.UploadSourceRequest(project_id=w.project, chunk=_PROCFILE_ONLY)]),
        metadata=w.owner.md,
    )
    assert await _fetch(w, source.sha256, agent) == _PROCFILE_ONLY
    assert await _code(_fetch(w, source.sha256, w.owner.md)) == DENIED
    assert await _code(_fetch(w, "0" * 64, agent)) == grpc.StatusCode.NOT_FOUND
    assert await _code(_fetch(w, "not-a-digest", agent)) == grpc.StatusCode.INVALID_ARGUMENT

    slug = [
        pb.PutArtifactRequest(
            project_id=w.project, deployment_id=w.deployment, chunk=_PROCFILE_ONLY
        )
    ]
    assert await _code(w.stub.PutArtifact(iter(slug), metadata=w.owner.md)) == DENIED
    stored = await w.stub.PutArtifact(iter(slug), metadata=agent)
    assert stored.sha256 == source.sha256  # content-addressed: the same bytes, one artifact
