"""The agent's WakeContainer in the container sandbox: a frozen app is thawed by the call
itself (no connection reaches it), counts as a request, and answers at once; waking an awake
one is a no-op; an unknown container is NOT_FOUND. (A stopped app's wake, a start until it
answers, is pinned with the process driver through runtime in test_runtime_wake.py.)"""

from __future__ import annotations

import json

import grpc
import httpx
import pytest

from hangar.agent.v1 import agent_pb2 as pb
from services.agent.domain import SleepState
from tests.integration import test_agent_containers as sandbox
from tests.integration.test_agent_containers import SERVE, driver_of, start
from tests.support.agent import RunningAgent
from tests.support.identity import bearer

pytestmark = pytest.mark.slow
# Its fixtures: the sandbox's check, identity and tokens, an agent with the ContainerDriver.
require_containers, identity, tokens, agent = (
    sandbox.require_containers,
    sandbox.identity,
    sandbox.tokens,
    sandbox.agent,
)


async def test_wake_container_thaws_a_frozen_app_before_any_connection(
    agent: RunningAgent, tokens: dict[str, str]
) -> None:
    runtime = bearer(tokens["runtime"])
    app = await start(agent, tokens["runtime"], SERVE, project="p-wake")
    driver = driver_of(agent)
    await driver.sleep(app.container_id)
    assert json.loads(driver._runc_sync("state", app.container_id))["status"] == "paused"
    connections = driver._containers[app.container_id].proxy.counters.connections

    woken = await agent.stub.WakeContainer(
        pb.WakeContainerRequest(container_id=app.container_id), metadata=runtime, timeout=30
    )

    assert woken.sleep_status == pb.SLEEP_STATUS_AWAKE and woken.pid == app.pid
    assert woken.HasField("last_request_at")  # a wake counts as a request
    assert json.loads(driver._runc_sync("state", app.container_id))["status"] == "running"
    seen = driver.inspect(app.container_id)
    assert seen is not None and seen.sleep is SleepState.AWAKE
    assert driver._containers[app.container_id].proxy.counters.connections == connections
    again = await agent.stub.WakeContainer(
        pb.WakeContainerRequest(container_id=app.container_id), metadata=runtime, timeout=30
    )
    assert again.sleep_status == pb.SLEEP_STATUS_AWAKE
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"http://{app.address}/")).status_code == 200
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agent.stub.WakeContainer(
            pb.WakeContainerRequest(container_id="c-nobody"), metadata=runtime, timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await agent.stub.StopContainer(
        pb.StopContainerRequest(container_id=app.container_id), metadata=runtime
    )
