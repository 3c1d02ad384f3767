"""What Prometheus metrics cost: project's GetProject (with its Authorize) served by two
project processes side by side, one with metrics off and one with HANGAR_PROJECT_METRICS_ADDR
set, against the same identity, billing and PostgreSQL. Rounds alternate between the two;
the median round of each is shown, and the throughput ratio (issue 21's aim: metrics cost at
most 5% of throughput). The order of the two alternates from round to round. A scrape of
the metrics process follows, and the server interceptor's own cost per call, measured in this
process without a network (what the end-to-end figure holds, free of its noise).

Run: .venv/bin/python bench/bench_metrics.py [--seconds 5] [--inflight 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import httpx

from bench.bench_authorize import median_run
from bench.bench_get_project import drive_get
from hangar.identity.v1 import identity_pb2 as ipb
from hangar.identity.v1 import identity_pb2_grpc
from hangar.project.v1 import project_pb2 as pb
from hangar.project.v1 import project_pb2_grpc
from hangar.type.v1 import resources_pb2


async def create_project(
    project: project_pb2_grpc.ProjectServiceStub, org_id: str, md: tuple
) -> str:  # type: ignore[type-arg]
    for _ in range(100):  # billing subscribes the org from identity's event
        try:
            created = await project.CreateProject(
                pb.CreateProjectRequest(
                    organization_id=org_id,
                    project=pb.Project(
                        name="bench",
                        slug="bench-get",
                        resources=resources_pb2.Resources(ram_mb=128, cpu_millis=100),
                        region="local",
                    ),
                ),
                metadata=md,
            )
            return str(created.id)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            await asyncio.sleep(0.1)
    raise RuntimeError("billing never subscribed the organization")


async def interceptor_cost_us(calls: int = 200_000) -> float:
    """Microseconds the metrics server interceptor adds to one unary call (its
    intercept_service per call, the wrapper, the counter and the histogram)."""
    from shared.metrics import Metrics

    interceptor = Metrics().server_interceptor()

    class Details:
        method = "/hangar.project.v1.ProjectService/GetProject"
        invocation_metadata = ()

    class Context:
        def code(self) -> None:
            return None

    async def get(request: object, context: object) -> object:
        return request

    handler = grpc.unary_unary_rpc_method_handler(get)

    async def continuation(_: object) -> grpc.RpcMethodHandler:
        return handler

    details, context = Details(), Context()

    async def bare() -> None:
        await (await continuation(details)).unary_unary(1, context)

    async def metered() -> None:
        await (await interceptor.intercept_service(continuation, details)).unary_unary(1, context)

    timings = {}
    for name, call in (("bare", bare), ("metered", metered), ("bare", bare), ("metered", metered)):
        started = time.perf_counter()
        for _ in range(calls):
            await call()
        timings[name] = min(timings.get(name, 1e9), time.perf_counter() - started)
    return (timings["metered"] - timings["bare"]) / calls * 1e6


async def bench(args: argparse.Namespace) -> None:
    from shared.auth import generate_signing_key
    from shared.migrate import migrate_async
    from shared.pg import create_database, provision
    from tests.support.identity import identity_process_env, identity_settings
    from tests.support.procs import ServiceProcess, free_port

    tmp = Path(tempfile.mkdtemp(prefix="hangar-bench-"))
    pg = provision(tmp / "pgdata", ephemeral=True)
    services: list[ServiceProcess] = []
    try:
        url = await create_database(pg.url, f"bench_{secrets.token_hex(4)}")
        passwords = {
            s: secrets.token_urlsafe(12) for s in ("identity", "project", "runtime", "billing")
        }
        await migrate_async(url, passwords)
        addresses = {
            name: f"127.0.0.1:{free_port()}" for name in ("identity", "billing", "project")
        }
        settings = identity_settings(
            url, passwords, address=addresses["identity"], signing_keys=(generate_signing_key(),)
        )
        env = identity_process_env(settings)
        for name, address in addresses.items():
            env[f"HANGAR_{name.upper()}_ADDR"] = address
        env["HANGAR_LOG_LEVEL"] = "WARNING"
        env["HANGAR_PROJECT_MASTER_KEYS"] = json.dumps(
            {"mk-bench": base64.b64encode(os.urandom(32)).decode()}
        )
        for name in ("identity", "billing", "project"):
            services.append(ServiceProcess.start(name, addresses[name], env))
        # The same service again, with metrics on.
        metered = f"127.0.0.1:{free_port()}"
        metrics_port = free_port()
        metered_env = {
            **env,
            "HANGAR_PROJECT_ADDR": metered,
            "HANGAR_PROJECT_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
        }
        services.append(ServiceProcess.start("project", metered, metered_env))

        async with (
            grpc.aio.insecure_channel(addresses["identity"]) as ichannel,
            grpc.aio.insecure_channel(addresses["project"]) as pchannel,
        ):
            identity = identity_pb2_grpc.IdentityServiceStub(ichannel)
            user = await identity.SignUp(
                ipb.SignUpRequest(email="bench@example.com", password="bench password of length")
            )
            md = (("authorization", f"Bearer {user.access_token}"),)
            org = await identity.CreateOrganization(
                ipb.CreateOrganizationRequest(
                    organization=ipb.Organization(name="b", slug="bench")
                ),
                metadata=md,
            )
            target = await create_project(project_pb2_grpc.ProjectServiceStub(pchannel), org.id, md)

        off_runs, on_runs = [], []
        get_md = (*md, ("x-request-id", "bench"))
        for i in range(args.rounds):
            order = [(addresses["project"], off_runs), (metered, on_runs)]
            for address, runs in order if i % 2 == 0 else reversed(order):
                runs.append(await drive_get(address, target, get_md, args.seconds, args.inflight))
        off_rps, off_p50, off_p99 = median_run(off_runs)
        on_rps, on_p50, on_p99 = median_run(on_runs)

        async with httpx.AsyncClient() as http:
            started = time.perf_counter()
            scrape = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
            scrape_ms = (time.perf_counter() - started) * 1000
        counted = next(
            line
            for line in scrape.text.splitlines()
            if line.startswith("grpc_server_handled_total") and 'grpc_method="GetProject"' in line
        )

        print(
            f"{args.inflight} calls in flight, {args.rounds} alternating rounds of"
            f" {args.seconds:.0f}s (median round shown), {os.cpu_count()} CPUs,"
            f" PostgreSQL {pg.kind}; identity, billing, 2 x project are subprocesses"
        )
        print(f"{'':<30}{'rps':>10}{'p50 ms':>10}{'p99 ms':>10}")
        print(f"{'GetProject, metrics off':<30}{off_rps:>10.0f}{off_p50:>10.2f}{off_p99:>10.2f}")
        print(f"{'GetProject, metrics on':<30}{on_rps:>10.0f}{on_p50:>10.2f}{on_p99:>10.2f}")
        print(
            f"metrics on / off = {on_rps / off_rps:.3f}"
            f" (cost {100 * (1 - on_rps / off_rps):+.1f}% of throughput; aim <= 5%)"
        )
        print(f"scrape: {len(scrape.content)} bytes in {scrape_ms:.1f} ms; {counted}")
        cost = await interceptor_cost_us()
        print(
            f"server interceptor: {cost:.2f} us per call = {100 * cost * off_rps / 1e6:.2f}% of"
            f" one CPU at the metrics-off rate ({off_rps:.0f} calls/s)"
        )
    finally:
        for proc in reversed(services):
            proc.stop()
        pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import uvloop

    uvloop.run(bench(args))


if __name__ == "__main__":
    main()
