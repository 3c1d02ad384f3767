"""The agent's ingress proxy: an app's bytes through its public port are counted (rx from
clients, tx to them), half-closes pass through, and closing ends live connections; the
ProcessDriver puts every app behind one, and MetricShipper ships what it counted."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from hangar.runtime.v1 import runtime_pb2 as pb
from services.agent.domain import ContainerSpec, ContainerState
from services.agent.drivers import ProcessDriver
from services.agent.proxy import IngressProxy
from services.agent.shipping import MetricShipper

BLOB = 300_000
SERVE_BLOB = f'head -c {BLOB} /dev/urandom > blob.bin && exec python3 -m http.server "$PORT"'
ENV_AND_SERVE = 'echo "PORT=$PORT"; exec python3 -m http.server "$PORT"'
RX_BYTES, TX_BYTES = pb.METRIC_TYPE_NETWORK_RX_BYTES, pb.METRIC_TYPE_NETWORK_TX_BYTES


@pytest.fixture
async def driver() -> AsyncIterator[ProcessDriver]:
    driver = ProcessDriver(start_timeout=10, stop_grace=2, probe_interval=0.05)
    yield driver
    await driver.close()


def spec(command: str) -> ContainerSpec:
    return ContainerSpec(
        container_id=f"c-{secrets.token_hex(4)}",
        deployment_id="d-1",
        project_id="p-1",
        command=command,
    )


async def running(driver: ProcessDriver, container_id: str) -> None:
    deadline = time.monotonic() + 15
    while (info := driver.inspect(container_id)) and info.state is not ContainerState.RUNNING:
        assert time.monotonic() < deadline and not info.state.ended, f"stuck: {info}"
        await asyncio.sleep(0.05)


def refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_a_file_fetched_through_the_public_address_is_counted(driver: ProcessDriver) -> None:
    started = await driver.start(spec(SERVE_BLOB))
    await running(driver, started.container_id)
    before = driver.sample(started.container_id)
    assert before is not None and (before.rx_bytes, before.tx_bytes) == (0, 0)  # probes bypass

    async with httpx.AsyncClient(trust_env=False) as client:
        reply = await client.get(f"http://{started.address}/blob.bin")
    assert reply.status_code == 200 and len(reply.content) == BLOB

    request = f"GET /blob.bin HTTP/1.1\r\nHost: {started.address}\r\n\r\n"
    after = driver.sample(started.container_id)
    assert after is not None and after.rx_bytes is not None and after.tx_bytes is not None
    assert after.rx_bytes >= len(request)
    assert BLOB < after.tx_bytes < BLOB + 2000  # the body and its headers

    stopped = await driver.stop(started.container_id)
    assert stopped.address == started.address  # what StartContainer answered stays
    assert refused(started.address)  # the public port closed with the container


async def test_the_app_listens_on_a_private_port_and_clients_use_the_public_one(
    driver: ProcessDriver,
) -> None:
    started = await driver.start(spec(ENV_AND_SERVE))
    await running(driver, started.container_id)
    logs = driver.logs(started.container_id)
    assert logs is not None
    line = next(entry.text for entry in logs.since(0, 10) if entry.text.startswith("PORT="))
    private = int(line.removeprefix("PORT="))
    assert private != started.port and started.address.endswith(f":{started.port}")
    async with httpx.AsyncClient(trust_env=False) as client:
        direct = await client.get(f"http://127.0.0.1:{private}/")
        proxied = await client.get(f"http://{started.address}/")
    assert direct.status_code == proxied.status_code == 200
    assert direct.content == proxied.content
    sample = driver.sample(started.container_id)
    assert sample is not None and sample.tx_bytes is not None
    assert len(proxied.content) < sample.tx_bytes < len(proxied.content) + 2000  # direct: not


# ----------------------------------------------------------------------- the proxy alone


async def _app(handler: object) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    return server, int(server.sockets[0].getsockname()[1])


async def test_half_close_passes_through_and_bytes_are_counted_both_ways() -> None:
    async def upper_after_eof(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # the client's EOF must reach the app
        w.write(data.upper() * 2)
        await w.drain()
        w.close()

    app, private = await _app(upper_after_eof)
    proxy = IngressProxy("127.0.0.1")
    counters = await proxy.start(0, private)
    try:
        sent = b"x" * 1_000_000
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(sent)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert got == sent.upper() * 2
        assert (counters.rx_bytes, counters.tx_bytes) == (len(sent), 2 * len(sent))
        assert counters.connections == 1
    finally:
        await proxy.close()
        app.close()


async def test_close_ends_live_connections_and_the_listener() -> None:
    async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hello")
        await w.drain()
        await r.read()
        w.close()

    app, private = await _app(hold)
    proxy = IngressProxy("127.0.0.1")
    await proxy.start(0, private)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await reader.readexactly(5) == b"hello"
    await asyncio.wait_for(proxy.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # or a reset, never a hang
    writer.close()
    assert refused(f"127.0.0.1:{proxy.port}")
    app.close()


def _unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _refused_by(proxy: IngressProxy) -> None:
    """Connect through the proxy and see the connection closed with nothing said."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        pass
    writer.close()


async def test_a_client_is_closed_when_the_app_is_not_listening() -> None:
    nobody = _unused_port()
    proxy = IngressProxy("127.0.0.1")
    counters = await proxy.start(0, nobody)
    try:
        await _refused_by(proxy)
        assert (counters.rx_bytes, counters.tx_bytes) == (0, 0)
    finally:
        await proxy.close()


async def test_the_metric_shipper_emits_what_the_proxy_carried(driver: ProcessDriver) -> None:
    shipper = MetricShipper(driver, stub=None, server=lambda: "s", server_totals=False)  # type: ignore[arg-type]
    started = await driver.start(spec(SERVE_BLOB))
    await running(driver, started.container_id)
    shipper.sample()
    async with httpx.AsyncClient(trust_env=False) as client:
        for _ in range(2):
            assert len((await client.get(f"http://{started.address}/blob.bin")).content) == BLOB
    shipper.sample()
    net = [s for s in shipper.pending if s.metric in (RX_BYTES, TX_BYTES)]
    assert {s.container_id for s in net} == {started.container_id}
    first, second = net[:2], net[2:]
    assert [s.value for s in first] == [0, 0]  # before any client
    rx, tx = (s.value for s in second)
    assert [s.metric for s in second] == [RX_BYTES, TX_BYTES]
    assert rx > 2 * len("GET /blob.bin HTTP/1.1\r\n") and 2 * BLOB < tx < 2 * BLOB + 4000


async def test_connections_do_not_inherit_the_context_the_proxy_was_started_in() -> None:
    """The proxy starts inside a StartContainer RPC; its connections (and the wake one may
    start) must not run as that RPC: no request id, no caller."""
    from shared.context import request_id_var

    nobody = _unused_port()
    seen: list[str] = []

    async def before_connect() -> None:
        seen.append(request_id_var.get())
        raise ConnectionError("no app here")

    proxy = IngressProxy("127.0.0.1")
    token = request_id_var.set("rpc-that-started-it")
    try:
        await proxy.start(0, nobody)
    finally:
        request_id_var.reset(token)
    proxy.before_connect = before_connect
    try:
        await _refused_by(proxy)
    finally:
        await proxy.close()
    assert seen == [""]
