"""Authorize throughput and latency next to the bare floor, Login per second, and the cost
of a cached decision in a service (RemoteAuthorizer.require's hit path).

Both servers run as subprocesses on this machine, one after the other, against the same
PostgreSQL (DATABASE_URL if set, else an embedded pgserver), driven by the same client
(this process, uvloop, one channel, N calls in flight):

- identity: the real service (`hangar serve identity`): interceptor, service-token check,
  membership lookup, role mapping;
- floor: a bare grpc.aio server answering the same Authorize RPC with one asyncpg lookup of
  the same row by its unique key, no interceptor, no auth.

The hit path runs in this process, as a service runs it: shared.auth.RemoteAuthorizer with a
live AccessWatch on the identity process, next to the pre-#14 TTL-only cache (copied below as
`TtlOnlyAuthorizer`), alternating short rounds (a round blocks the event loop, so it stays
well inside the watch's lease) and checking that no round left the cache.

Run: .venv/bin/python bench/bench_authorize.py [--seconds 5] [--inflight 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from hangar.identity.v1 import identity_pb2 as pb
from hangar.identity.v1 import identity_pb2_grpc
from shared.auth import require_caller
from shared.errors import InvalidArgument, PermissionDenied

# ---------------------------------------------------------------------- the floor server


async def serve_floor(port: int, dsn: str) -> None:
    import asyncpg

    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=10)
    sql = (
        "SELECT role FROM identity.organization_members WHERE organization_id = $1 AND user_id = $2"
    )

    class Floor(identity_pb2_grpc.IdentityServiceServicer):
        async def Authorize(self, request, context):  # type: ignore[no-untyped-def]
            role = await pool.fetchval(sql, request.organization_id, request.user_id)
            return pb.AuthorizeResponse(allowed=role is not None, role=4 if role else 0)

    server = grpc.aio.server()
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(Floor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


# ------------------------------------------------------------------------------ client


async def closed_loop(
    call: Callable[[], Awaitable[object]], seconds: float, inflight: int, *, warm_up: int = 0
) -> tuple[float, float, float]:
    """`inflight` callers repeating `call` for `seconds` (after `warm_up` calls): calls per
    second, p50 and p99 latency in milliseconds."""
    for _ in range(warm_up):  # connections, caches
        await call()
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    return len(latencies) / elapsed, statistics.median(latencies) * 1000, p99 * 1000


async def drive(
    address: str, request: pb.AuthorizeRequest, metadata: tuple, seconds: float, inflight: int
) -> tuple[float, float, float]:
    """Authorize calls per second, p50 and p99 latency in milliseconds."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)

        async def authorize() -> None:
            assert (await stub.Authorize(request, metadata=metadata)).allowed

        return await closed_loop(authorize, seconds, inflight, warm_up=200)


async def logins(address: str, email: str, password: str, seconds: float, inflight: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        request = pb.LoginRequest(email=email, password=password)
        return (await closed_loop(lambda: stub.Login(request), seconds, inflight))[0]


# ---------------------------------------------------------------------- the hit path


class TtlOnlyAuthorizer:
    """The hit path of RemoteAuthorizer before issue #14 (a 5 s TTL cache, nothing else)."""

    def __init__(self, role: int) -> None:
        self._cache: dict[tuple[str, str, str, str], tuple[float, bool, int]] = {}
        self.role = role

    async def require(self, organization_id: str, permission: str) -> int:
        principal = require_caller()
        if not organization_id:
            raise InvalidArgument.field("organization_id", "required")
        key = (principal.kind.value, principal.subject, organization_id, permission)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            _, allowed, role = cached
        else:  # the bench only times hits; a miss fills the entry as identity would
            allowed, role = True, self.role
            self._cache[key] = (now + 5.0, allowed, role)
        if not allowed:
            raise PermissionDenied(f"missing permission {permission} in this organization")
        return role


async def hit_path(settings: object, user_id: str, org_id: str, rounds: int) -> tuple[float, float]:
    """ns per cached require(): (pre-#14 TTL-only, RemoteAuthorizer under a live watch)."""
    from dataclasses import replace

    from shared.auth import AccessWatch, RemoteAuthorizer, ServiceTokenSource
    from shared.clients import Clients
    from shared.context import Principal, PrincipalKind, principal_var
    from shared.loops import cancel_and_wait

    project = replace(settings, service="project")  # type: ignore[type-var]
    source = ServiceTokenSource(project)
    clients = Clients(project.addresses, token_provider=source)
    watch = AccessWatch(clients)
    current = RemoteAuthorizer(clients, watch=watch)
    legacy = TtlOnlyAuthorizer(pb.ROLE_OWNER)
    watching = asyncio.create_task(watch.run())
    principal_var.set(Principal(kind=PrincipalKind.USER, subject=user_id))
    calls = 100_000
    try:
        async with asyncio.timeout(30):
            await watch.wait_live()
        figures: dict[str, list[float]] = {"legacy": [], "current": []}
        for _ in range(rounds):
            for name, authorizer in (("legacy", legacy), ("current", current)):
                await asyncio.sleep(0.05)  # let the watch ping and renew its lease
                await authorizer.require(org_id, "projects.get")  # a miss fills the cache
                entries = dict(current._cache)
                require = authorizer.require
                started = time.perf_counter()
                for _ in range(calls):
                    await require(org_id, "projects.get")
                figures[name].append((time.perf_counter() - started) / calls * 1e9)
                assert watch.live(), "the lease ran out during a round: rounds are too long"
                assert current._cache == entries, "a miss was timed"
        return statistics.median(figures["legacy"]), statistics.median(figures["current"])
    finally:
        await cancel_and_wait([watching])
        await clients.close()
        await source.close()


# ------------------------------------------------------------------------------- main


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ready" not in line:
        raise RuntimeError(f"floor server did not start: {line}")


async def bench(args: argparse.Namespace) -> None:
    from shared.auth import generate_signing_key
    from shared.migrate import migrate_async
    from shared.pg import create_database, provision
    from shared.settings import role_name, url_with_credentials
    from tests.support.identity import identity_process_env, identity_settings
    from tests.support.procs import ServiceProcess, free_port

    tmp = Path(tempfile.mkdtemp(prefix="hangar-bench-"))
    pg = provision(tmp / "pgdata", ephemeral=True)
    procs: list[subprocess.Popen[str]] = []
    identity_proc = None
    try:
        url = await create_database(pg.url, f"bench_{secrets.token_hex(4)}")
        passwords = {
            s: secrets.token_urlsafe(12) for s in ("identity", "project", "runtime", "billing")
        }
        await migrate_async(url, passwords)
        address = f"127.0.0.1:{free_port()}"
        settings = identity_settings(
            url, passwords, address=address, signing_keys=(generate_signing_key(),)
        )
        env = identity_process_env(settings)
        env["HANGAR_LOG_LEVEL"] = "WARNING"
        identity_proc = ServiceProcess.start("identity", address, env)

        async with grpc.aio.insecure_channel(address) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            password = "bench password of decent length"
            user = await stub.SignUp(pb.SignUpRequest(email="bench@example.com", password=password))
            org = await stub.CreateOrganization(
                pb.CreateOrganizationRequest(organization=pb.Organization(name="b", slug="bench")),
                metadata=(("authorization", f"Bearer {user.access_token}"),),
            )
            token = (
                await stub.IssueServiceToken(
                    pb.IssueServiceTokenRequest(
                        service="project", secret=settings.service_secrets["project"]
                    )
                )
            ).token
        request = pb.AuthorizeRequest(
            user_id=user.user.id, organization_id=org.id, permission="projects.get"
        )
        # Real callers (shared.auth.RemoteAuthorizer inside a request) always forward the
        # request id and their service token; so does the bench.
        metadata = (("authorization", f"Bearer {token}"), ("x-request-id", "bench"))

        floor_port = free_port()
        floor_dsn = url_with_credentials(url, role_name("identity"), passwords["identity"])
        floor = subprocess.Popen(  # noqa: ASYNC220 - start-up only, not on the measured path
            [sys.executable, __file__, "--floor", str(floor_port), floor_dsn],
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        procs.append(floor)
        wait_ready(floor)

        # Alternate the two, so load from elsewhere on the machine hits both alike.
        floor_runs, auth_runs = [], []
        for _ in range(args.rounds):
            floor_runs.append(
                await drive(f"127.0.0.1:{floor_port}", request, (), args.seconds, args.inflight)
            )
            auth_runs.append(await drive(address, request, metadata, args.seconds, args.inflight))
        floor.terminate()
        floor.wait()
        floor_rps, floor_p50, floor_p99 = median_run(floor_runs)
        auth_rps, auth_p50, auth_p99 = median_run(auth_runs)
        login_rps = await logins(address, "bench@example.com", password, args.seconds, 8)
        legacy_ns, current_ns = await hit_path(settings, user.user.id, org.id, args.hit_rounds)

        print(
            f"{args.inflight} calls in flight, {args.rounds} alternating rounds of"
            f" {args.seconds:.0f}s (median round shown), {os.cpu_count()} CPUs,"
            f" PostgreSQL {pg.kind}; servers are subprocesses, client is this process"
        )
        print(f"{'':<22}{'rps':>10}{'p50 ms':>10}{'p99 ms':>10}")
        print(f"{'floor (asyncpg PK)':<22}{floor_rps:>10.0f}{floor_p50:>10.2f}{floor_p99:>10.2f}")
        print(f"{'identity.Authorize':<22}{auth_rps:>10.0f}{auth_p50:>10.2f}{auth_p99:>10.2f}")
        print(f"Authorize / floor = {auth_rps / floor_rps:.2f}  (aim >= 0.80)")
        print(f"Login (argon2id m=19MiB t=2 p=1, 8 in flight): {login_rps:.1f} per second")
        print(
            f"cached RemoteAuthorizer.require (median of {args.hit_rounds} rounds of 100k):"
            f" TTL-only (pre-#14) {legacy_ns:.0f} ns, under a live AccessWatch"
            f" {current_ns:.0f} ns, ratio {current_ns / legacy_ns:.3f}  (aim <= 1.05)"
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        if identity_proc is not None:
            identity_proc.stop()
        pg.stop()


def median_run(runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return sorted(runs)[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hit-rounds", type=int, default=15)
    parser.add_argument("--floor", nargs=2, metavar=("PORT", "DSN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    if args.floor:
        uvloop.run(serve_floor(int(args.floor[0]), args.floor[1]))
    else:
        uvloop.run(bench(args))


if __name__ == "__main__":
    main()
