"""RuntimeService over real gRPC: servers for platform admins only, deployments readable and
cancellable inside their organization only (PERMISSION_DENIED elsewhere, AIP-193)."""

from __future__ import annotations

import grpc
import pytest

from hangar.runtime.v1 import runtime_pb2 as pb
from services.runtime import store
from shared.ids import new_id
from tests.support import runtime as runtime_fixtures
from tests.support.runtime import Runtime, add_servers, admin, assert_invariant, service, spec, user

runtime = runtime_fixtures.runtime
start_runtime = runtime_fixtures.start_runtime


def _server(name: str, region: str, ram: int = 2048, cpu: int = 2000) -> pb.RegisterServerRequest:
    return pb.RegisterServerRequest(
        server=pb.Server(
            name=name, region=region, agent_address="127.0.0.1:50060", ram_mb=ram, cpu_millis=cpu
        )
    )


async def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def test_platform_admins_register_list_get_and_drain_servers(runtime: Runtime) -> None:
    region = f"api-{new_id()}"
    root = admin(new_id())
    created = await runtime.stub.RegisterServer(_server(f"s-{new_id()}", region), metadata=root)
    assert created.id and created.status == pb.SERVER_STATUS_ACTIVE
    assert (created.ram_mb, created.ram_mb_reserved) == (2048, 0)
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


async def test_servers_refuse_everyone_but_platform_admins(runtime: Runtime) -> None:
    name = f"s-{new_id()}"
    request = _server(name, "r")
    assert await _code(runtime.stub.RegisterServer(request)) == grpc.StatusCode.UNAUTHENTICATED
    for who in (user(new_id()), service("project")):
        assert await _code(runtime.stub.RegisterServer(request, metadata=who)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert await _code(runtime.stub.ListServers(pb.ListServersRequest(), metadata=who)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    root = admin(new_id())
    await runtime.stub.RegisterServer(request, metadata=root)
    assert await _code(runtime.stub.RegisterServer(request, metadata=root)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    bad = _server(f"s-{new_id()}", "r", ram=0)
    assert await _code(runtime.stub.RegisterServer(bad, metadata=root)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert await _code(runtime.stub.GetServer(pb.GetServerRequest(id="nope"), metadata=root)) == (
        grpc.StatusCode.NOT_FOUND
    )


async def test_deployments_across_tenants(runtime: Runtime, database_url: str) -> None:
    region = f"tenancy-{new_id()}"
    (server,) = await add_servers(runtime.app.db, region, 1, ram_mb=1000, cpu_millis=1000)
    owner, viewer, stranger = new_id(), new_id(), new_id()
    org, project = runtime.new_project(owner=owner)
    runtime.members.roles[(org, viewer)] = "viewer"
    other_org, other_project = runtime.new_project(owner=stranger)
    mine = await runtime.app.scheduler.create(
        spec(region, 200, 100, project_id=project, organization_id=org)
    )
    theirs = await runtime.app.scheduler.create(
        spec(region, 200, 100, project_id=other_project, organization_id=other_org)
    )
    get = runtime.stub.GetDeployment
    listing = runtime.stub.ListDeployments
    cancel = runtime.stub.CancelDeployment

    # Members read their organization's deployments.
    for who in (owner, viewer):
        got = await get(pb.GetDeploymentRequest(id=mine.id), metadata=user(who))
        assert got.status == pb.DEPLOYMENT_STATUS_SCHEDULING and got.capacity_reserved
        assert got.server_id == server and got.command == mine.command
        page = await listing(pb.ListDeploymentsRequest(project_id=project), metadata=user(who))
        assert [d.id for d in page.deployments] == [mine.id]

    # Outsiders get PERMISSION_DENIED, whether or not the thing exists.
    denied = grpc.StatusCode.PERMISSION_DENIED
    for target in (theirs.id, "no-such-deployment"):
        assert await _code(get(pb.GetDeploymentRequest(id=target), metadata=user(owner))) == denied
        assert await _code(cancel(pb.CancelDeploymentRequest(id=target), metadata=user(owner))) == (
            denied
        )
    for target in (other_project, "no-such-project"):
        request = pb.ListDeploymentsRequest(project_id=target)
        assert await _code(listing(request, metadata=user(owner))) == denied

    # Viewers read but do not cancel; developers and up cancel.
    assert await _code(cancel(pb.CancelDeploymentRequest(id=mine.id), metadata=user(viewer))) == (
        denied
    )
    cancelled = await cancel(pb.CancelDeploymentRequest(id=mine.id), metadata=user(owner))
    assert cancelled.status == pb.DEPLOYMENT_STATUS_CANCELLED and not cancelled.capacity_reserved
    assert owner in cancelled.status_reason
    again = cancel(pb.CancelDeploymentRequest(id=mine.id), metadata=user(owner))
    assert await _code(again) == grpc.StatusCode.FAILED_PRECONDITION
    found = await assert_invariant(database_url, [server])
    assert found[server].reserved.ram_mb == 200  # only theirs still holds capacity


async def test_list_deployments_pages_newest_first(runtime: Runtime) -> None:
    owner = new_id()
    org, project = runtime.new_project(owner=owner)
    region = f"paging-{new_id()}"
    made = [
        await runtime.app.scheduler.create(
            spec(region, 64, 10, project_id=project, organization_id=org)
        )
        for _ in range(5)
    ]
    seen, token = [], ""
    while True:
        page = await runtime.stub.ListDeployments(
            pb.ListDeploymentsRequest(project_id=project, page_size=2, page_token=token),
            metadata=user(owner),
        )
        seen += [d.id for d in page.deployments]
        token = page.next_page_token
        if not token:
            break
    assert seen == [d.id for d in reversed(made)]
    async with runtime.app.db.session() as s:
        assert (await store.get_deployment(s, made[0].id)).status.value == "queued"


async def test_watch_events_streams_status_changes_to_services_only(runtime: Runtime) -> None:
    from hangar.events.v1 import events_pb2

    region = f"events-{new_id()}"
    await add_servers(runtime.app.db, region, 1, ram_mb=500, cpu_millis=500)
    d = await runtime.app.scheduler.create(spec(region, 100, 100))
    await runtime.app.scheduler.cancel(d.id)
    request = events_pb2.WatchEventsRequest(types=["deployment.status_changed"])
    seen: list[tuple[str, str]] = []
    stream = runtime.stub.WatchEvents(request, metadata=service("billing"))
    async for event in stream:
        if event.aggregate_id == d.id:
            seen.append((event.payload["from"], event.payload["to"]))
            if len(seen) == 3:
                break
    stream.cancel()
    assert seen == [("", "queued"), ("queued", "scheduling"), ("scheduling", "cancelled")]
    denied = runtime.stub.WatchEvents(request, metadata=user(new_id()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in denied:
            pass
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
