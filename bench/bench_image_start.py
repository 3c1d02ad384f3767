"""The start of a container image on a server that already has it, next to its first start
(pulled and unpacked), in one run on one machine.

A real registry (the reference `docker-registry`) on loopback holds a small image built with
umoci (tests/support/registry.py); the agent's container driver starts it as a deployment
would: pull with skopeo into the server's OCI layout, unpack with umoci, then the runc
container until its app answers its health check. Each round uses a fresh image (a new
marker, so new layer bytes; by default 100 MB of incompressible content, the size of a
small real image) on a fresh store, started three times:

- first: nothing of it on the server;
- again by tag (a new deployment of the same tag): one manifest request, no copy, no unpack;
- again pinned by digest (a restart, a rollback, a config change): no network at all.

Needs root and the container driver's tools plus skopeo, umoci and docker-registry; without
them it says why and measures nothing.

Run: .venv/bin/python bench/bench_image_start.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.agent.containers import (
    ContainerDriver,
    images_unavailable_reason,
    unavailable_reason,
)
from services.agent.domain import ContainerSpec, ContainerState
from shared.resources import Resources
from tests.support.registry import Registry, build_image, missing_tools, running_registry


async def start(driver: ContainerDriver, image: str) -> float:
    """Seconds from StartContainer to the app answering (the container RUNNING)."""
    spec = ContainerSpec(
        container_id=f"bench-{secrets.token_hex(4)}",
        deployment_id=secrets.token_hex(6),
        project_id="bench-project",
        image=image,
        resources=Resources(128, 500),
    )
    started = time.perf_counter()
    info = await driver.start(spec)
    while info.state is not ContainerState.RUNNING:
        if info.state.ended:
            raise RuntimeError(f"the image did not start: {info.reason}")
        await asyncio.sleep(0.005)
        info = driver.inspect(spec.container_id) or info
    elapsed = time.perf_counter() - started
    await driver.stop(spec.container_id, grace=1)
    return elapsed


async def one_round(tmp: Path, registry: Registry, payload_mb: int) -> tuple[float, float, float]:
    marker = secrets.token_hex(8)
    digest = build_image(
        tmp / "image", registry, "bench", marker, marker=marker, payload_mb=payload_mb
    )
    tagged = f"{registry.address}/bench:{marker}"
    driver = ContainerDriver(
        state_dir=tmp / "agent", insecure_registries=(registry.address,), start_timeout=60
    )
    try:
        first = await start(driver, tagged)
        by_tag = await start(driver, tagged)
        pinned = await start(driver, f"{registry.address}/bench@{digest}")
    finally:
        await driver.close()
    return first, by_tag, pinned


async def bench(args: argparse.Namespace, tmp: Path) -> None:
    rounds: list[tuple[float, float, float]] = []
    with running_registry(tmp / "registry") as registry:
        for n in range(args.rounds):
            rounds.append(await one_round(tmp / f"round-{n}", registry, args.payload_mb))
    first, by_tag, pinned = (statistics.median(r[i] for r in rounds) for i in range(3))
    print(
        f"{args.rounds} rounds, a busybox httpd image with {args.payload_mb} MB of content "
        "from a loopback registry, "
        f"{os.cpu_count()} CPUs; median shown"
    )
    print(f"{'':<48}{'seconds':>9}")
    print(f"{'first start (pull, unpack, run)':<48}{first:>9.3f}")
    print(f"{'again by tag (manifest request, cached layers)':<48}{by_tag:>9.3f}")
    print(f"{'again by digest (nothing fetched)':<48}{pinned:>9.3f}")
    print(f"by tag / first = {by_tag / first:.2f}; by digest / first = {pinned / first:.2f}")
    print("  (aim <= 0.1)")
    print("all rounds (s):", [tuple(round(x, 3) for x in r) for r in rounds])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--payload-mb", type=int, default=100, help="incompressible content in the image"
    )
    args = parser.parse_args()
    why = unavailable_reason() or images_unavailable_reason() or ", ".join(missing_tools())
    if why:
        print(f"bench_image_start: nothing measured: {why}")
        return
    tmp = Path(tempfile.mkdtemp(prefix="hangar-bench-image-"))
    try:
        asyncio.run(bench(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
