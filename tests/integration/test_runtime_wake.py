"""Runtime's WakeRoute, through the real agent: the routes list a sleeping release's
containers apart (sleeping_upstreams), WakeRoute wakes every sleeping replica of the project
at once through its agent (no connection to the apps needed), records them awake and writes
route.changed, and only the edge's service token may call it. Cross-tenant checks do not
apply: no user token is ever accepted (PERMISSION_DENIED), whatever the project."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from hangar.agent.v1 import agent_pb2 as apb
from hangar.runtime.v1 import runtime_pb2 as pb
from tests.integration import test_runtime_deploy
from tests.integration.test_runtime_deploy import SERVE, Live, _http
from tests.support.identity import bearer

live = test_runtime_deploy.live  # its fixture: runtime, identity, project and a real agent

pytestmark = pytest.mark.slow


async def _route(live: Live, edge: object, project_id: str) -> pb.Route:
    """The project's route, once runtime has it: its row comes from project's
    project.created event, which runtime consumes in the background."""
    deadline = time.monotonic() + 60
    while True:
        listed = await live.runtime.ListRoutes(pb.ListRoutesRequest(), metadata=edge)
        found = next((r for r in listed.routes if r.project_id == project_id), None)
        if found is not None:
            return found
        assert time.monotonic() < deadline, "runtime never listed the project's route"
        await asyncio.sleep(0.1)


async def _route_events(live: Live, project_id: str) -> list[str]:
    rows = await live.app.db.pool.fetch(
        """SELECT payload->>'sleep' AS sleep FROM runtime.outbox
            WHERE type = 'route.changed' AND aggregate_id = $1 AND payload ? 'sleep'
            ORDER BY occurred_at, id""",
        project_id,
    )
    return [row["sleep"] for row in rows]


async def test_wake_route_wakes_every_sleeping_replica_for_the_edge_only(live: Live) -> None:
    tenant = await live.stack.tenant()
    owner = tenant.owner.md
    edge = bearer(await live.stack.identity.service_token("edge"))
    project = await live.project(tenant, sleep_enabled=True, sleep_after_seconds=60)
    deployment = await live.runtime.CreateDeployment(
        pb.CreateDeploymentRequest(
            project_id=project.id, deployment=pb.Deployment(command=SERVE, replicas=2)
        ),
        metadata=owner,
    )
    await live.wait(deployment.id, owner, pb.DEPLOYMENT_STATUS_RUNNING)
    containers = [c for c in await live.containers(project.id, owner) if c.status == 2]
    addresses = sorted(c.address for c in containers)
    assert len(addresses) == 2
    awake = await _route(live, edge, project.id)
    assert sorted(awake.upstreams) == addresses and list(awake.sleeping_upstreams) == []
    assert awake.sleep_enabled

    # Both go to sleep (the clock moved past sleep_after_seconds; a pass the agent refuses
    # with a request runtime did not know of yet is followed by one that sleeps it).
    later = datetime.now(UTC) + timedelta(hours=1)
    for _ in range(4):
        await live.app.sleeper.sleep_idle(now=later)
    asleep = await _route(live, edge, project.id)
    assert list(asleep.upstreams) == [] and sorted(asleep.sleeping_upstreams) == addresses
    assert asleep.unavailable_reason == ""  # asleep is not "nothing serves"
    for c in containers:
        assert (await live.agent_container(c.id)).sleep_status == apb.SLEEP_STATUS_SLEEPING

    # Only the edge may ask: a member of the project's organization, or another service,
    # is refused.
    for who in (owner, bearer(await live.stack.identity.service_token("billing"))):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live.runtime.WakeRoute(pb.WakeRouteRequest(project_id=project.id), metadata=who)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await live.runtime.WakeRoute(pb.WakeRouteRequest(), metadata=edge, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    woke = await live.runtime.WakeRoute(
        pb.WakeRouteRequest(project_id=project.id), metadata=edge, timeout=30
    )

    assert woke.woken == 2
    for c in containers:  # awake through their agent, before any connection reached them
        seen = await live.agent_container(c.id)
        assert seen.sleep_status == apb.SLEEP_STATUS_AWAKE and seen.pid != 0
    routed = await _route(live, edge, project.id)
    assert sorted(routed.upstreams) == addresses and list(routed.sleeping_upstreams) == []
    assert (await _route_events(live, project.id))[-1] == "awake"
    assert "asleep" in await _route_events(live, project.id)
    for address in addresses:
        assert (await _http(address)).status_code == 200
    # Awake already (another edge asked too): nothing to do.
    again = await live.runtime.WakeRoute(
        pb.WakeRouteRequest(project_id=project.id), metadata=edge, timeout=30
    )
    assert again.woken == 0
