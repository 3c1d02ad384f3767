"""Sleep and wake: what the first request to a sleeping app costs, side by side in one run
with the same request to the app awake and with deploying the app from nothing (a start
until healthy, then the request); and the same through the edge, where the request is held
by Caddy while the edge's waker wakes the app (issue #19: the wake at the edge) next to the
app woken by its agent's proxy behind the edge (the path before).

The app is `python3 -m http.server` (about 0.1 s to start) run by the real ProcessDriver; the
client is httpx in this process, a new connection per request. Each cycle puts the app to
sleep (SleepContainer's path), times one request that wakes it, then one that finds it awake.
The edge is a real Caddy with the edge's controller, DNS and waker; the waker's call is the
agent's wake (what runtime's WakeRoute asks of the agent, without the two gRPC hops) followed
by the table listing the app awake (what runtime's route.changed brings).
Not a test: it prints figures.

    .venv/bin/python bench/bench_wake.py [--cycles 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.bench_agent_proxy import running
from services.agent.domain import ContainerSpec
from services.agent.drivers import ProcessDriver
from services.edge.caddy import Caddy, EdgeConfig, Route
from services.edge.controller import AskServer, EdgeController, StaticRoutes
from services.edge.dns import UpstreamDns
from services.edge.wake import RouteWaker, WakePages

HOST = "nap-ada.localhost"
PROJECT = "p-nap"

APP = 'exec python3 -m http.server --bind 127.0.0.1 "$PORT"'


async def _get(client: httpx.AsyncClient, address: str, host: str = "") -> float:
    started = time.perf_counter()
    reply = await client.get(f"http://{address}/", headers={"Host": host} if host else {})
    assert reply.status_code == 200, reply.text[:200]
    return (time.perf_counter() - started) * 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _route(address: str, *, asleep: bool) -> Route:
    return Route(
        project_id=PROJECT,
        hostnames=[HOST],
        upstreams=[] if asleep else [address],
        sleeping_upstreams=[address] if asleep else [],
        sleep_enabled=True,
    )


@contextlib.asynccontextmanager
async def _edge(
    driver: ProcessDriver, container_id: str, address: str
) -> AsyncIterator[tuple[str, StaticRoutes, EdgeController]]:
    """Caddy driven by the edge's controller, DNS and waker, as `hangar serve edge` wires them."""
    state = Path(tempfile.mkdtemp(prefix="hangar-bench-wake-"))
    http_port = _free_port()
    caddy = Caddy(f"127.0.0.1:{_free_port()}", state, stop_grace=5)
    source = StaticRoutes([_route(address, asleep=False)])

    async def wake(project_id: str) -> None:
        await driver.wake(container_id)  # the agent's WakeContainer
        source.set([_route(address, asleep=False)])  # runtime's route.changed

    waker, pages, ask = RouteWaker(wake), WakePages(), AskServer()
    dns = UpstreamDns(waker, await pages.start())
    config = EdgeConfig(
        http_address=f"127.0.0.1:{http_port}",
        https_port=_free_port(),
        admin_address=caddy.admin_address,
        apps_domain="localhost",
        storage_dir=str(caddy.storage_dir),
        ask_url=await ask.start(),
        dns_address=await dns.start(),
        # Caddy's idle connection to the app closes at once, so the agent may put it to sleep.
        sleepy_idle_seconds=0.1,
    )
    controller = EdgeController(source, caddy, config, dns)
    waker.on_done = controller.refresh
    try:
        await controller.start()
        yield f"127.0.0.1:{http_port}", source, controller
    finally:
        await controller.close()
        await waker.close()
        await caddy.stop()
        await ask.close()
        await pages.close()
        dns.close()
        shutil.rmtree(state, ignore_errors=True)


async def _apply(source: StaticRoutes, controller: EdgeController, route: Route) -> None:
    version = controller.applied_version
    source.set([route])
    await asyncio.wait_for(controller.wait_applied(version), 30)


async def edge_cycles(
    driver: ProcessDriver, client: httpx.AsyncClient, cycles: int
) -> tuple[list[float], list[float], list[float]]:
    """(held at the edge while the waker wakes it, woken by the agent's proxy behind the
    edge, awake through the edge), one of each per cycle."""
    spec = ContainerSpec(container_id=f"edge-{secrets.token_hex(4)}", command=APP)
    await driver.start(spec)
    address = await running(driver, spec.container_id, poll=0.01)
    held, proxied, awake = [], [], []
    async with _edge(driver, spec.container_id, address) as (edge, source, controller):
        await _get(client, edge, HOST)
        for _ in range(cycles):
            # The edge's path: the table says asleep, so Caddy holds and the waker wakes.
            await asyncio.sleep(0.3)  # Caddy's pooled connection to the app is idle-closed
            await driver.sleep(spec.container_id)
            await _apply(source, controller, _route(address, asleep=True))
            await asyncio.sleep(0.15)  # Caddy's last SRV answer (100 ms) is stale
            held.append(await _get(client, edge, HOST))
            awake.append(await _get(client, edge, HOST))
            # The path before: the edge still lists it; its agent's proxy wakes it.
            await asyncio.sleep(0.3)
            await driver.sleep(spec.container_id)
            proxied.append(await _get(client, edge, HOST))
    await driver.stop(spec.container_id)
    return held, proxied, awake


def _row(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"  {name:<34} p50 {statistics.median(ordered):7.1f} ms   p99 {p99:7.1f} ms"


async def bench(cycles: int) -> None:
    driver = ProcessDriver(start_timeout=15, stop_grace=2, probe_interval=0.01)
    woken, awake, fresh = [], [], []
    held, proxied, edge_awake = [], [], []
    # One client, no kept-alive connections: each request connects anew, as after a sleep.
    limits = httpx.Limits(max_keepalive_connections=0)
    client = httpx.AsyncClient(trust_env=False, timeout=30, limits=limits)
    try:
        spec = ContainerSpec(container_id=f"wake-{secrets.token_hex(4)}", command=APP)
        await driver.start(spec)
        address = await running(driver, spec.container_id, poll=0.01)
        await _get(client, address)
        for _ in range(cycles):
            await asyncio.sleep(0.05)  # the last client's connection is closed
            await driver.sleep(spec.container_id)
            woken.append(await _get(client, address))
            awake.append(await _get(client, address))
        for _ in range(cycles):
            started = time.perf_counter()
            one = ContainerSpec(container_id=f"fresh-{secrets.token_hex(4)}", command=APP)
            await driver.start(one)
            await _get(client, await running(driver, one.container_id, poll=0.01))
            fresh.append((time.perf_counter() - started) * 1000)
            await driver.stop(one.container_id)
        held, proxied, edge_awake = await edge_cycles(driver, client, cycles)
    finally:
        await client.aclose()
        await driver.close()
    print(f"wake: {cycles} cycles of sleep -> request, python3 -m http.server, new connections")
    print(_row("request to the app awake", awake))
    print(_row("first request to the app asleep", woken))
    print(_row("deploy from nothing, then request", fresh))
    cost = statistics.median(woken) - statistics.median(awake)
    print(f"  wake cost (p50, asleep - awake): {cost:.1f} ms")
    print("through the edge (Caddy, the edge's DNS and waker), same app and client:")
    print(_row("request to the app awake", edge_awake))
    print(_row("asleep, woken by its agent's proxy", proxied))
    print(_row("asleep, held and woken at the edge", held))
    extra = statistics.median(held) - statistics.median(proxied)
    print(f"  edge wake vs agent-proxy wake (p50): {extra:+.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(bench(args.cycles))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(bench(args.cycles))


if __name__ == "__main__":
    main()
