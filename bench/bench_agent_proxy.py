"""The agent's ingress proxy (which counts each app's network bytes) against reaching the
same app directly, side by side in one run: bulk throughput and per-request latency.

The app is `python3 -m http.server` started through the real ProcessDriver; the client is
httpx in this process. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time

import httpx

from services.agent.domain import ContainerSpec, ContainerState
from services.agent.drivers import ProcessDriver

MB = 1024 * 1024


async def running(driver: ProcessDriver, container_id: str, poll: float = 0.05) -> str:
    """Wait until the container runs; its address."""
    while (info := driver.inspect(container_id)) and info.state is not ContainerState.RUNNING:
        if info.state.ended:
            raise RuntimeError(f"app ended: {info}")
        await asyncio.sleep(poll)
    assert info is not None
    return info.address


async def _bulk(client: httpx.AsyncClient, base: str, count: int, size: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        reply = await client.get(f"{base}/blob.bin")
        assert len(reply.content) == size
    return count * size / MB / (time.perf_counter() - started)


async def _latencies(client: httpx.AsyncClient, base: str, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        reply = await client.get(f"{base}/small.txt")
        assert reply.status_code == 200
        out.append((time.perf_counter() - started) * 1000)
    return out


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


async def bench(args: argparse.Namespace) -> None:
    size = args.mb * MB
    driver = ProcessDriver(start_timeout=15, stop_grace=2, probe_interval=0.05)
    command = (
        f"head -c {size} /dev/urandom > blob.bin && echo hello > small.txt"
        ' && exec python3 -m http.server "$PORT"'
    )
    spec = ContainerSpec(
        container_id=f"bench-{secrets.token_hex(4)}",
        deployment_id="bench",
        project_id="bench",
        command=command,
    )
    try:
        started = await driver.start(spec)
        await running(driver, started.container_id)
        private = driver._containers[started.container_id].private_port
        targets = {
            "through the proxy": f"http://{started.address}",
            "direct to the app": f"http://127.0.0.1:{private}",
        }
        results: dict[str, tuple[float, list[float]]] = {}
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            for _ in range(2):  # alternate, keep the second pass (warm)
                for name, base in targets.items():
                    bulk = await _bulk(client, base, args.downloads, size)
                    lat = await _latencies(client, base, args.requests)
                    results[name] = (bulk, lat)
        sample = driver.sample(started.container_id)
    finally:
        await driver.close()
    print(
        f"agent ingress proxy vs direct: python3 -m http.server, {args.downloads} x {args.mb} MB"
        f" downloads and {args.requests} small GETs each (new connection per request), 2 CPUs"
    )
    print(f"{'':22}{'MB/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for name, (bulk, lat) in results.items():
        print(f"{name:22}{bulk:9.1f}{_pct(lat, 50):9.2f}{_pct(lat, 99):9.2f}")
    proxied, direct = results["through the proxy"], results["direct to the app"]
    print(f"proxy / direct throughput = {proxied[0] / direct[0]:.2f}")
    print(f"added p50 latency = {_pct(proxied[1], 50) - _pct(direct[1], 50):.2f} ms")
    if sample is not None:
        print(f"counted through the proxy: rx {sample.rx_bytes} B, tx {sample.tx_bytes} B")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=20, help="size of the bulk file")
    parser.add_argument("--downloads", type=int, default=10)
    parser.add_argument("--requests", type=int, default=300)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
