"""Sleep and wake: what the first request to a sleeping app costs, side by side in one run
with the same request to the app awake and with deploying the app from nothing (a start
until healthy, then the request).

The app is `python3 -m http.server` (about 0.1 s to start) run by the real ProcessDriver; the
client is httpx in this process, a new connection per request. Each cycle puts the app to
sleep (SleepContainer's path), times one request that wakes it, then one that finds it awake.
Not a test: it prints figures.

    .venv/bin/python bench/bench_wake.py [--cycles 30]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.bench_agent_proxy import running
from services.agent.domain import ContainerSpec
from services.agent.drivers import ProcessDriver

APP = 'exec python3 -m http.server --bind 127.0.0.1 "$PORT"'


async def _get(client: httpx.AsyncClient, address: str) -> float:
    started = time.perf_counter()
    reply = await client.get(f"http://{address}/")
    assert reply.status_code == 200
    return (time.perf_counter() - started) * 1000


def _row(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"  {name:<34} p50 {statistics.median(ordered):7.1f} ms   p99 {p99:7.1f} ms"


async def bench(cycles: int) -> None:
    driver = ProcessDriver(start_timeout=15, stop_grace=2, probe_interval=0.01)
    woken, awake, fresh = [], [], []
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
    finally:
        await client.aclose()
        await driver.close()
    print(f"wake: {cycles} cycles of sleep -> request, python3 -m http.server, new connections")
    print(_row("request to the app awake", awake))
    print(_row("first request to the app asleep", woken))
    print(_row("deploy from nothing, then request", fresh))
    cost = statistics.median(woken) - statistics.median(awake)
    print(f"  wake cost (p50, asleep - awake): {cost:.1f} ms")


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
