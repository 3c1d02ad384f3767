"""OpenTelemetry traces across real parts: the gateway (uvicorn, in a thread) in front of real
identity, billing and project servers in this process, an agent called by runtime's own agent
client, on PostgreSQL; spans go to an in-memory exporter instead of a collector.

OpenTelemetry has one provider per process: this module turns tracing on for its tests and
off again at its end; each test reads only the spans of its own trace ids.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind

from services.agent.drivers import ProcessDriver
from services.gateway.app import Gateway
from services.runtime.agents import Agents
from shared import tracing
from shared.clients import open_channel
from shared.logging import JsonFormatter
from shared.migrate import migrate
from shared.settings import SERVICES, Settings
from tests.integration.test_gateway_transcoding import serving
from tests.support.agent import running_agent
from tests.support.procs import free_port
from tests.support.project import Stack, running_stack

CREATE_PROJECT = "/hangar.project.v1.ProjectService/CreateProject"
GET_PROJECT = "/hangar.project.v1.ProjectService/GetProject"
AUTHORIZE = "/hangar.identity.v1.IdentityService/Authorize"
RESERVE = "/hangar.billing.v1.BillingService/ReserveAllocation"
LIST_CONTAINERS = "/hangar.agent.v1.AgentService/ListContainers"
WAIT_SECONDS = 30.0  # generous: a loaded 2-core machine; never a measured time


@pytest.fixture(scope="module")
def processor() -> Iterator[SimpleSpanProcessor]:
    # Exports each span as it ends: nothing to flush, nothing to wait for but the span.
    spans = SimpleSpanProcessor(InMemorySpanExporter())
    # Every trace that starts here is sampled; one a caller did not sample is not.
    tracing.enable_tracing("tests", spans, sampler=ParentBased(ALWAYS_ON))
    try:
        yield spans
    finally:
        tracing.disable_tracing()


@pytest.fixture(scope="module")
def exporter(processor: SimpleSpanProcessor) -> InMemorySpanExporter:
    spans: InMemorySpanExporter = processor.span_exporter  # type: ignore[assignment]
    return spans


@pytest.fixture(scope="module")
def tracing_db(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    url = create_database("hangar_tracing")
    migrate(url, db_passwords)
    return url


@pytest.fixture(scope="module")
async def stack(
    exporter: InMemorySpanExporter, tracing_db: str, db_passwords: dict[str, str]
) -> AsyncIterator[Stack]:
    async with running_stack(tracing_db, db_passwords) as running:
        yield running


@pytest.fixture(scope="module")
def gateway_url(stack: Stack) -> Iterator[str]:
    addresses = {
        "identity": stack.identity.address,
        "project": stack.project_address,
        "billing": stack.billing_address,
        "runtime": f"127.0.0.1:{free_port()}",  # not called here
    }
    gateway = Gateway(Settings(service="gateway", addresses=addresses, call_timeout_seconds=10))
    assert gateway.http_tracing is not None
    with serving(gateway) as url:
        yield url


class _JsonLines(logging.Handler):
    """Formats each record as the processes do, when (and where) it is logged."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter("tests"))
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


def _traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-{'01' if sampled else '00'}", trace_id, parent_id


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


async def _trace(
    exporter: InMemorySpanExporter, trace_id: str, done: Callable[[list[ReadableSpan]], bool]
) -> list[ReadableSpan]:
    """The finished spans of one trace, once `done` holds for them (bounded wait)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        spans = [
            s
            for s in exporter.get_finished_spans()
            if s.context is not None and _hex(s.context.trace_id, 32) == trace_id
        ]
        if done(spans):
            return spans
        assert time.monotonic() < deadline, [(s.name, s.kind) for s in spans]
        await asyncio.sleep(0.05)


def _one(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind == kind]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def _parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def _descends(span: ReadableSpan, ancestor: ReadableSpan, spans: list[ReadableSpan]) -> bool:
    by_id = {_id(s): s for s in spans}
    parent = _parent_of(span)
    while parent is not None:
        if parent == _id(ancestor):
            return True
        above = by_id.get(parent)
        parent = _parent_of(above) if above is not None else None
    return False


async def test_one_http_request_is_one_trace_across_gateway_project_and_billing(
    exporter: InMemorySpanExporter, stack: Stack, gateway_url: str
) -> None:
    tenant = await stack.tenant()
    traceparent, trace_id, caller_span = _traceparent()
    slug = f"traced-{secrets.token_hex(3)}"
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30, trust_env=False) as http:
        created = await http.post(
            f"/v1/organizations/{tenant.org_id}/projects",
            headers={"Authorization": f"Bearer {tenant.owner.token}", "traceparent": traceparent},
            json={"name": slug, "slug": slug, "region": "local"},  # default resources
        )
    assert created.status_code == 200, created.text

    route = "POST /v1/organizations/{organization_id}/projects"
    spans = await _trace(
        exporter,
        trace_id,
        lambda got: (
            any(s.name == route for s in got)
            and any(s.name == RESERVE and s.kind == SpanKind.SERVER for s in got)
        ),
    )
    http_span = _one(spans, route, SpanKind.SERVER)
    assert _parent_of(http_span) == int(caller_span, 16)  # the incoming traceparent's span
    assert http_span.attributes is not None
    assert http_span.attributes["http.route"] == "/v1/organizations/{organization_id}/projects"
    assert http_span.attributes["http.response.status_code"] == 200
    assert all(tenant.org_id not in s.name for s in spans)  # no ids in span names

    gateway_call = _one(spans, CREATE_PROJECT, SpanKind.CLIENT)
    assert _parent_of(gateway_call) == _id(http_span)
    served = _one(spans, CREATE_PROJECT, SpanKind.SERVER)
    assert _parent_of(served) == _id(gateway_call)

    authorized = _one(spans, AUTHORIZE, SpanKind.SERVER)  # identity, called by project
    assert _descends(authorized, served, spans)
    project_call = _one(spans, RESERVE, SpanKind.CLIENT)
    assert _descends(project_call, served, spans)
    billing_served = _one(spans, RESERVE, SpanKind.SERVER)
    assert _parent_of(billing_served) == _id(project_call)

    queries = [s for s in spans if s.attributes and s.attributes.get("db.system") == "postgresql"]
    assert any(_descends(q, served, spans) for q in queries), [s.name for s in spans]
    assert any(_descends(q, billing_served, spans) for q in queries)
    assert all(q.kind == SpanKind.CLIENT for q in queries)
    statements = [str((q.attributes or {}).get("db.statement", "")) for q in queries]
    assert not [s for s in statements if "pg_advisory_unlock_all" in s]  # the pool's reset


async def test_a_log_line_inside_a_call_carries_its_trace_and_span(
    exporter: InMemorySpanExporter, stack: Stack, gateway_url: str
) -> None:
    tenant = await stack.tenant()
    traceparent, trace_id, _ = _traceparent()
    lines = _JsonLines()
    rpc_log = logging.getLogger("hangar.rpc")
    level = rpc_log.level
    rpc_log.addHandler(lines)
    rpc_log.setLevel(logging.INFO)
    try:
        async with httpx.AsyncClient(base_url=gateway_url, timeout=30, trust_env=False) as http:
            missing = await http.get(
                f"/v1/projects/{secrets.token_hex(8)}",
                headers={
                    "Authorization": f"Bearer {tenant.owner.token}",
                    "traceparent": traceparent,
                },
            )
    finally:
        rpc_log.removeHandler(lines)
        rpc_log.setLevel(level)
    assert 400 <= missing.status_code < 500, missing.text

    spans = await _trace(
        exporter, trace_id, lambda got: any(s.name == "GET /v1/projects/{id}" for s in got)
    )
    served = _one(spans, GET_PROJECT, SpanKind.SERVER)
    assert served.attributes is not None
    assert served.attributes["rpc.grpc.status_code"] == missing.json()["code"]
    http_span = _one(spans, "GET /v1/projects/{id}", SpanKind.SERVER)
    assert http_span.attributes is not None
    assert http_span.attributes["http.response.status_code"] == missing.status_code

    failed = [line for line in lines.lines if line.get("method") == GET_PROJECT]
    assert failed, lines.lines
    assert failed[0]["msg"] == "rpc failed"
    assert failed[0]["trace_id"] == trace_id
    assert failed[0]["span_id"] == _hex(_id(served), 16)


async def test_a_trace_the_caller_did_not_sample_is_passed_on_and_not_recorded(
    exporter: InMemorySpanExporter, stack: Stack, gateway_url: str
) -> None:
    tenant = await stack.tenant()  # a new organization: project asks identity (no cache)
    quiet, quiet_id, _ = _traceparent(sampled=False)
    sampled, sampled_id, _ = _traceparent()
    authorized = len(_served(exporter, AUTHORIZE))
    lines = _JsonLines()
    rpc_log = logging.getLogger("hangar.rpc")
    level = rpc_log.level
    rpc_log.addHandler(lines)
    rpc_log.setLevel(logging.INFO)
    try:
        async with httpx.AsyncClient(base_url=gateway_url, timeout=30, trust_env=False) as http:
            auth = {"Authorization": f"Bearer {tenant.owner.token}"}
            path = f"/v1/organizations/{tenant.org_id}/projects"
            body = {"name": "quiet", "slug": f"quiet-{secrets.token_hex(3)}", "region": "local"}
            created = await http.post(path, headers={**auth, "traceparent": quiet}, json=body)
            assert created.status_code == 200, created.text
            missing = await http.get(
                f"/v1/projects/{secrets.token_hex(8)}", headers={**auth, "traceparent": quiet}
            )
            assert 400 <= missing.status_code < 500
            # A sampled request after them: once its trace is in, theirs would be too.
            listed = await http.get(path, headers={**auth, "traceparent": sampled})
            assert listed.status_code == 200, listed.text
    finally:
        rpc_log.removeHandler(lines)
        rpc_log.setLevel(level)
    await _trace(exporter, sampled_id, lambda got: any(s.name.startswith("GET ") for s in got))

    assert await _trace(exporter, quiet_id, lambda got: True) == []
    # Identity was asked (project, then billing, authorize a new organization) within the
    # quiet trace: had the trace not reached it, it would have sampled a trace of its own.
    others = [s for s in _served(exporter, AUTHORIZE) if _hex(_trace_id(s), 32) != sampled_id]
    assert len(others) == authorized
    failed = [line for line in lines.lines if line.get("method") == GET_PROJECT]
    assert failed and failed[0]["trace_id"] == quiet_id  # logs still join up


def _served(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [
        s for s in exporter.get_finished_spans() if s.name == name and s.kind == SpanKind.SERVER
    ]


async def test_runtime_calls_to_an_agent_continue_the_callers_trace(
    exporter: InMemorySpanExporter, stack: Stack
) -> None:
    driver = ProcessDriver(start_timeout=10, stop_grace=2, probe_interval=0.05)
    async with running_agent(stack.identity.address, driver=driver) as agent:
        agents = Agents(_token(await stack.identity.service_token("runtime")), timeout=10)
        tracer = trace.get_tracer("tests")
        try:
            with tracer.start_as_current_span("deploy sweep") as sweep:
                assert await agents.list(agent.address) == []
        finally:
            await agents.close()
    trace_id = _hex(sweep.get_span_context().trace_id, 32)
    spans = await _trace(
        exporter,
        trace_id,
        lambda got: any(s.name == LIST_CONTAINERS and s.kind == SpanKind.SERVER for s in got),
    )
    call = _one(spans, LIST_CONTAINERS, SpanKind.CLIENT)
    assert _parent_of(call) == sweep.get_span_context().span_id
    assert _parent_of(_one(spans, LIST_CONTAINERS, SpanKind.SERVER)) == _id(call)


async def test_work_a_call_kicks_off_goes_on_in_its_trace_from_a_fresh_context(
    exporter: InMemorySpanExporter, stack: Stack
) -> None:
    """What runtime's Deployer does after CreateDeployment returns (its launch, in a task of
    its own): the request's trace goes on to the agent, and nothing else of the caller's
    context does."""
    caller = contextvars.ContextVar("caller", default="")
    seen: list[str] = []
    driver = ProcessDriver(start_timeout=10, stop_grace=2, probe_interval=0.05)
    async with running_agent(stack.identity.address, driver=driver) as agent:
        agents = Agents(_token(await stack.identity.service_token("runtime")), timeout=10)

        async def launch() -> None:
            seen.append(caller.get())
            assert await agents.list(agent.address) == []

        try:
            with trace.get_tracer("tests").start_as_current_span("CreateDeployment") as request:
                caller.set("the request's")
                work = tracing.carried_on("runtime.deployer.launch", launch())
                task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
            await task
        finally:
            await agents.close()
    assert seen == [""]  # a fresh context: not the caller's
    trace_id = _hex(request.get_span_context().trace_id, 32)
    spans = await _trace(
        exporter,
        trace_id,
        lambda got: any(s.name == LIST_CONTAINERS and s.kind == SpanKind.SERVER for s in got),
    )
    kicked = _one(spans, "runtime.deployer.launch", SpanKind.INTERNAL)
    assert _parent_of(kicked) == request.get_span_context().span_id
    call = _one(spans, LIST_CONTAINERS, SpanKind.CLIENT)
    assert _parent_of(call) == _id(kicked)
    assert _parent_of(_one(spans, LIST_CONTAINERS, SpanKind.SERVER)) == _id(call)


async def test_without_tracing_nothing_is_installed(
    processor: SimpleSpanProcessor, exporter: InMemorySpanExporter, stack: Stack
) -> None:
    tracing.disable_tracing()
    try:
        assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
        upstreams = dict.fromkeys(SERVICES, stack.identity.address)
        gateway = Gateway(Settings(service="gateway", addresses=upstreams))
        assert gateway.http_tracing is None
        await gateway.startup()
        try:
            assert all(not _interceptors(c) for c in gateway.channels.values())
        finally:
            await gateway.shutdown()
        channel = open_channel(stack.identity.address)
        assert not [i for i in _interceptors(channel) if type(i).__module__.startswith("opentel")]
        await channel.close()

        # A server and a channel made now: a call inside a span of this test makes no other.
        driver = ProcessDriver(start_timeout=10, stop_grace=2, probe_interval=0.05)
        async with running_agent(stack.identity.address, driver=driver) as agent:
            agents = Agents(_token(await stack.identity.service_token("runtime")), timeout=10)
            try:
                with trace.get_tracer("tests").start_as_current_span("untraced") as outer:
                    assert await agents.list(agent.address) == []
            finally:
                await agents.close()
        trace_id = _hex(outer.get_span_context().trace_id, 32)
        spans = await _trace(exporter, trace_id, bool)
        assert [s.name for s in spans] == ["untraced"]
    finally:
        tracing.enable_tracing("tests", processor)


def _token(token: str) -> Callable[[], Awaitable[str]]:
    async def provide() -> str:
        return token

    return provide


def _interceptors(channel: object) -> list[object]:
    kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
    return [i for kind in kinds for i in getattr(channel, f"_{kind}_interceptors") or ()]
