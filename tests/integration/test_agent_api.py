"""AgentService over real gRPC with identity's real tokens: a real app started, checked,
given its env and stopped; failures and bad input; only runtime's service token gets in."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import grpc
import httpx
import psutil
import pytest
from google.protobuf import duration_pb2

from hangar.agent.v1 import agent_pb2 as pb
from services.agent.drivers import ProcessDriver
from tests.support.agent import ENDED, RunningAgent, alive, caller_tokens, running_agent
from tests.support.identity import RunningIdentity, bearer, running_identity


@pytest.fixture(scope="module")
async def identity(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RunningIdentity]:
    async with running_identity(database_url, db_passwords) as running:
        yield running


@pytest.fixture(scope="module")
async def tokens(identity: RunningIdentity) -> dict[str, str]:
    return await caller_tokens(identity)


@pytest.fixture
async def agent(identity: RunningIdentity) -> AsyncIterator[RunningAgent]:
    driver = ProcessDriver(start_timeout=10, stop_grace=2, probe_interval=0.05)
    async with running_agent(identity.address, driver=driver) as running:
        yield running


def start_request(command: str, **fields: object) -> pb.StartContainerRequest:
    return pb.StartContainerRequest(
        container_id=f"c-{secrets.token_hex(4)}",
        deployment_id="d-1",
        project_id="p-1",
        command=command,
        **fields,  # type: ignore[arg-type]
    )


async def test_http_server_runs_answers_gets_its_secret_and_stops(
    agent: RunningAgent, tokens: dict[str, str]
) -> None:
    auth = bearer(tokens["runtime"])
    request = start_request(
        'echo "secret is $MY_SECRET"; exec python3 -m http.server "$PORT"',
        env={"MY_SECRET": "hunter2"},
    )
    started = await agent.stub.StartContainer(request, metadata=auth)
    assert started.pid > 0 and started.address.endswith(f":{started.port}")

    running = await agent.wait_for(
        request.container_id, (pb.CONTAINER_STATUS_RUNNING,), tokens["runtime"]
    )
    assert running.address == started.address and running.HasField("started_at")
    async with httpx.AsyncClient(trust_env=False) as client:
        reply = await client.get(f"http://{started.address}/")
    assert reply.status_code == 200
    assert agent.app is not None
    logs = agent.app.driver.logs(request.container_id)
    assert logs is not None and "secret is hunter2" in logs.text()

    again = await agent.stub.StartContainer(request, metadata=auth)
    assert again == started  # idempotent on container_id

    stopped = await agent.stub.StopContainer(
        pb.StopContainerRequest(container_id=request.container_id), metadata=auth
    )
    assert stopped.status == pb.CONTAINER_STATUS_EXITED and stopped.reason == "stopped"
    assert stopped.HasField("exit_code") and stopped.HasField("ended_at")
    assert not psutil.pid_exists(started.pid)
    repeated = await agent.stub.StopContainer(
        pb.StopContainerRequest(container_id=request.container_id), metadata=auth
    )
    assert repeated == stopped


async def test_command_that_exits_at_once_is_failed_with_its_exit_code(
    agent: RunningAgent, tokens: dict[str, str]
) -> None:
    request = start_request("echo starting; exit 42")
    await agent.stub.StartContainer(request, metadata=bearer(tokens["runtime"]))
    ended = await agent.wait_for(request.container_id, ENDED, tokens["runtime"])
    assert ended.status == pb.CONTAINER_STATUS_FAILED
    assert ended.exit_code == 42 and "42" in ended.reason


async def test_app_ignoring_sigterm_is_killed_after_the_requested_grace(
    agent: RunningAgent, tokens: dict[str, str]
) -> None:
    auth = bearer(tokens["runtime"])
    request = start_request("trap '' TERM; python3 -m http.server \"$PORT\" & wait")
    started = await agent.stub.StartContainer(request, metadata=auth)
    await agent.wait_for(request.container_id, (pb.CONTAINER_STATUS_RUNNING,), tokens["runtime"])
    stopped = await agent.stub.StopContainer(
        pb.StopContainerRequest(
            container_id=request.container_id, grace=duration_pb2.Duration(nanos=300_000_000)
        ),
        metadata=auth,
    )
    assert stopped.exit_code == 137
    assert not alive(started.pid)


async def test_image_is_refused_with_failed_precondition(
    agent: RunningAgent, tokens: dict[str, str]
) -> None:
    request = pb.StartContainerRequest(container_id="c-img", image="nginx:1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agent.stub.StartContainer(request, metadata=bearer(tokens["runtime"]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no image driver" in (caught.value.details() or "")


@pytest.mark.parametrize(
    "request_",
    [
        pb.StartContainerRequest(command="true"),
        pb.StartContainerRequest(container_id="c-1"),
        pb.StartContainerRequest(container_id="c 1", command="true"),
        pb.StartContainerRequest(container_id="c-1", command="true", env={"A=B": "x"}),
        pb.StartContainerRequest(container_id="c-1", command="true", health_check_path="up"),
    ],
    ids=["no-id", "no-source", "bad-id", "bad-env-name", "bad-health-path"],
)
async def test_bad_start_requests_are_invalid_argument(
    agent: RunningAgent, tokens: dict[str, str], request_: pb.StartContainerRequest
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agent.stub.StartContainer(request_, metadata=bearer(tokens["runtime"]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_container_is_not_found(agent: RunningAgent, tokens: dict[str, str]) -> None:
    auth = bearer(tokens["runtime"])
    for call in (
        agent.stub.GetContainer(pb.GetContainerRequest(container_id="c-nope"), metadata=auth),
        agent.stub.StopContainer(pb.StopContainerRequest(container_id="c-nope"), metadata=auth),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_containers_pages_and_filters_by_project(
    agent: RunningAgent, tokens: dict[str, str]
) -> None:
    auth = bearer(tokens["runtime"])
    for index in range(5):
        await agent.stub.StartContainer(
            pb.StartContainerRequest(
                container_id=f"c-{index}", project_id=f"p-{index % 2}", command="sleep 600"
            ),
            metadata=auth,
        )
    seen: list[str] = []
    token = ""
    while True:
        page = await agent.stub.ListContainers(
            pb.ListContainersRequest(page_size=2, page_token=token), metadata=auth
        )
        seen += [c.container_id for c in page.containers]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"c-{i}" for i in range(5)]
    only = await agent.stub.ListContainers(
        pb.ListContainersRequest(project_id="p-1"), metadata=auth
    )
    assert [c.container_id for c in only.containers] == ["c-1", "c-3"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agent.stub.ListContainers(pb.ListContainersRequest(page_token="%%%"), metadata=auth)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


CALLS = {
    "StartContainer": lambda stub, md: stub.StartContainer(
        pb.StartContainerRequest(container_id="c-x", command="sleep 600"), metadata=md
    ),
    "StopContainer": lambda stub, md: stub.StopContainer(
        pb.StopContainerRequest(container_id="c-x"), metadata=md
    ),
    "GetContainer": lambda stub, md: stub.GetContainer(
        pb.GetContainerRequest(container_id="c-x"), metadata=md
    ),
    "ListContainers": lambda stub, md: stub.ListContainers(pb.ListContainersRequest(), metadata=md),
    "WakeContainer": lambda stub, md: stub.WakeContainer(
        pb.WakeContainerRequest(container_id="c-x"), metadata=md
    ),
}


@pytest.mark.parametrize("rpc", sorted(CALLS))
@pytest.mark.parametrize(
    ("caller", "code"),
    [
        ("anonymous", grpc.StatusCode.UNAUTHENTICATED),
        ("garbage", grpc.StatusCode.UNAUTHENTICATED),
        ("user", grpc.StatusCode.PERMISSION_DENIED),
        ("project", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_only_runtimes_service_token_is_accepted(
    agent: RunningAgent, tokens: dict[str, str], rpc: str, caller: str, code: grpc.StatusCode
) -> None:
    metadata: tuple[tuple[str, str], ...] = ()
    if caller == "garbage":
        metadata = bearer("not-a-token")
    elif caller != "anonymous":
        metadata = bearer(tokens[caller])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await CALLS[rpc](agent.stub, metadata)
    assert caught.value.code() == code
    assert agent.app is not None and agent.app.driver.list() == []  # nothing was started
