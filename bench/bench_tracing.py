"""What OpenTelemetry tracing costs: `GET /v1/projects/{id}` through the gateway (gateway ->
project GetProject -> identity Authorize, PostgreSQL queries) on three copies of the platform
side by side, tracing off, on at 10% (parentbased_traceidratio 0.1) and on at 100%
(parentbased_always_on), set as an operator would: OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG.

There is no collector here: the traced platforms export by OTLP/gRPC (BatchSpanProcessor, the
SDK's defaults) to a sink, a small gRPC server in its own process that counts the spans it
receives and drops them. Its CPU is printed apart: a real collector runs elsewhere.

The platform with tracing off is tests/support/stack.py's (identity, billing, project, runtime,
gateway; no agent); each traced configuration adds its own identity, project and gateway
processes, on the same database, billing and runtime. The load generator and the figures are
bench_gateway.py's (raw keep-alive HTTP/1.1 client, CPU per request of each
server process). Rounds rotate the order of the three; the median round of each is shown.

Run: .venv/bin/python bench/bench_tracing.py [--seconds 5] [--inflight 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench.bench_gateway import Run, _median, http_driver, measure

SINK = """
import signal, sys
from concurrent import futures
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc

class Sink(pb_grpc.TraceServiceServicer):
    spans = 0

    def Export(self, request, context):
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                Sink.spans += len(scope.spans)
        return pb.ExportTraceServiceResponse()

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
pb_grpc.add_TraceServiceServicer_to_server(Sink(), server)
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()

def stop(*_):
    server.stop(0)
    print(Sink.spans, flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
server.wait_for_termination()
"""

CONFIGS = {
    "tracing off": {},
    "tracing on, 10% sampled": {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    },
    "tracing on, 100% sampled": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
}
MEASURED = ("gateway", "project", "identity")


@dataclass
class Platform:
    url: str  # its gateway's
    pids: dict[str, int]  # of MEASURED


def set_up(tmp: Path, pg: Any, sink_address: str) -> tuple[Any, list[Any], dict[str, Platform]]:
    """The platform with tracing off, and for each traced configuration its own identity,
    project and gateway processes in front of the same database, billing and runtime."""
    from shared.migrate import migrate
    from shared.pg import create_database
    from tests.support.procs import ServiceProcess, free_port
    from tests.support.stack import start_stack

    url = asyncio.run(create_database(pg.url, f"bench_{secrets.token_hex(4)}"))
    passwords = {
        s: secrets.token_urlsafe(12) for s in ("identity", "project", "runtime", "billing")
    }
    migrate(url, passwords)
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}
    stack = start_stack(url, passwords, tmp / "stack", agent=False, extra_env=off)
    platforms = {
        "tracing off": Platform(stack.url, {n: stack.processes[n].proc.pid for n in MEASURED})
    }
    extra: list[Any] = []
    try:
        for name, sampler in CONFIGS.items():
            if not sampler:
                continue
            addresses = {n: f"127.0.0.1:{free_port()}" for n in MEASURED}
            env = {
                **stack.env,
                **{f"HANGAR_{n.upper()}_ADDR": address for n, address in addresses.items()},
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{sink_address}",
                **sampler,
            }
            started = {n: ServiceProcess.start(n, addresses[n], env) for n in reversed(MEASURED)}
            extra += started.values()
            pids = {n: p.proc.pid for n, p in started.items()}
            platforms[name] = Platform(f"http://{addresses['gateway']}", pids)
    except BaseException:
        for proc in extra:
            proc.stop()
        stack.stop()
        raise
    return stack, extra, platforms


def _owned_project(stack: Any) -> tuple[str, str]:
    """A project (default resources) in a new organization of a new user: (id, token)."""
    from tests.support.stack import sign_up, wait_for

    with stack.client(timeout=10) as http:
        owner = sign_up(http, "bench")
        org = http.post(
            "/v1/organizations", headers=owner.auth, json={"name": "B", "slug": "bench-tr"}
        ).json()
        subscription = f"/v1/organizations/{org['id']}/subscription"
        wait_for(lambda: http.get(subscription, headers=owner.auth).is_success, "a plan")
        created = http.post(
            f"/v1/organizations/{org['id']}/projects",
            headers=owner.auth,
            json={"name": "Bench", "slug": "bench-tr"},
        )
        created.raise_for_status()
        return str(created.json()["id"]), owner.token


async def unsampled_hooks_us(calls: int = 20_000) -> dict[str, float]:
    """Microseconds the tracing hooks add to a request whose trace is not sampled, measured
    in this process without a network (what the end-to-end figures hold, free of their
    noise): the gateway's span and its call's traceparent; a service's server interceptor
    and `enter_call`; a client call's interceptor (GetProject's Authorize is cached: none)."""
    import contextvars

    import grpc
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    from shared import tracing

    spans = SimpleSpanProcessor(InMemorySpanExporter())
    tracing.enable_tracing("bench", spans, sampler=ParentBasedTraceIdRatio(0.0))
    http = tracing.HttpTracing()
    scope = {"type": "http", "method": "GET", "headers": [(b"host", b"gateway")]}
    started = {"type": "http.response.start", "status": 200}

    async def send(message: dict[str, Any]) -> None:
        pass

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(started)

    async def calling_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        http.sampled_call([("x-request-id", "bench")])
        await send(started)

    traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"
    metadata = (("x-request-id", "bench"), ("traceparent", traceparent))

    class Details:
        method = "/hangar.project.v1.ProjectService/GetProject"
        invocation_metadata = metadata

    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)

    async def continuation(_: object) -> grpc.RpcMethodHandler:
        return handler

    server = tracing.server_interceptors()[0]
    client = tracing.client_interceptors()[0]
    details = grpc.aio.ClientCallDetails(Details.method, 5.0, metadata[:1], None, None)

    async def call(details: object, request: object) -> object:
        return request

    async def nothing(_: object) -> None:
        pass

    def enter() -> None:
        tracing.enter_call(dict(metadata))

    async def gateway_bare() -> None:
        await app(scope, None, send)

    async def gateway_traced() -> None:
        await http.around(calling_app, scope, None, send)

    async def service_bare() -> None:
        await continuation(Details)
        contextvars.copy_context().run(dict, metadata)

    async def service_traced() -> None:
        await server.intercept_service(continuation, Details)
        contextvars.copy_context().run(enter)

    async def client_bare() -> None:
        await call(details, 1)

    async def client_traced() -> None:
        await client.intercept_unary_unary(call, details, 1)

    async def best(step: Any, inside_span: bool = False) -> float:
        fastest = 1e9
        for _ in range(3):
            began = time.process_time()
            if inside_span:  # an unsampled trace, as the services' calls are made in
                with trace.get_tracer("bench").start_as_current_span("request"):
                    for _ in range(calls):
                        await step()
            else:
                for _ in range(calls):
                    await step()
            fastest = min(fastest, time.process_time() - began)
        return fastest / calls * 1e6

    try:
        return {
            "gateway: HTTP span + traceparent": await best(gateway_traced)
            - await best(gateway_bare),
            "service: server interceptor + enter_call": await best(service_traced)
            - await best(service_bare),
            "each call made: client interceptor": await best(client_traced, True)
            - await best(client_bare, True),
        }
    finally:
        tracing.disable_tracing()


async def bench(
    args: argparse.Namespace,
    platforms: dict[str, Platform],
    project_id: str,
    token: str,
    sink: subprocess.Popen[bytes],
) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    drivers = {}
    for name, platform in platforms.items():
        procs = {n: psutil.Process(platform.pids[n]) for n in MEASURED}
        procs["sink"] = psutil.Process(sink.pid)
        drivers[name] = (http_driver(platform.url, f"/v1/projects/{project_id}", auth), procs)
    runs: dict[str, list[Run]] = {name: [] for name in drivers}
    names = list(drivers)
    for i in range(args.rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            drive, servers = drivers[name]
            runs[name].append(await measure(drive, servers, args))
    for name, platform in platforms.items():
        dead = [n for n, pid in platform.pids.items() if not psutil.pid_exists(pid)]
        if dead:
            raise RuntimeError(f"{name}: {dead} died")

    print(
        f"{args.inflight} requests in flight, {args.rounds} rotating rounds of"
        f" {args.seconds:.0f}s (median round shown), {os.cpu_count()} CPUs,"
        f" PostgreSQL {args.pg_kind}; GET /v1/projects/{{id}} through the gateway"
    )
    print(
        "spans go by OTLP/gRPC (BatchSpanProcessor) to a sink process that counts and drops"
        " them: no collector, no storage"
    )
    print(f"{'':<28}{'rps':>8}{'p50 ms':>9}{'p99 ms':>9}   CPU us/request")
    medians = {name: _median(r) for name, r in runs.items()}
    for name, run in medians.items():
        cpu = "  ".join(f"{k} {v:.0f}" for k, v in run.server_cpu_us.items())
        print(
            f"{name:<28}{run.rps:>8.0f}{run.p50_ms:>9.2f}{run.p99_ms:>9.2f}"
            f"   client {run.client_cpu_us:.0f}  {cpu}"
        )
    off = medians["tracing off"]
    aims = {"tracing on, 10% sampled": " (aim >= 0.90)", "tracing on, 100% sampled": ""}
    for name, aim in aims.items():
        on = medians[name]
        print(
            f"{name} / off = {on.rps / off.rps:.3f} (cost {100 * (1 - on.rps / off.rps):+.1f}%"
            f" of throughput){aim}"
        )

    def servers_cpu(run: Run) -> float:
        return sum(v for k, v in run.server_cpu_us.items() if k != "sink")

    for name, run in medians.items():
        print(f"CPU per request, gateway + project + identity, {name}: {servers_cpu(run):.0f} us")
    rounds = {n: [round(r.rps) for r in rs] for n, rs in runs.items()}
    print("all rounds (rps):", json.dumps(rounds))

    hooks = await unsampled_hooks_us()
    for name, us in hooks.items():
        print(f"unsampled path, {name}: {us:.1f} us")
    per_request = hooks["gateway: HTTP span + traceparent"]
    per_request += hooks["service: server interceptor + enter_call"]
    sampled = servers_cpu(medians["tracing on, 100% sampled"]) - servers_cpu(off)
    estimate = 0.9 * per_request + 0.1 * sampled
    print(
        f"estimate at 10%: 0.9 x {per_request:.0f} us (unsampled hooks) + 0.1 x {sampled:.0f} us"
        f" (a sampled request's extra CPU, 100% - off) = {estimate:.0f} us per request,"
        f" {100 * estimate / servers_cpu(off):.1f}% of the {servers_cpu(off):.0f} us a request"
        " costs with tracing off"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import uvloop

    from shared.pg import provision
    from tests.support.procs import free_port

    tmp = Path(tempfile.mkdtemp(prefix="hangar-bench-tracing-"))
    sink_address = f"127.0.0.1:{free_port()}"
    (tmp / "sink.py").write_text(SINK)
    sink = subprocess.Popen(
        [sys.executable, str(tmp / "sink.py"), sink_address.rpartition(":")[2]],
        stdout=subprocess.PIPE,
    )
    pg = provision(tmp / "pgdata", ephemeral=True)
    args.pg_kind = pg.kind
    stack, extra = None, []
    try:
        stack, extra, platforms = set_up(tmp, pg, sink_address)
        project_id, token = _owned_project(stack)
        uvloop.run(bench(args, platforms, project_id, token, sink))
    finally:
        for proc in extra:
            proc.stop()  # the traced processes flush their last batches as they exit
        if stack is not None:
            stack.stop()
        sink.send_signal(signal.SIGTERM)
        out, _ = sink.communicate(timeout=30)
        print(f"the sink received {out.decode().strip() or '?'} spans in all")
        pg.stop()


if __name__ == "__main__":
    main()
