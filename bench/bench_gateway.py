"""`GET /v1/projects/{id}` through the gateway, next to the same GetProject called directly
over gRPC and next to a bare Starlette JSON endpoint, in one run on one machine.

The whole platform runs as real processes (tests/support/stack.py: identity, billing, project,
runtime, gateway; no agent) against one PostgreSQL (DATABASE_URL if set, else an embedded
pgserver). The bare endpoint is a Starlette app on uvicorn with uvloop, in its own process,
answering a fixed JSON body of the same size as the project: the floor of "HTTP/JSON in
Python" on this machine, with no upstream call at all.

Load generator (this process, uvloop): for HTTP, a raw asyncio HTTP/1.1 client, one
keep-alive connection per in-flight request, each sending a pre-built request and reading the
response by Content-Length (much cheaper per request than httpx, whose own cost would
otherwise dominate on a small machine); for gRPC, one grpc.aio channel with N calls in
flight. The client runs on the same cores as the servers: its CPU time per request is printed
next to each server process's, so the figures can be read for what they are. Rounds
alternate (gateway, direct, bare) and the median round of each is shown.

Run: .venv/bin/python bench/bench_gateway.py [--seconds 5] [--inflight 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import httpx
import psutil

from hangar.project.v1 import project_pb2 as pb
from hangar.project.v1 import project_pb2_grpc

BARE_APP = """
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

BODY = {body}

async def project(request):
    return JSONResponse({{**BODY, "id": request.path_params["id"]}})

app = Starlette(routes=[Route("/v1/projects/{{id}}", project)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop",
            log_level="warning", access_log=False)
"""


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    client_cpu_us: float  # this process's CPU per request
    server_cpu_us: dict[str, float]  # each server process's CPU per request


def _summary(latencies: list[float], elapsed: float) -> tuple[float, float, float]:
    latencies.sort()
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
    return len(latencies) / elapsed, statistics.median(latencies) * 1000, p99 * 1000


async def _http_worker(
    host: str, port: int, request: bytes, stop: float, latencies: list[float]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
                    break
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if status != b"200":
                raise RuntimeError(f"HTTP {status.decode()}: {head.decode(errors='replace')}")
    finally:
        writer.close()


def http_driver(base: str, path: str, headers: dict[str, str]) -> Callable[..., Awaitable]:
    host, _, port = base.removeprefix("http://").rpartition(":")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def drive(seconds: float, inflight: int) -> tuple[list[float], float]:
        warm: list[float] = []
        await asyncio.gather(
            *(
                _http_worker(host, int(port), request, time.perf_counter() + 0.3, warm)
                for _ in range(inflight)
            )
        )
        latencies: list[float] = []
        began = time.perf_counter()
        stop = began + seconds
        await asyncio.gather(
            *(_http_worker(host, int(port), request, stop, latencies) for _ in range(inflight))
        )
        return latencies, time.perf_counter() - began

    return drive


def grpc_driver(address: str, project_id: str, token: str) -> Callable[..., Awaitable]:
    request = pb.GetProjectRequest(id=project_id)
    metadata = (("authorization", f"Bearer {token}"),)

    async def drive(seconds: float, inflight: int) -> tuple[list[float], float]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = project_pb2_grpc.ProjectServiceStub(channel)
            for _ in range(200):
                await stub.GetProject(request, metadata=metadata)
            latencies: list[float] = []
            began = time.perf_counter()
            stop = began + seconds

            async def worker() -> None:
                while time.perf_counter() < stop:
                    started = time.perf_counter()
                    reply = await stub.GetProject(request, metadata=metadata)
                    latencies.append(time.perf_counter() - started)
                    if reply.id != project_id:
                        raise RuntimeError("wrong project")

            await asyncio.gather(*(worker() for _ in range(inflight)))
            return latencies, time.perf_counter() - began

    return drive


async def measure(
    drive: Callable[..., Awaitable], servers: dict[str, psutil.Process], args: argparse.Namespace
) -> Run:
    def cpu() -> dict[str, float]:
        out = {name: sum(p.cpu_times()[:2]) for name, p in servers.items()}
        out["client"] = time.process_time()
        return out

    before = cpu()
    latencies, elapsed = await drive(args.seconds, args.inflight)
    after = cpu()
    rps, p50, p99 = _summary(latencies, elapsed)
    n = len(latencies)
    per = {name: (after[name] - before[name]) / n * 1e6 for name in before}
    client = per.pop("client")
    return Run(rps, p50, p99, client, per)


def _median(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.rps)[len(runs) // 2]


@dataclass
class Setup:
    pg: Any
    stack: Any
    bare: subprocess.Popen[bytes]
    bare_url: str
    project_id: str
    token: str


def set_up(args: argparse.Namespace, tmp: Path, pg: Any) -> Setup:
    """Database, the platform, an owner with a project, and the bare app (before any load)."""
    from shared.migrate import migrate
    from shared.pg import create_database
    from tests.support.procs import free_port
    from tests.support.stack import owner_with_project, start_stack, wait_for

    url = asyncio.run(create_database(pg.url, f"bench_{secrets.token_hex(4)}"))
    passwords = {
        s: secrets.token_urlsafe(12) for s in ("identity", "project", "runtime", "billing")
    }
    migrate(url, passwords)
    extra = {"PYTHONPATH": args.pythonpath} if args.pythonpath else {}
    stack = start_stack(url, passwords, tmp / "stack", agent=False, extra_env=extra)
    try:
        owner, project = owner_with_project(stack, "bench-gw")
        port = free_port()
        script = tmp / "bare_app.py"
        script.write_text(BARE_APP.format(body=repr({k: v for k, v in project.items()})))
        bare = subprocess.Popen(
            [sys.executable, str(script), str(port)], env={**os.environ, **extra}
        )
        bare_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(f"{bare_url}/v1/projects/x"), "the bare Starlette app")
    except BaseException:
        stack.stop()
        raise
    return Setup(pg, stack, bare, bare_url, project["id"], owner.token)


async def bench(args: argparse.Namespace, setup: Setup) -> None:
    stack = setup.stack
    path = f"/v1/projects/{setup.project_id}"
    auth = {"Authorization": f"Bearer {setup.token}"}
    procs = {name: psutil.Process(p.proc.pid) for name, p in stack.processes.items()}
    drivers = {
        "gateway (HTTP -> gRPC)": (
            http_driver(stack.url, path, auth),
            {n: procs[n] for n in ("gateway", "project", "identity")},
        ),
        "direct gRPC GetProject": (
            grpc_driver(stack.addresses["project"], setup.project_id, setup.token),
            {n: procs[n] for n in ("project", "identity")},
        ),
        "bare Starlette JSON": (
            http_driver(setup.bare_url, path, {}),
            {"starlette": psutil.Process(setup.bare.pid)},
        ),
    }
    runs: dict[str, list[Run]] = {name: [] for name in drivers}
    for _ in range(args.rounds):
        for name, (drive, servers) in drivers.items():
            runs[name].append(await measure(drive, servers, args))
    stack.check_alive()

    print(
        f"{args.inflight} requests in flight, {args.rounds} alternating rounds of"
        f" {args.seconds:.0f}s (median round shown), {os.cpu_count()} CPUs,"
        f" PostgreSQL {setup.pg.kind}; HTTP load: raw asyncio HTTP/1.1 keep-alive client"
        f" ({args.inflight} connections); gRPC load: grpc.aio, one channel"
    )
    print(f"{'':<26}{'rps':>8}{'p50 ms':>9}{'p99 ms':>9}   CPU us/request")
    medians = {name: _median(r) for name, r in runs.items()}
    for name, run in medians.items():
        cpu = "  ".join(f"{k} {v:.0f}" for k, v in run.server_cpu_us.items())
        print(
            f"{name:<26}{run.rps:>8.0f}{run.p50_ms:>9.2f}{run.p99_ms:>9.2f}"
            f"   client {run.client_cpu_us:.0f}  {cpu}"
        )
    gateway = medians["gateway (HTTP -> gRPC)"]
    direct = medians["direct gRPC GetProject"]
    floor = medians["bare Starlette JSON"]
    print(f"gateway / direct gRPC = {gateway.rps / direct.rps:.2f}  (aim >= 0.5)")

    # On a small machine the client competes with the servers: compare CPU per request too.
    def servers_cpu(run: Run) -> float:
        return sum(run.server_cpu_us.values())

    with_client = (servers_cpu(direct) + direct.client_cpu_us) / (
        servers_cpu(gateway) + gateway.client_cpu_us
    )
    print(
        "CPU per request, servers only: gateway path"
        f" {servers_cpu(gateway):.0f} us, direct {servers_cpu(direct):.0f} us"
        f" -> direct/gateway = {servers_cpu(direct) / servers_cpu(gateway):.2f};"
        f" servers + client: {with_client:.2f}"
    )
    print(f"bare Starlette / gateway = {floor.rps / gateway.rps:.2f}")
    rounds = {n: [round(r.rps) for r in rs] for n, rs in runs.items()}
    print("all rounds (rps):", json.dumps(rounds))


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--pythonpath", default="", help="prepended to the servers' PYTHONPATH (e.g. httptools)"
    )
    args = parser.parse_args()
    import uvloop

    from shared.pg import provision

    tmp = Path(tempfile.mkdtemp(prefix="hangar-bench-gw-"))
    pg = provision(tmp / "pgdata", ephemeral=True)
    setup = None
    try:
        setup = set_up(args, tmp, pg)
        uvloop.run(bench(args, setup))
    finally:
        if setup is not None:
            setup.bare.terminate()
            setup.bare.wait()
            setup.stack.stop()
        pg.stop()


if __name__ == "__main__":
    main()
