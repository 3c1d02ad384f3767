"""The edge (a real Caddy driven by EdgeController) against reaching the same app directly,
side by side in one run: requests/s and latency percentiles over N keep-alive connections;
then how long route updates take to answer, from the controller's source receiving a new
table (p50/p99 over `--updates` updates each): a new hostname (a Caddy config load), and a
project's upstream moving to another app (a deploy: the edge's DNS only, no config load).

The app is a tiny asyncio HTTP/1.1 server in a child process; the client is a raw asyncio
keep-alive loop in this process (lighter than httpx, so the client is not what is measured).
Loopback only. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.edge.caddy import Caddy, EdgeConfig, Route
from services.edge.controller import AskServer, EdgeController, StaticRoutes
from services.edge.dns import UpstreamDns

HOST = "bench-ada.localhost"
APP = r"""
import asyncio, sys
BODY = sys.argv[2].encode() if len(sys.argv) > 2 else b"hello from the app\n"
REPLY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY), BODY)
async def serve(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(REPLY)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    async with server:
        await server.serve_forever()
try:
    import uvloop
    uvloop.install()
except ImportError:
    pass
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


async def _connection(
    port: int, host: str, stop_at: float, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - started) * 1000)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(1)
    finally:
        writer.close()


async def load(port: int, host: str, connections: int, seconds: float) -> tuple[float, list[float]]:
    """Requests/s and per-request latencies (ms) over `connections` keep-alive loops."""
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(
        *(_connection(port, host, stop_at, latencies, errors) for _ in range(connections))
    )
    if errors:
        raise RuntimeError(f"{len(errors)} requests did not answer 200")
    return len(latencies) / (time.perf_counter() - started), latencies


async def answers(port: int, host: str) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return (await reader.readline()).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
    finally:
        writer.close()


async def until(check: Callable[[], Awaitable[bool]], poll: float = 0.05) -> None:
    """Polls `check` until it holds, for at most a minute."""
    deadline = time.monotonic() + 60
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError("gave up waiting")
        await asyncio.sleep(poll)


async def route_updates(
    source: StaticRoutes, http_port: int, upstream: str, count: int
) -> list[float]:
    """ms from the source receiving a table with a new hostname to that name answering."""
    table = [Route(project_id="bench", hostnames=[HOST], upstreams=[upstream])]
    out = []
    for i in range(count):
        name = f"update{i}-ada.localhost"
        table = [*table, Route(project_id=f"u{i}", hostnames=[name], upstreams=[upstream])]
        source.set(table)
        await until(functools.partial(answers, http_port, name), poll=0.001)
        out.append((time.perf_counter() - source.received_at) * 1000)
    return out


async def body_is(port: int, host: str, expected: bytes) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return (await reader.read()).endswith(expected)
    except OSError:
        return False
    finally:
        writer.close()


async def upstream_moves(
    source: StaticRoutes, http_port: int, first: str, second: str, count: int
) -> list[float]:
    """ms from the source receiving the project's new upstream to its answer through the
    edge, alternating between two apps (one answers "other")."""
    out = []
    for i in range(count):
        target, body = (second, b"other") if i % 2 == 0 else (first, b"hello from the app\n")
        source.set([Route(project_id="bench", hostnames=[HOST], upstreams=[target])])
        await until(functools.partial(body_is, http_port, HOST, body), poll=0.001)
        out.append((time.perf_counter() - source.received_at) * 1000)
    return out


async def bench(args: argparse.Namespace) -> None:
    state = Path(tempfile.mkdtemp(prefix="hangar-bench-edge-"))
    app_port, http_port = free_port(), free_port()
    app = await asyncio.create_subprocess_exec(sys.executable, "-c", APP, str(app_port))
    other_port = free_port()
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", APP, str(other_port), "other"
    )
    caddy = Caddy(f"127.0.0.1:{free_port()}", state, stop_grace=5, log_path=state / "caddy.log")
    ask = AskServer()
    dns = UpstreamDns()
    upstream = f"127.0.0.1:{app_port}"
    source = StaticRoutes([Route(project_id="bench", hostnames=[HOST], upstreams=[upstream])])
    edge = EdgeConfig(
        http_address=f"127.0.0.1:{http_port}",
        https_port=free_port(),
        admin_address=caddy.admin_address,
        apps_domain="localhost",
        storage_dir=str(caddy.storage_dir),
        ask_url=await ask.start(),
        dns_address=await dns.start(),
    )
    controller = EdgeController(source, caddy, edge, dns, debounce_seconds=args.debounce)
    ask.controller = controller
    try:
        await controller.start()
        await until(lambda: answers(http_port, HOST))
        await until(lambda: answers(app_port, HOST))
        targets = {"through the edge": http_port, "direct to the app": app_port}
        results: dict[str, tuple[float, list[float]]] = {}
        for _ in range(2):  # alternate, keep the second pass (warm)
            for name, port in targets.items():
                results[name] = await load(port, HOST, args.connections, args.seconds)
        updates = await route_updates(source, http_port, upstream, args.updates)
        moves = await upstream_moves(
            source, http_port, upstream, f"127.0.0.1:{other_port}", args.updates
        )
    finally:
        await controller.close()
        await caddy.stop()
        await ask.close()
        dns.close()
        for child in (app, other):
            child.terminate()
            await child.wait()
        shutil.rmtree(state, ignore_errors=True)
    report(args, results, updates, moves, controller.last_apply_seconds)


def report(
    args: argparse.Namespace,
    results: dict[str, tuple[float, list[float]]],
    updates: list[float],
    moves: list[float],
    last_apply: float,
) -> None:
    print(
        f"edge (Caddy) vs direct: tiny asyncio app, {args.connections} keep-alive connections,"
        f" {args.seconds:g} s each, HTTP/1.1, {os.cpu_count()} CPUs"
    )
    print(f"{'':20}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for name, (rps, lat) in results.items():
        print(f"{name:20}{rps:10.0f}{pct(lat, 50):9.2f}{pct(lat, 99):9.2f}")
    (edge_rps, edge_lat), (app_rps, app_lat) = results.values()
    print(f"edge / direct req/s = {edge_rps / app_rps:.2f}")
    print(f"added p99 latency = {pct(edge_lat, 99) - pct(app_lat, 99):.2f} ms")
    print(
        f"route update -> answering, {len(updates)} updates (debounce {args.debounce * 1000:g} ms):"
        f" p50 {pct(updates, 50):.1f} ms, p99 {pct(updates, 99):.1f} ms;"
        f" last apply (POST /load) {last_apply * 1000:.1f} ms"
    )
    print(
        f"upstream moved (a deploy) -> answering, {len(moves)} moves (DNS, no config load):"
        f" p50 {pct(moves, 50):.1f} ms, p99 {pct(moves, 99):.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--debounce", type=float, default=0.03)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
