"""What mutual TLS costs a unary call: project's GetProject (its token check and Authorize
included) over a plaintext channel and over mutual TLS, side by side in one run.

Two whole platforms without agents (tests/support/stack.py: every process `hangar serve`,
one database each on the same PostgreSQL) run at once, one with plaintext as before, one
with start_stack(tls=True), the certificates `hangar up` makes. Against each, from this
process (uvloop, one channel): calls per second and latency with 1 and with N calls in
flight, and a new channel's first call (TCP connect, the TLS handshake when on, and the
call), rounds alternating between the two.

Run: .venv/bin/python bench/bench_mtls.py [--seconds 3] [--inflight 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from bench.bench_authorize import closed_loop, median_run
from hangar.project.v1 import project_pb2 as pb
from hangar.project.v1 import project_pb2_grpc
from shared.clients import make_channel
from tests.support.stack import Stack, owner_with_project, start_stack


def _channel(stack: Stack) -> grpc.aio.Channel:
    address = stack.addresses["project"]
    return make_channel(address, options=[], tls=stack.client_tls, peer="project")


async def _steady(
    stack: Stack, project_id: str, token: str, seconds: float, inflight: int
) -> tuple[float, float, float]:
    request = pb.GetProjectRequest(id=project_id)
    metadata = (("authorization", f"Bearer {token}"),)
    async with _channel(stack) as channel:
        stub = project_pb2_grpc.ProjectServiceStub(channel)

        async def get() -> None:
            assert (await stub.GetProject(request, metadata=metadata)).id == project_id

        return await closed_loop(get, seconds, inflight, warm_up=100)


async def _first_calls(stack: Stack, project_id: str, token: str, count: int) -> float:
    """Median milliseconds from a new channel to its first GetProject's answer."""
    request = pb.GetProjectRequest(id=project_id)
    metadata = (("authorization", f"Bearer {token}"),)
    took = []
    for _ in range(count):
        started = time.perf_counter()
        async with _channel(stack) as channel:
            stub = project_pb2_grpc.ProjectServiceStub(channel)
            await stub.GetProject(request, metadata=metadata, timeout=10)
        took.append((time.perf_counter() - started) * 1000)
    return statistics.median(took)


async def measure(
    stacks: dict[str, tuple[Stack, str, str]], args: argparse.Namespace
) -> dict[str, dict[str, list[tuple[float, float, float]] | list[float]]]:
    results: dict[str, dict[str, list]] = {k: {"one": [], "many": [], "new": []} for k in stacks}
    for _ in range(args.rounds):
        for kind, (stack, project_id, token) in stacks.items():
            figures = results[kind]
            figures["one"].append(await _steady(stack, project_id, token, args.seconds, 1))
            figures["many"].append(
                await _steady(stack, project_id, token, args.seconds, args.inflight)
            )
            figures["new"].append(await _first_calls(stack, project_id, token, 30))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import uvloop

    from shared.migrate import migrate
    from shared.pg import create_database, provision
    from shared.settings import SERVICES

    tmp = Path(tempfile.mkdtemp(prefix="hangar-bench-mtls-"))
    pg = provision(tmp / "pgdata", ephemeral=True)
    running: list[Stack] = []
    try:
        passwords = {s: secrets.token_urlsafe(12) for s in SERVICES}
        stacks: dict[str, tuple[Stack, str, str]] = {}
        for kind in ("plaintext", "mutual TLS"):
            url = asyncio.run(create_database(pg.url, f"bench_{secrets.token_hex(4)}"))
            migrate(url, passwords)
            stack = start_stack(
                url, passwords, tmp / kind.replace(" ", "-"), agent=False, tls=kind != "plaintext"
            )
            running.append(stack)
            owner, project = owner_with_project(stack, f"b{secrets.token_hex(3)}")
            stacks[kind] = (stack, project["id"], owner.token)
        results = uvloop.run(measure(stacks, args))
    finally:
        for stack in running:
            stack.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"GetProject over gRPC, median of {args.rounds} rounds of {args.seconds:g}s"
        " (rounds alternate plaintext / mutual TLS)"
    )
    print(f"{'':<12}{'1 in flight':>28}{f'{args.inflight} in flight':>30}{'new channel':>16}")
    print(
        f"{'':<12}{'calls/s  p50 ms  p99 ms':>28}{'calls/s  p50 ms  p99 ms':>30}{'1st call ms':>16}"
    )
    for kind, figures in results.items():
        one = median_run(figures["one"])  # type: ignore[arg-type]
        many = median_run(figures["many"])  # type: ignore[arg-type]
        new = statistics.median(figures["new"])  # type: ignore[arg-type]
        print(
            f"{kind:<12}{one[0]:>11.0f}{one[1]:>8.2f}{one[2]:>8.2f}"
            f"{many[0]:>14.0f}{many[1]:>8.2f}{many[2]:>8.2f}{new:>16.2f}"
        )


if __name__ == "__main__":
    main()
