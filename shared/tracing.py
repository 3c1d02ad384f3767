"""OpenTelemetry traces of one process: its TracerProvider, the gRPC interceptors that start
a span per call and carry W3C `traceparent` in the metadata, asyncpg queries as child spans,
and the gateway's span per HTTP request.

Off unless OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set: then
no provider is made, no interceptor added and asyncpg is left alone. On, spans go to that
collector by OTLP/gRPC in batches, and the SDK reads the standard variables itself
(OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG, OTEL_EXPORTER_OTLP_HEADERS, ...). Tests turn
it on with a processor of their own (`enable_tracing`).

A trace the sampler dropped costs little: OpenTelemetry's interceptors stand aside for its
calls (`_ServerTracing`, `_ClientTracing`; the gateway calls on channels without them), which
only carry its `traceparent` on, and asyncpg's instrumentation is told to skip its queries
(`enter_call`). Its ids still reach every log line.

OpenTelemetry's provider is one per process, set once: several services run in one test
process share it (and its service.name), and `disable_tracing` only stops adding
interceptors to what starts afterwards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes

from shared.metrics import ROUTE_KEY, UNMATCHED

log = logging.getLogger("hangar.tracing")

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_PROPAGATED = (b"traceparent", b"tracestate")
# OpenTelemetry's own "suppress instrumentation" flag, which every instrumentation checks.
_QUIET = otel_context._SUPPRESS_INSTRUMENTATION_KEY
# traceparent's last field, the flags, without the sampled bit (version 00 defines no other).
_UNSAMPLED_FLAGS = frozenset(f"{flags:02x}" for flags in range(0, 256, 2))
# How asyncpg's Connection.get_reset_query() starts (with or without advisory locks).
_POOL_RESET = ("SELECT pg_advisory_unlock_all();", "CLOSE ALL;")
# The codes that are the server's fault (OpenTelemetry's gRPC conventions): an error span.
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

_provider: TracerProvider | None = None  # the process's, made by the first enable_tracing
_processors: list[SpanProcessor] = []
_enabled = False
_asyncpg: Any = None  # the AsyncPGInstrumentor while tracing is on


def tracing_enabled() -> bool:
    return _enabled


def configure_tracing(process: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Tracing for a process ("identity", "gateway", ...) from the environment: on, with an
    OTLP exporter, only when a collector's endpoint is set. True when it turned on."""
    if not any(environ.get(name) for name in _ENDPOINT_VARIABLES):
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    enable_tracing(process, BatchSpanProcessor(OTLPSpanExporter()))  # reads OTEL_EXPORTER_*
    log.info("tracing on", extra={"sampler": _description()})
    return True


def enable_tracing(
    process: str, processor: SpanProcessor, *, sampler: sampling.Sampler | None = None
) -> TracerProvider:
    """Turns tracing on: spans go to `processor` (and to those given before). The first call
    makes the process's provider, service.name "hangar-<process>", with `sampler` (default:
    the one OTEL_TRACES_SAMPLER names, else parent-based always-on)."""
    global _provider, _enabled, _asyncpg
    if _provider is None:
        chosen = sampler or sampling._get_from_env_or_default()  # the SDK's own reading
        _provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: f"hangar-{process}"}),
            sampler=ChildQueriesOnly(chosen),
        )
        trace.set_tracer_provider(_provider)
    if processor not in _processors:
        _provider.add_span_processor(processor)
        _processors.append(processor)
    if _asyncpg is None:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        _asyncpg = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]  # untyped package
        _asyncpg.instrument(tracer_provider=_provider)
    _enabled = True
    return _provider


def disable_tracing() -> None:
    """Servers, channels and gateways made from now on are not traced (for tests: those
    made before keep their interceptors); asyncpg is no longer instrumented."""
    global _enabled, _asyncpg
    if _provider is not None:
        _provider.force_flush()
    if _asyncpg is not None:
        _asyncpg.uninstrument()
        _asyncpg = None
    _enabled = False


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """A span per RPC served, a child of the caller's (`traceparent` in the metadata)."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    traced = aio_server_interceptor(tracer_provider=_provider)  # type: ignore[no-untyped-call]
    return [_ServerTracing(traced)]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """A span per call made, its context sent on as `traceparent`."""
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    traced = aio_client_interceptors(tracer_provider=_provider)  # type: ignore[no-untyped-call]
    kinds = (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)
    return [kind(interceptor) for kind, interceptor in zip(kinds, traced, strict=True)]


def enter_call(metadata: Mapping[str, Any]) -> None:
    """At the start of a call served (shared.interceptors): a trace the caller did not
    sample (OpenTelemetry's interceptor stood aside) is continued all the same, for the logs
    and the calls made; and in such a trace asyncpg's instrumentation skips its work for the
    rest of the call (spans nobody would keep)."""
    if not _enabled:
        return
    if "traceparent" in metadata and not trace.get_current_span().get_span_context().is_valid:
        otel_context.attach(propagate.extract(metadata))  # the call's own context
    if not trace.get_current_span().is_recording():
        otel_context.attach(otel_context.set_value(_QUIET, True))


def carried_on(name: str, work: Coroutine[Any, Any, None]) -> Coroutine[Any, Any, None]:
    """`work`, to run in a task of its own after the call that asked for it returns (a
    deployment's launch): with tracing on, inside a span `name` under the caller's span, so
    the request's trace goes on to what the work does (its calls to an agent). Only the
    trace is carried: the task still starts from a fresh context (no caller, no token)."""
    if not _enabled:
        return work
    parent = trace.get_current_span().get_span_context()
    if not parent.is_valid:
        return work

    async def traced() -> None:
        caller = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        with trace.get_tracer("hangar").start_as_current_span(
            name, context=caller, kind=SpanKind.INTERNAL
        ):
            if not parent.trace_flags.sampled:  # as enter_call: no spans nobody keeps
                token = otel_context.attach(otel_context.set_value(_QUIET, True))
                try:
                    await work
                finally:
                    otel_context.detach(token)
                return
            await work

    return traced()


def record_status(code: grpc.StatusCode, message: str) -> None:
    """The status the call being served ends with, on its span: the instrumentation sees
    `context.abort` but not `abort_with_status`, which shared.interceptors uses."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))


class ChildQueriesOnly(sampling.Sampler):
    """`sampler`, except for two kinds of database query that would only be noise: one
    outside any span (the outbox watchers poll every 0.5 s: each a trace of one span), and
    the reset asyncpg's pool runs on each connection it takes back."""

    def __init__(self, sampler: sampling.Sampler) -> None:
        self.sampler = sampler

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> sampling.SamplingResult:
        if attributes and ("db.system" in attributes or "db.system.name" in attributes):
            statement = attributes.get("db.statement") or attributes.get("db.query.text")
            if isinstance(statement, str) and statement.startswith(_POOL_RESET):
                return sampling.SamplingResult(sampling.Decision.DROP)
            parent = trace.get_current_span(parent_context).get_span_context()
            if not parent.is_valid:
                return sampling.SamplingResult(sampling.Decision.DROP)
        return self.sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"ChildQueriesOnly{{{self.sampler.get_description()}}}"


def _description() -> str:
    return _provider.sampler.get_description() if _provider is not None else "off"


def _unsampled() -> bool:
    """Inside a trace that is not sampled: no span made under it would be (every standard
    sampler decides the same for one trace id, or follows the parent)."""
    span_context = trace.get_current_span().get_span_context()
    return span_context.is_valid and not span_context.trace_flags.sampled


def _carrying(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    propagate.inject(metadata)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _ServerTracing(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """OpenTelemetry's server interceptor, skipped for a call whose `traceparent` says its
    trace is not sampled (its span would not be): `enter_call` continues that trace."""

    def __init__(self, traced: Any) -> None:
        self.traced = traced

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "traceparent":
                if isinstance(value, str) and value[-2:] in _UNSAMPLED_FLAGS:
                    return await continuation(handler_call_details)
                break
        handler: grpc.RpcMethodHandler = await self.traced.intercept_service(
            continuation, handler_call_details
        )
        return handler


class _ClientTracing:
    """OpenTelemetry's client interceptor, skipped inside an unsampled trace: the call then
    only carries the trace's (unsampled) `traceparent`, so the next service does not start
    a sampled trace of its own. The instrumentation's own path costs several times more."""

    def __init__(self, traced: Any) -> None:
        self.traced = traced


class _UnaryUnary(_ClientTracing, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        if _unsampled():
            return await continuation(_carrying(client_call_details), request)
        return await self.traced.intercept_unary_unary(continuation, client_call_details, request)


class _UnaryStream(_ClientTracing, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        if _unsampled():
            return await continuation(_carrying(client_call_details), request)
        return await self.traced.intercept_unary_stream(continuation, client_call_details, request)


class _StreamUnary(_ClientTracing, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        if _unsampled():
            return await continuation(_carrying(client_call_details), request_iterator)
        return await self.traced.intercept_stream_unary(
            continuation, client_call_details, request_iterator
        )


class _StreamStream(_ClientTracing, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        if _unsampled():
            return await continuation(_carrying(client_call_details), request_iterator)
        return await self.traced.intercept_stream_stream(
            continuation, client_call_details, request_iterator
        )


App = Callable[[dict[str, Any], Any, Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


class HttpTracing:
    """A server span per HTTP request around an ASGI app, a child of the request's
    `traceparent` when it has one. Named "<METHOD> <route template>" from what the app put
    in `scope[ROUTE_KEY]` once it matched the route (never the raw path)."""

    def __init__(self) -> None:
        self.tracer = trace.get_tracer("hangar.gateway", tracer_provider=_provider)

    @staticmethod
    def sampled_call(metadata: list[tuple[str, str]]) -> bool:
        """For a call the app makes within the request: True inside a sampled trace (the
        call should make its span); else False, the trace's traceparent (if any) added to
        `metadata`, so the services do not sample a trace of their own."""
        if trace.get_current_span().is_recording():
            return True
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        metadata.extend(carrier.items())
        return False

    async def around(
        self,
        app: App,
        scope: dict[str, Any],
        receive: Any,
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _PROPAGATED
        }
        parent = propagate.extract(carrier) if carrier else None
        method = scope["method"] if scope["method"] in _HTTP_METHODS else "_OTHER"
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracer.start_as_current_span(
            method, context=parent, kind=SpanKind.SERVER, attributes={"http.request.method": method}
        ) as span:
            try:
                await app(scope, receive, send_status)
            finally:
                if span.is_recording():
                    route = scope.get(ROUTE_KEY, UNMATCHED)
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
