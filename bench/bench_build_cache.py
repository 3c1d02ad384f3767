"""A build of an unchanged app with the project's dependency cache, next to its first build
(an empty cache), in one run on one machine.

The agent's own builder (services/agent/builds.py) builds the Python test app (its
dependency installed offline from a wheel inside the upload, plus by default Flask and
Requests from the package index over the network) in the container sandbox, as
for a deployment: fetch and unpack the source, run the build script in a runc container
with the given limits, pack the slug, store it, unpack it. Artifacts come from a local
directory instead of runtime (the one thing not under test here). Each round builds the
same source twice under a new project (so the first build of a round starts with an empty
cache, on a server that never ran the app): the first installs into a new virtualenv, the
second restores it from the cache, and makes the same slug (builds are reproducible), which
this server has unpacked already.
Needs root, runc, slirp4netns and tini (the container driver's needs); without them it says
why and measures nothing.

Run: .venv/bin/python bench/bench_build_cache.py [--rounds 3] [--cpu-millis 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.agent.containers import ContainerDriver, unavailable_reason
from services.agent.domain import ContainerSpec, LogBuffer
from shared.resources import Resources
from tests.support.wheels import python_app_source


class LocalArtifacts:
    """The agent's ArtifactSource over a local directory (runtime's role, not measured)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, path: Path) -> str:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, self.directory / digest)
        return digest

    async def fetch(self, sha256: str) -> Path:
        return self.directory / sha256

    async def put(self, project_id: str, deployment_id: str, path: Path) -> str:
        return await asyncio.to_thread(self.add, path)


async def build_once(
    driver: ContainerDriver, source: str, project: str, args: argparse.Namespace
) -> tuple[float, str]:
    spec = ContainerSpec(
        container_id=f"bench-{secrets.token_hex(4)}",
        deployment_id=secrets.token_hex(6),
        project_id=project,
        source_sha256=source,
        resources=Resources(args.ram_mb, args.cpu_millis),
    )
    logs = LogBuffer(10_000)
    started = time.perf_counter()
    await driver.builder.build(spec, logs)
    elapsed = time.perf_counter() - started
    cached = "cached" if "Using cached dependencies" in logs.text() else "installed"
    return elapsed, cached


async def bench(args: argparse.Namespace, tmp: Path) -> None:
    artifacts = LocalArtifacts(tmp / "artifacts")
    artifacts.directory.mkdir()
    app = python_app_source(tmp / "src")
    if args.requirements:  # a realistic app: real packages from the index, over the network
        extra = "\n".join(args.requirements.split(","))
        (app / "requirements.txt").write_text(
            f"--find-links wheels\nhangar-greeting==1.0\n{extra}\n"
        )
    archive = tmp / "source.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(app, arcname=".")
    source = artifacts.add(archive)
    driver = ContainerDriver(state_dir=tmp / "agent")
    driver.builder.artifacts = artifacts
    firsts, seconds = [], []
    try:
        for _ in range(args.rounds):
            project = f"bench-project-{secrets.token_hex(4)}"
            for unpacked in driver.builder.slugs.iterdir():  # a server that never ran it
                shutil.rmtree(unpacked)
            first, how_first = await build_once(driver, source, project, args)
            second, how_second = await build_once(driver, source, project, args)
            assert (how_first, how_second) == ("installed", "cached"), (how_first, how_second)
            firsts.append(first)
            seconds.append(second)
    finally:
        await driver.close()
    first, second = statistics.median(firsts), statistics.median(seconds)
    deps = args.requirements or "no index packages"
    print(
        f"{args.rounds} rounds, the Python test app (its offline wheel and {deps}), in the "
        f"sandbox with {args.ram_mb} MB and {args.cpu_millis} mCPU, {os.cpu_count()} CPUs;"
        " median shown"
    )
    print(f"{'':<40}{'seconds':>9}")
    print(f"{'first build (empty dependency cache)':<40}{first:>9.2f}")
    print(f"{'second build, unchanged (cache)':<40}{second:>9.2f}")
    print(f"second / first = {second / first:.2f}  (aim <= 0.2)")
    print(
        "all rounds (s): first",
        [round(f, 2) for f in firsts],
        "second",
        [round(s, 2) for s in seconds],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ram-mb", type=int, default=512)
    parser.add_argument("--cpu-millis", type=int, default=1000)
    parser.add_argument(
        "--requirements",
        default="flask==3.0.3,requests==2.32.3",
        help="packages installed from the package index besides the offline wheel "
        "(comma-separated; empty: the offline test app alone)",
    )
    args = parser.parse_args()
    if (why := unavailable_reason()) is not None:
        print(f"bench_build_cache: nothing measured: builds need the container sandbox ({why})")
        return
    tmp = Path(tempfile.mkdtemp(prefix="hangar-bench-build-"))
    try:
        asyncio.run(bench(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
