"""Waking at the edge, with a real Caddy: a request for a project whose containers are all
asleep is held by Caddy (the edge's DNS answers its HOLD target) while the edge's waker asks
for a wake, once for a burst of requests; the held requests are answered by the app once
the table lists it awake. A wake that fails ends the held requests with the 503 page and
its reason; one that never shows ends them with the 502 page after the hold, never a hang.

Runtime's side (WakeRoute waking the containers through their agents) is pinned in
test_runtime_wake.py; here the table is fed in-process (StaticRoutes) and the wake is a
function of the test that lists the app awake, as runtime's route.changed would."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest

from services.edge.caddy import Caddy, EdgeConfig, Route
from services.edge.controller import AskServer, EdgeController, StaticRoutes
from services.edge.dns import UpstreamDns
from services.edge.metrics import EdgeMetrics
from services.edge.wake import RouteWaker, WakePages
from shared.metrics import Metrics
from tests.integration import test_edge_caddy
from tests.integration.test_edge_caddy import App
from tests.support.procs import free_port

apps, client = test_edge_caddy.apps, test_edge_caddy.client  # its fixtures

HOST = "sleepy-ada.localhost"
PROJECT = "p-sleepy"
DEADLINE = 60.0  # generous: a loaded 2-core machine


def asleep(*sleeping: str, awake: tuple[str, ...] = ()) -> Route:
    return Route(
        project_id=PROJECT,
        hostnames=[HOST],
        upstreams=list(awake),
        sleeping_upstreams=list(sleeping),
        sleep_enabled=True,
    )


def awake(*upstreams: str) -> Route:
    return Route(
        project_id=PROJECT, hostnames=[HOST], upstreams=list(upstreams), sleep_enabled=True
    )


@dataclass
class Runtime:
    """What runtime's WakeRoute does, for the edge: the calls it got, and what each does
    (`woken`: the table the wake leaves; None: it fails)."""

    source: StaticRoutes
    woken: list[Route] | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    calls: list[str] = field(default_factory=list)

    async def wake(self, project_id: str) -> None:
        self.calls.append(project_id)
        await self.release.wait()
        if self.woken is None:
            raise RuntimeError("the app could not be woken: it exited with code 3")
        self.source.set(self.woken)


@dataclass
class WakingEdge:
    source: StaticRoutes
    controller: EdgeController
    waker: RouteWaker
    runtime: Runtime
    http: str
    metrics: Metrics

    def counted(self, name: str) -> float:
        """A counter of the edge's /metrics (its exposition, read in process)."""
        for line in generate_latest(self.metrics.registry).decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not exposed")

    async def set_routes(self, *routes: Route) -> None:
        version = self.controller.applied_version
        self.source.set(routes)
        await asyncio.wait_for(self.controller.wait_applied(version), DEADLINE)

    async def get(self, client: httpx.AsyncClient, path: str = "/") -> httpx.Response:
        return await client.get(f"{self.http}{path}", headers={"Host": HOST})


@contextlib.asynccontextmanager
async def waking_edge(hold_seconds: float = 30.0) -> AsyncIterator[WakingEdge]:
    """A Caddy driven by the controller, with the edge's waker and failed-wake page wired
    as the edge process wires them (services/edge/server.py)."""
    state = Path(tempfile.mkdtemp(prefix="hangar-edge-wake-"))
    http_port, https_port, admin_port = free_port(), free_port(), free_port()
    caddy = Caddy(f"127.0.0.1:{admin_port}", state, stop_grace=5, log_path=state / "caddy.log")
    source = StaticRoutes()
    runtime = Runtime(source)
    waker = RouteWaker(runtime.wake)
    pages = WakePages()
    ask = AskServer()
    dns = UpstreamDns(waker, await pages.start())
    config = EdgeConfig(
        http_address=f"127.0.0.1:{http_port}",
        https_port=https_port,
        admin_address=caddy.admin_address,
        apps_domain="localhost",
        storage_dir=str(caddy.storage_dir),
        ask_url=await ask.start(),
        dns_address=await dns.start(),
        wake_hold_seconds=hold_seconds,
    )
    metrics = Metrics()
    edge_metrics = EdgeMetrics(metrics)
    controller = EdgeController(
        source, caddy, config, dns, debounce_seconds=0.02, metrics=edge_metrics
    )
    edge_metrics.watch(controller, dns, ask, caddy, waker)
    ask.controller = controller
    waker.on_done = controller.refresh

    def reason_for(hostname: str) -> str | None:
        project = controller.project_of(hostname)
        return waker.failure(project) if project else None

    pages.reason_for = reason_for
    try:
        await controller.start()
        http = f"http://127.0.0.1:{http_port}"
        yield WakingEdge(source, controller, waker, runtime, http, metrics)
    finally:
        runtime.release.set()
        await controller.close()
        await waker.close()
        await caddy.stop()
        await ask.close()
        await pages.close()
        dns.close()
        shutil.rmtree(state, ignore_errors=True)


async def until(condition: Callable[[], bool]) -> None:
    """Polls what the edge's parts count (they signal nothing), within the deadline."""
    async with asyncio.timeout(DEADLINE):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


async def test_a_burst_for_a_sleeping_app_is_held_and_answered_once_it_wakes_with_one_wake(
    apps: Callable[[str], Awaitable[App]], client: httpx.AsyncClient
) -> None:
    app = await apps("sleepy")
    async with waking_edge() as edge:
        await edge.set_routes(asleep(app.address))
        edge.runtime.woken = [awake(app.address)]

        burst = [asyncio.create_task(edge.get(client, f"/{i}")) for i in range(8)]
        # The wake is asked, and Caddy keeps looking the project up meanwhile (it holds the
        # requests): asked again, the waker does not call again.
        await until(lambda: edge.runtime.calls != [] and edge.waker.wanted_calls >= 3)
        assert not any(request.done() for request in burst)  # held, not answered
        assert app.seen == []
        edge.runtime.release.set()

        replies = await asyncio.wait_for(asyncio.gather(*burst), DEADLINE)

        assert [r.status_code for r in replies] == [200] * 8
        assert sorted(r.json()["path"] for r in replies) == sorted(f"/{i}" for i in range(8))
        assert edge.runtime.calls == [PROJECT]  # one wake for the whole burst
        assert edge.counted("edge_wake_calls_total") == 1
        # Awake now: the next request goes straight through, asking nothing.
        assert (await edge.get(client, "/after")).json()["app"] == "sleepy"
        assert edge.runtime.calls == [PROJECT]


async def test_a_failed_wake_answers_the_503_page_with_its_reason(
    client: httpx.AsyncClient,
) -> None:
    async with waking_edge() as edge:
        await edge.set_routes(asleep("127.0.0.1:9"))
        edge.runtime.woken = None  # the wake fails
        edge.runtime.release.set()

        reply = await asyncio.wait_for(edge.get(client), DEADLINE)

        assert reply.status_code == 503
        assert reply.headers["cache-control"] == "no-store"
        assert "could not be woken" in reply.text
        assert "it exited with code 3" in reply.text
        assert edge.runtime.calls == [PROJECT]
        assert edge.counted("edge_wake_failures_total") == 1


async def test_a_wake_that_never_shows_ends_with_the_502_page_after_the_hold(
    client: httpx.AsyncClient,
) -> None:
    async with waking_edge(hold_seconds=2) as edge:
        await edge.set_routes(asleep("127.0.0.1:9"))
        edge.runtime.woken = [asleep("127.0.0.1:9")]  # runtime answers, nothing wakes

        edge.runtime.release.set()
        reply = await asyncio.wait_for(edge.get(client), DEADLINE)

        assert reply.status_code == 502
        assert "not answering" in reply.text
        assert edge.runtime.calls[0] == PROJECT


async def test_a_partly_asleep_app_is_served_by_its_awake_replicas_while_the_rest_wake(
    apps: Callable[[str], Awaitable[App]], client: httpx.AsyncClient
) -> None:
    first, second = await apps("first"), await apps("second")
    async with waking_edge() as edge:
        await edge.set_routes(asleep(second.address, awake=(first.address,)))
        edge.runtime.woken = [awake(first.address, second.address)]

        reply = await asyncio.wait_for(edge.get(client), DEADLINE)

        assert reply.json()["app"] == "first"  # not held: an awake replica serves
        await until(lambda: edge.runtime.calls == [PROJECT])  # the sleeping one is woken
        edge.runtime.release.set()
        served: set[str] = set()
        async with asyncio.timeout(DEADLINE):  # once Caddy looks the project up again
            while served != {"first", "second"}:
                served.add((await edge.get(client)).json()["app"])
        assert edge.runtime.calls == [PROJECT]


@pytest.mark.parametrize("sleeps", [True, False])
def test_only_a_project_that_sleeps_is_held_for_a_wake(sleeps: bool) -> None:
    from services.edge.caddy import caddy_config

    route = Route(project_id=PROJECT, hostnames=[HOST], upstreams=["10.0.0.7:4001"])
    route.sleep_enabled = sleeps
    config = EdgeConfig("127.0.0.1:8000", 8443, "127.0.0.1:2019", "localhost", "/x", "http://a")
    servers = caddy_config([route], config)["apps"]["http"]["servers"]
    handler = servers["hangar_http"]["routes"][1]["handle"][0]
    assert handler["load_balancing"]["try_duration"] == ("30s" if sleeps else "1s")
    # Caddy's idle connections to it close soon, or the agent could not put it to sleep.
    assert handler["transport"].get("keep_alive") == ({"idle_timeout": "10s"} if sleeps else None)
