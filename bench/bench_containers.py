"""What isolation costs: the container driver (runc) against the process driver, side by
side in one run, on the same app (`python3 -m http.server`).

1. Start to first answered request (through the agent's proxy), p50 / p99.
2. Waking a sleeping app: frozen (cgroup freezer) vs stopped (started again) vs a request
   to an app that is awake, p50 / p99.
3. Bulk throughput through the proxy into the container's network namespace vs into a
   plain process on the host's loopback.

Needs root and runc, slirp4netns, tini (make test installs them). Not a test: it prints
figures.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time

import httpx

from services.agent.containers import ContainerDriver, unavailable_reason
from services.agent.domain import ContainerSpec, ContainerState
from services.agent.drivers import ProcessDriver
from services.agent.oci import DEFAULT_PATH
from shared.resources import Resources

MB = 1024 * 1024
SERVE = 'exec python3 -m http.server "$PORT"'


def _spec(command: str = SERVE, ram_mb: int = 256) -> ContainerSpec:
    return ContainerSpec(
        container_id=f"bench-{secrets.token_hex(4)}",
        deployment_id="bench",
        project_id="bench",
        command=command,
        resources=Resources(ram_mb, 2000),  # the whole machine: a process is not limited either
    )


async def _first_answer(client: httpx.AsyncClient, address: str, deadline: float) -> None:
    while time.perf_counter() < deadline:
        try:
            if (await client.get(f"http://{address}/")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.002)
    raise RuntimeError("the app never answered")


async def _running(driver: ProcessDriver, container_id: str) -> str:
    while (info := driver.inspect(container_id)) and info.state is not ContainerState.RUNNING:
        if info.state.ended:
            raise RuntimeError(f"app ended: {info}")
        await asyncio.sleep(0.01)
    assert info is not None
    return info.address


async def start_latencies(drivers: dict[str, ProcessDriver], rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in drivers}
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        for _ in range(rounds):
            for name, driver in drivers.items():  # alternate: both see the same machine
                began = time.perf_counter()
                info = await driver.start(_spec())
                await _first_answer(client, info.address, began + 30)
                out[name].append((time.perf_counter() - began) * 1000)
                await driver.stop(info.container_id, grace=2)
    return out


async def wake_latencies(
    frozen: ContainerDriver, stopped: ContainerDriver, rounds: int
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"frozen": [], "stopped": [], "awake": []}
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        apps = {}
        for name, driver in (("frozen", frozen), ("stopped", stopped)):
            info = await driver.start(_spec())
            apps[name] = (driver, info.container_id, await _running(driver, info.container_id))
        for _ in range(rounds):
            for name in ("frozen", "stopped", "awake"):
                driver, container_id, address = apps["frozen" if name == "awake" else name]
                if name != "awake":
                    await _settle_sleep(driver, container_id)
                began = time.perf_counter()
                reply = await client.get(f"http://{address}/")
                out[name].append((time.perf_counter() - began) * 1000)
                assert reply.status_code == 200
    return out


async def _settle_sleep(driver: ProcessDriver, container_id: str) -> None:
    """Sleep it (the proxy lets a just-closed connection go first)."""
    for _ in range(200):
        try:
            await driver.sleep(container_id)
            return
        except Exception:
            await asyncio.sleep(0.01)
    raise RuntimeError("the app never went to sleep")


async def throughput(
    drivers: dict[str, ProcessDriver], size_mb: int, downloads: int
) -> dict[str, float]:
    # The working directory: $HOME in a container (tmpfs), a scratch one for a process.
    command = f"head -c {size_mb * MB} /dev/zero > blob.bin && {SERVE}"
    out: dict[str, float] = {}
    async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
        addresses = {}
        for name, driver in drivers.items():
            info = await driver.start(_spec(command, ram_mb=512))
            addresses[name] = await _running(driver, info.container_id)
        for _ in range(2):  # alternate; keep the second (warm) pass
            for name, address in addresses.items():
                began = time.perf_counter()
                for _ in range(downloads):
                    reply = await client.get(f"http://{address}/blob.bin")
                    assert len(reply.content) == size_mb * MB
                out[name] = downloads * size_mb / (time.perf_counter() - began)
    return out


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _table(title: str, rows: dict[str, list[float]]) -> None:
    print(title)
    print(f"{'':24}{'p50 ms':>9}{'p99 ms':>9}{'n':>5}")
    for name, values in rows.items():
        print(f"{name:24}{_pct(values, 50):9.1f}{_pct(values, 99):9.1f}{len(values):5}")


async def bench(args: argparse.Namespace) -> None:
    def common() -> dict[str, float]:
        return {"start_timeout": 30, "stop_grace": 2, "probe_interval": 0.01}

    state = tempfile.mkdtemp(prefix="hangar-bench-")
    container = ContainerDriver(
        state_dir=f"{state}/a", tmpfs_mb=args.mb + 16, freeze_seconds=3600, **common()
    )
    container_stops = ContainerDriver(state_dir=f"{state}/b", freeze_seconds=0, **common())
    # The same python3 in both (the stack's /usr/bin), not whatever the agent's PATH finds.
    process = ProcessDriver(base_env={"PATH": DEFAULT_PATH}, **common())  # type: ignore[arg-type]
    try:
        starts = await start_latencies(
            {"container (runc)": container, "process": process}, args.starts
        )
        wakes = await wake_latencies(container, container_stops, args.wakes)
        bulk = await throughput(
            {"container (runc)": container, "process": process}, args.mb, args.downloads
        )
    finally:
        await asyncio.gather(container.close(), container_stops.close(), process.close())
    print("container driver vs process driver, python3 -m http.server, 2 CPUs")
    _table("\nstart to first answered request (through the proxy):", starts)
    added = _pct(starts["container (runc)"], 50) - _pct(starts["process"], 50)
    print(f"container adds {added:.1f} ms at p50 (aim: under 100 ms)")
    _table("\nrequest to a sleeping app (container driver), and to an awake one:", wakes)
    print(f"frozen wake p50 {_pct(wakes['frozen'], 50):.1f} ms (aim: under 20 ms)")
    print(f"\nthroughput through the proxy, {args.downloads} x {args.mb} MB downloads:")
    for name, mb_s in bulk.items():
        print(f"{name:24}{mb_s:9.1f} MB/s")
    ratio = bulk["container (runc)"] / bulk["process"]
    print(f"container / process = {ratio:.2f} (aim: at least 0.9)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--wakes", type=int, default=30)
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--downloads", type=int, default=10)
    args = parser.parse_args()
    if (why_not := unavailable_reason()) is not None:
        print(f"bench_containers: containers cannot run here: {why_not}", file=sys.stderr)
        sys.exit(1)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
