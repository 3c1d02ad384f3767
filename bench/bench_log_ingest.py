"""Log ingest: lines/s from an app's stdout through the agent's shipper, ShipLogs and runtime's
COPY into the partitioned logs table, side by side in one run with a raw asyncpg COPY of
the same lines and with one INSERT per line; then TailLogs delivery latency, from the app's
print to the tail's client.

- end to end: a real app process prints N lines as fast as it can; the agent's ProcessDriver
  reads them, the LogShipper ships them (this process), runtime stores them (its own
  process); the clock stops when runtime has acknowledged line N (stored and committed).
- raw COPY: the same N rows, COPYed by asyncpg in batches of the shipper's batch size.
- INSERT per line: one autocommitted INSERT per row (a sample of the lines, extrapolated).
- tail latency: an app prints a line carrying its own time.time() every 10 ms; a TailLogs
  client subtracts it from its clock on receipt.

    .venv/bin/python bench/bench_log_ingest.py [--lines 200000] [--batch 2000]
PostgreSQL: an embedded one (pgserver) in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from hangar.runtime.v1 import runtime_pb2 as pb
from services.runtime.projects import ProjectInfo, ResolvedEnv
from shared.context import Principal
from shared.ids import new_id
from shared.settings import SERVICES

LINE = "GET /api/items?page={i} 200 12ms user-agent=bench-client/1.0 request-id={i:012d}"


# ------------------------------------------------------------------------------------------
# BENCH ONLY, NOT FOR TESTS: stand-ins for identity and project, so the bench times ingest
# without them. They believe "user:<id>" / "service:<name>" bearer tokens, let user "bench"
# read the projects "project" and "tailed" of organization "org", and nobody else anything.
# Tests never use them (house rule 2: real identity and project, tests/support/runtime.py).
# ------------------------------------------------------------------------------------------

BENCH_PROJECTS = {"project": "org", "tailed": "org"}


class BenchTokenNames:
    """BENCH ONLY: an authenticator that believes the token names the principal."""

    async def authenticate(self, token: str) -> Principal:
        from shared.context import PrincipalKind
        from shared.errors import Unauthenticated

        kind, _, subject = token.partition(":")
        if kind == "user" and subject:
            return Principal(kind=PrincipalKind.USER, subject=subject)
        if kind == "service" and subject:
            return Principal(kind=PrincipalKind.SERVICE, subject=subject)
        raise Unauthenticated("bad bench token")


class BenchAccess:
    """BENCH ONLY: Authorizer and Projects in one: user "bench" owns organization "org"."""

    async def require(self, organization_id: str, permission: str) -> int:
        from shared.auth import require_caller
        from shared.errors import PermissionDenied

        principal = require_caller()
        if not principal.is_user or (organization_id, principal.subject) != ("org", "bench"):
            raise PermissionDenied(f"missing permission {permission} in this organization")
        return 4

    async def organization_of(self, project_id: str) -> str:
        await self.require(BENCH_PROJECTS.get(project_id, ""), "projects.get")
        return BENCH_PROJECTS[project_id]

    async def get(self, project_id: str) -> ProjectInfo:
        from shared.resources import Resources

        return ProjectInfo(
            project_id, await self.organization_of(project_id), Resources(128, 100), "local"
        )

    async def resolve_secrets(self, project_id: str) -> ResolvedEnv:
        return ResolvedEnv({}, "")


async def bench_agent_token() -> str:
    return "service:agent"


def serve_runtime(url: str, passwords: dict[str, str], port: int) -> None:
    """Runtime (with the telemetry RPCs) in its own process until terminated, behind the
    BENCH ONLY stand-ins above."""
    import uvloop

    from services.runtime.server import RuntimeApp
    from shared.db import Database
    from shared.server import start_server
    from tests.support.runtime import runtime_settings

    async def serve() -> None:
        config = runtime_settings(url, passwords, telemetry_sample_seconds=1.0)
        db = await Database.connect(config.service_database_url(), min_size=1, max_size=20)
        access = BenchAccess()
        app = RuntimeApp(config, db, authorizer=access, projects=access, background=False)
        server = await start_server(  # kept referenced: a collected server stops serving
            app, f"127.0.0.1:{port}", authenticator=BenchTokenNames(), grace=0.2
        )
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    uvloop.run(serve())


def app_command(lines: int) -> str:
    code = (
        "import sys\n"
        "w = sys.stdout.write\n"
        f"L = {LINE!r}\n"
        f"for i in range({lines}):\n"
        "    w(L.format(i=i) + '\\n')\n"
        "sys.stdout.flush()\n"
        "import time; time.sleep(600)\n"
    )
    return f'{sys.executable} -c "{code}"'


def ticker_command(count: int) -> str:
    code = (
        "import time\n"
        f"for i in range({count}):\n"
        "    print('tick', repr(time.time()), flush=True)\n"
        "    time.sleep(0.01)\n"
        "time.sleep(600)\n"
    )
    return f'{sys.executable} -c "{code}"'


async def place(admin_url: str, project: str = "project", org: str = "org") -> tuple[str, str]:
    """(server id, container id) rows for a container of `project`."""
    conn = await asyncpg.connect(admin_url)
    try:
        server = new_id()
        await conn.execute(
            """INSERT INTO runtime.servers (id, name, region, agent_address, ram_mb, cpu_millis)
               VALUES ($1, $1, 'local', '127.0.0.1:1', 4096, 4000)""",
            server,
        )
        deployment = new_id()
        await conn.execute(
            """INSERT INTO runtime.deployments (id, project_id, organization_id, server_id,
                   status, command, ram_mb, cpu_millis, region, replica_set_id)
               VALUES ($1, $2, $3, $4, 'starting', 'app', 128, 100, 'local', $1)""",
            deployment,
            project,
            org,
            server,
        )
        container = new_id()
        await conn.execute(
            """INSERT INTO runtime.containers (id, project_id, deployment_id, server_id, status)
               VALUES ($1, $2, $3, $4, 'running')""",
            container,
            project,
            deployment,
            server,
        )
        return server, container
    finally:
        await conn.close()


async def end_to_end(admin_url: str, address: str, lines: int, batch: int) -> float:
    from services.agent.domain import ContainerSpec
    from tests.support.telemetry import shipping_agent

    _, container = await place(admin_url)
    async with shipping_agent(
        address, bench_agent_token, log_lines=lines + 10, batch_lines=batch
    ) as (
        driver,
        logs,
        _metrics,
    ):
        started = time.perf_counter()
        await driver.start(
            ContainerSpec(
                container_id=container,
                deployment_id="d",
                project_id="project",
                command=app_command(lines),
            )
        )
        while logs.acknowledged.get(container, 0) < lines:  # noqa: ASYNC110 - polls a counter
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        buffer = driver.logs(container)
        assert buffer is not None and buffer.dropped == 0, "lines were dropped"
    conn = await asyncpg.connect(admin_url)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM runtime.logs WHERE container_id = $1", container
        )
    finally:
        await conn.close()
    assert stored == lines, (stored, lines)
    return lines / elapsed


def rows_for(container: str, lines: int) -> list[tuple[object, ...]]:
    now = datetime.now(UTC)
    return [
        ("project", "d", container, "stdout", LINE.format(i=i), now, i + 1) for i in range(lines)
    ]


async def raw_copy(url: str, lines: int, batch: int) -> float:
    columns = ["project_id", "deployment_id", "container_id", "stream", "line", "emitted_at",
               "sequence"]  # fmt: skip
    rows = rows_for(new_id(), lines)
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        for i in range(0, lines, batch):
            await conn.copy_records_to_table(
                "logs", schema_name="runtime", records=rows[i : i + batch], columns=columns
            )
        return lines / (time.perf_counter() - started)
    finally:
        await conn.close()


async def insert_per_line(url: str, lines: int) -> float:
    rows = rows_for(new_id(), lines)
    conn = await asyncpg.connect(url)
    try:
        statement = await conn.prepare(
            """INSERT INTO runtime.logs (project_id, deployment_id, container_id, stream, line,
                   emitted_at, sequence) VALUES ($1, $2, $3, $4, $5, $6, $7)"""
        )
        started = time.perf_counter()
        for row in rows:
            await statement.fetch(*row)
        return lines / (time.perf_counter() - started)
    finally:
        await conn.close()


async def tail_latency(admin_url: str, address: str, count: int) -> list[float]:
    import grpc

    from services.agent.domain import ContainerSpec
    from tests.support.telemetry import shipping_agent

    _, container = await place(admin_url, project="tailed")
    channel = grpc.aio.insecure_channel(address)
    stub = __import__("hangar.runtime.v1.runtime_pb2_grpc", fromlist=["x"]).RuntimeServiceStub(
        channel
    )
    tail = stub.TailLogs(
        pb.TailLogsRequest(project_id="tailed"),
        metadata=(("authorization", "Bearer user:bench"),),
    )
    await tail.initial_metadata()
    latencies: list[float] = []
    async with shipping_agent(address, bench_agent_token) as (driver, _logs, _metrics):
        await driver.start(
            ContainerSpec(
                container_id=container,
                deployment_id="d",
                project_id="tailed",
                command=ticker_command(count),
            )
        )
        async for entry in tail:
            latencies.append(time.time() - float(entry.line.split()[1]))
            if len(latencies) == count:
                break
    tail.cancel()
    await channel.close()
    return latencies


async def bench(url: str, passwords: dict[str, str], args: argparse.Namespace) -> None:
    from tests.support.procs import free_port

    # The runtime process logs in as the runtime role; the agent and the checks as admin.
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=serve_runtime, args=(url, passwords, port), daemon=True
    )
    process.start()
    address = f"127.0.0.1:{port}"
    try:
        await _wait_port(address)
        # Registered for the tail: the runtime process's directory gives ("tailed" -> org).
        e2e = await end_to_end(url, address, args.lines, args.batch)
        copy = await raw_copy(url, args.lines, args.batch)
        inserts = await insert_per_line(url, min(args.lines, args.insert_lines))
        print(f"log ingest, {args.lines} lines of ~{len(LINE.format(i=0))} chars, "
              f"batches of {args.batch}:")  # fmt: skip
        print(f"  end to end (app -> agent -> ShipLogs -> runtime COPY): {e2e:>10,.0f} lines/s")
        print(f"  raw asyncpg COPY, same rows and batches:             {copy:>10,.0f} lines/s")
        print(f"  one INSERT per line ({min(args.lines, args.insert_lines)} lines):"
              f"{'':<17}{inserts:>10,.0f} lines/s")  # fmt: skip
        print(f"  end to end / raw COPY: {e2e / copy:.2f}; / INSERT per line: {e2e / inserts:.1f}")
    finally:
        pass
    try:
        latencies = await tail_latency(url, address, args.tail_lines)
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
        print(f"TailLogs delivery, print -> client, {len(latencies)} lines at 100/s: "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1] * 1000:.1f} ms")  # fmt: skip
    finally:
        process.terminate()
        process.join(5)


async def _wait_port(address: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 20
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--insert-lines", type=int, default=20_000)
    parser.add_argument("--tail-lines", type=int, default=500)
    args = parser.parse_args()

    from shared.migrate import migrate
    from shared.pg import create_database, provision

    pg = provision(Path(tempfile.mkdtemp(prefix="hangar-bench-")), ephemeral=True)
    try:
        url = asyncio.run(create_database(pg.url, f"hangar_bench_{secrets.token_hex(4)}"))
        passwords = {svc: secrets.token_urlsafe(16) for svc in SERVICES}
        migrate(url, passwords)
        import uvloop

        uvloop.run(bench(url, passwords, args))
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
