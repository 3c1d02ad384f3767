"""Prometheus metrics (shared/metrics.py): the gRPC interceptors count each call once with its
code, labels stay bounded, GET /metrics answers, the gateway labels routes by template."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.wrappers_pb2 import StringValue

from services.agent.domain import ContainerInfo, ContainerState
from services.agent.metrics import watch_agent
from services.gateway.app import Gateway
from shared.clients import open_channel
from shared.errors import NotFound
from shared.loops import run_every
from shared.metrics import Metrics, current_metrics
from shared.server import RunningServer, start_server
from shared.settings import Settings

SERVICE = "hangar.test.v1.EchoService"
SECRET_ID = "prj_5f1c2a9d0e7b"  # what a request carries; no label may ever show it


async def _say(request: StringValue, context: grpc.aio.ServicerContext) -> StringValue:
    if request.value.startswith("missing"):
        raise NotFound(f"no such thing: {request.value}")
    return request


async def _count(
    request: StringValue, context: grpc.aio.ServicerContext
) -> AsyncIterator[StringValue]:
    for i in range(int(request.value)):
        yield StringValue(value=str(i))


_CODEC: dict[str, Any] = {
    "request_deserializer": StringValue.FromString,
    "response_serializer": StringValue.SerializeToString,
}


def _say_call(channel: grpc.aio.Channel, method: str = "Say") -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=StringValue.SerializeToString,
        response_deserializer=StringValue.FromString,
    )


def _count_call(channel: grpc.aio.Channel) -> Any:
    return channel.unary_stream(
        f"/{SERVICE}/Count",
        request_serializer=StringValue.SerializeToString,
        response_deserializer=StringValue.FromString,
    )


def sv(text: str) -> StringValue:
    return StringValue(value=text)


class EchoApp:
    """The least a service needs to be served by shared.server, with metrics on."""

    service_names: Sequence[str] = (SERVICE,)

    def __init__(self) -> None:
        self.settings = Settings(service="echo", metrics_address="127.0.0.1:0")
        self.metrics = Metrics()

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Say": grpc.unary_unary_rpc_method_handler(_say, **_CODEC),
            "Count": grpc.unary_stream_rpc_method_handler(_count, **_CODEC),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture
async def echo() -> AsyncIterator[tuple[EchoApp, RunningServer]]:
    app = EchoApp()
    running = await start_server(app, "127.0.0.1:0", grace=0.1)
    try:
        yield app, running
    finally:
        await running.stop()


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def _settled(check: Any) -> None:
    """Lets done callbacks run: a bounded number of loop turns, no sleeping."""
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("not counted")


async def test_server_counts_each_call_once_with_its_code(
    echo: tuple[EchoApp, RunningServer],
) -> None:
    app, running = echo
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        say, count = _say_call(channel), _count_call(channel)
        for _ in range(3):
            assert await say(sv(SECRET_ID)) == sv(SECRET_ID)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await say(sv("missing " + SECRET_ID))
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        assert [item.value async for item in count(sv("2"))] == ["0", "1"]

    m = app.metrics
    ok = {"grpc_service": SERVICE, "grpc_method": "Say", "grpc_code": "OK"}
    assert _value(m, "grpc_server_handled_total", **ok) == 3
    assert _value(m, "grpc_server_handled_total", **{**ok, "grpc_code": "NOT_FOUND"}) == 1
    assert (
        _value(m, "grpc_server_handling_seconds_count", grpc_service=SERVICE, grpc_method="Say")
        == 4
    )
    stream = {"grpc_service": SERVICE, "grpc_method": "Count", "grpc_code": "OK"}
    assert _value(m, "grpc_server_handled_total", **stream) == 1


async def test_client_interceptors_count_unary_and_stream_calls(
    echo: tuple[EchoApp, RunningServer],
) -> None:
    _, running = echo
    metrics = Metrics()
    channel = open_channel(f"127.0.0.1:{running.port}", metrics=metrics)
    try:
        say, count = _say_call(channel), _count_call(channel)
        assert await say(sv("hello")) == sv("hello")
        with pytest.raises(grpc.aio.AioRpcError):
            await say(sv("missing"))
        assert [item.value async for item in count(sv("3"))] == ["0", "1", "2"]
    finally:
        await channel.close()

    labels = {"grpc_service": SERVICE, "grpc_method": "Say"}
    assert _value(metrics, "grpc_client_handled_total", **labels, grpc_code="OK") == 1
    assert _value(metrics, "grpc_client_handled_total", **labels, grpc_code="NOT_FOUND") == 1
    stream = {"grpc_service": SERVICE, "grpc_method": "Count", "grpc_code": "OK"}
    await _settled(lambda: _value(metrics, "grpc_client_handled_total", **stream) == 1)


async def test_no_label_carries_what_a_request_carried(
    echo: tuple[EchoApp, RunningServer],
) -> None:
    app, running = echo
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        say = _say_call(channel)
        await say(sv(SECRET_ID))
        with pytest.raises(grpc.aio.AioRpcError):
            await say(sv("missing " + SECRET_ID))
        with pytest.raises(grpc.aio.AioRpcError):  # an unknown method: no handler, not counted
            await _say_call(channel, SECRET_ID)(sv(""))
    allowed = {"grpc_service", "grpc_method", "grpc_code", "le", "loop"}
    for family in app.metrics.registry.collect():
        for sample in family.samples:
            assert set(sample.labels) <= allowed, sample
            assert all(SECRET_ID not in value for value in sample.labels.values()), sample


async def test_metrics_endpoint_answers_prometheus_text(
    echo: tuple[EchoApp, RunningServer],
) -> None:
    _, running = echo
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        await _say_call(channel)(sv("x"))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.metrics_port}") as http:
        reply = await http.get("/metrics")
        other = await http.get("/")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    labels = f'grpc_code="OK",grpc_method="Say",grpc_service="{SERVICE}"'
    assert f"grpc_server_handled_total{{{labels}}} 1.0" in reply.text
    assert "# TYPE grpc_server_handling_seconds histogram" in reply.text
    assert other.status_code == 404


async def test_metrics_port_closes_with_the_server() -> None:
    app = EchoApp()
    running = await start_server(app, "127.0.0.1:0", grace=0.1)
    port = running.metrics_port
    await running.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_without_a_metrics_address_nothing_listens() -> None:
    gateway = Gateway(Settings(service="gateway"))
    assert gateway.metrics is None and gateway.http_metrics is None


async def test_loop_passes_and_failures_are_counted() -> None:
    metrics = Metrics()
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("a bug")
        if calls == 3:
            raise asyncio.CancelledError

    token = current_metrics.set(metrics)
    try:
        with pytest.raises(asyncio.CancelledError):
            await run_every(0, step, "test pass")
    finally:
        current_metrics.reset(token)
    assert _value(metrics, "loop_runs_total", loop="test pass") == 2
    assert _value(metrics, "loop_failures_total", loop="test pass") == 1


async def _asgi(app: Gateway, method: str, path: str, body: bytes = b"") -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    await app(scope, receive, send)
    return int(sent[0]["status"])


async def test_gateway_labels_requests_by_route_template_never_the_path() -> None:
    gateway = Gateway(Settings(service="gateway", metrics_address="127.0.0.1:0"))
    assert gateway.metrics is not None
    assert await _asgi(gateway, "PATCH", f"/v1/projects/{SECRET_ID}", b"{not json") == 400
    assert await _asgi(gateway, "GET", f"/v1/nothing/{SECRET_ID}") == 404
    m = gateway.metrics
    template = "/v1/projects/{project.id}"
    assert _value(m, "http_requests_total", method="PATCH", route=template, code="400") == 1
    assert _value(m, "http_request_duration_seconds_count", method="PATCH", route=template) == 1
    assert _value(m, "http_requests_total", method="GET", route="unmatched", code="404") == 1
    for family in m.registry.collect():
        for sample in family.samples:
            assert all(SECRET_ID not in value for value in sample.labels.values()), sample


class _Sandbox:
    def __init__(self, oom_kills: int) -> None:
        self.oom_kills = oom_kills


class _Driver:
    """What the agent's collector reads: list() and the container driver's sandboxes."""

    def __init__(self) -> None:
        self.infos: list[ContainerInfo] = []
        self._sandboxes: dict[str, _Sandbox] = {}

    def list(self) -> list[ContainerInfo]:
        return self.infos


def test_agent_counts_containers_by_state_and_oom_kills_as_they_grow() -> None:
    metrics, driver = Metrics(), _Driver()
    watch_agent(metrics, driver)  # type: ignore[arg-type]
    driver.infos = [
        ContainerInfo("c-1", "d-1", SECRET_ID, ContainerState.RUNNING),
        ContainerInfo("c-2", "d-1", SECRET_ID, ContainerState.RUNNING),
        ContainerInfo("c-3", "d-2", SECRET_ID, ContainerState.FAILED),
    ]
    driver._sandboxes = {"c-1": _Sandbox(2), "c-2": _Sandbox(0)}
    assert _value(metrics, "agent_containers", state="running") == 2
    assert _value(metrics, "agent_containers", state="failed") == 1
    assert _value(metrics, "agent_containers", state="stopping") == 0
    assert _value(metrics, "agent_oom_kills_total") == 2
    driver._sandboxes["c-2"].oom_kills = 1  # one more kill
    driver._sandboxes["c-1"].oom_kills = 0  # a new run of c-1: its count starts again
    assert _value(metrics, "agent_oom_kills_total") == 3
    for family in metrics.registry.collect():
        for sample in family.samples:
            assert all(SECRET_ID not in value for value in sample.labels.values()), sample
