"""Prometheus metrics of one process: its registry, the gRPC server and client interceptors
that count calls, and `GET /metrics` on a port of its own (`HANGAR_<PROCESS>_METRICS_ADDR`).

Off unless that address is set: a process without it builds no `Metrics`, adds no
interceptor and opens no port. Each process (each app, in tests that run several in one
process) has its own `CollectorRegistry`, never prometheus_client's global one.

No label carries an unbounded value: gRPC service and method names, status codes, loop
names, route templates and container states are bounded sets.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger("hangar.metrics")

# The Metrics of the process whose background task is running (set when its loops start;
# tasks copy it), for shared.loops.run_every.
current_metrics: contextvars.ContextVar[Metrics | None] = contextvars.ContextVar(
    "current_metrics", default=None
)

_CODES = {code.value[0]: code for code in grpc.StatusCode}
# A scrape waits this long for values read from the database, then serves the last ones.
REFRESH_TIMEOUT_SECONDS = 2.0


def split_method(full: str | bytes) -> tuple[str, str]:
    """ "/hangar.project.v1.ProjectService/GetProject" -> (service, method)."""
    text = full.decode() if isinstance(full, bytes) else full
    service, _, method = text.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return str(_CODES.get(code, grpc.StatusCode.UNKNOWN).name)
    return "OK" if code is None else str(code)


class _CallStats:
    """The children of one (handled, handling) pair for one RPC method, resolved once."""

    def __init__(self, handled: Counter, handling: Histogram, service: str, method: str) -> None:
        self._handled = handled
        self._labels = (service, method)
        self._by_code: dict[str, Any] = {}
        self.latency = handling.labels(service, method)

    def done(self, code: str, seconds: float) -> None:
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._handled.labels(*self._labels, code)
        counter.inc()
        self.latency.observe(seconds)


class _Gauges(Collector):
    """Gauges read at scrape time from callables (pool sizes, cached query results)."""

    def __init__(self) -> None:
        self._sources: list[Callable[[], Iterable[Metric]]] = []

    def add(self, source: Callable[[], Iterable[Metric]]) -> None:
        self._sources.append(source)

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            try:
                yield from source()
            except Exception:  # a broken source must not take the whole scrape down
                log.exception("metrics source failed")


class Metrics:
    """One process's registry and the metrics every process has."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.server_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=r,
        )
        self.server_handling = Histogram(
            "grpc_server_handling_seconds",
            "Time the server took to handle an RPC (a stream: until it ended).",
            ["grpc_service", "grpc_method"],
            registry=r,
        )
        self.client_handled = Counter(
            "grpc_client_handled_total",
            "RPCs this process made that completed, by status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=r,
        )
        self.client_handling = Histogram(
            "grpc_client_handling_seconds",
            "Time from starting an RPC to its status (a stream: until it ended).",
            ["grpc_service", "grpc_method"],
            registry=r,
        )
        self.loop_runs = Counter("loop_runs", "Passes of a background loop.", ["loop"], registry=r)
        self.loop_failures = Counter(
            "loop_failures", "Passes of a background loop that raised.", ["loop"], registry=r
        )
        self.gauges = _Gauges()
        r.register(self.gauges)
        self._server_calls: dict[str, _CallStats] = {}
        self._client_calls: dict[str, _CallStats] = {}
        self._refreshers: list[Callable[[], Awaitable[None]]] = []

    # --- per call -------------------------------------------------------------------

    def server_call(self, full_method: str) -> _CallStats:
        stats = self._server_calls.get(full_method)
        if stats is None:
            stats = self._server_calls[full_method] = _CallStats(
                self.server_handled, self.server_handling, *split_method(full_method)
            )
        return stats

    def client_call(self, full_method: str | bytes) -> _CallStats:
        key = full_method.decode() if isinstance(full_method, bytes) else full_method
        stats = self._client_calls.get(key)
        if stats is None:
            stats = self._client_calls[key] = _CallStats(
                self.client_handled, self.client_handling, *split_method(key)
            )
        return stats

    # --- read at scrape time ----------------------------------------------------------

    def add_gauges(self, source: Callable[[], Iterable[Metric]]) -> None:
        """`source` yields metric families each scrape (cheap, synchronous)."""
        self.gauges.add(source)

    def add_refresher(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """Awaited before each scrape (bounded by REFRESH_TIMEOUT_SECONDS): reads what a
        gauge source then serves, e.g. a query result it caches."""
        self._refreshers.append(refresh)

    def watch_pool(self, pool: Any) -> None:
        """`db_pool_size` / `db_pool_idle` of an asyncpg pool."""

        def read() -> Iterator[Metric]:
            yield GaugeMetricFamily(
                "db_pool_size", "Connections the pool holds.", value=pool.get_size()
            )
            yield GaugeMetricFamily(
                "db_pool_idle", "Connections of the pool not in use.", value=pool.get_idle_size()
            )

        self.add_gauges(read)

    async def exposition(self) -> bytes:
        if self._refreshers:
            results = await asyncio.gather(
                *(
                    asyncio.wait_for(refresh(), REFRESH_TIMEOUT_SECONDS)
                    for refresh in self._refreshers
                ),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    log.warning("metrics refresh failed: %r", result)
        return generate_latest(self.registry)

    # --- gRPC -----------------------------------------------------------------------

    def server_interceptor(self) -> grpc.aio.ServerInterceptor:
        return _ServerMetrics(self)

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [
            _ClientUnaryUnary(self),
            _ClientUnaryStream(self),
            _ClientStreamUnary(self),
            _ClientStreamStream(self),
        ]


def _status_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    code = context.code()
    if code is None or (code == grpc.StatusCode.OK and exc is not None):
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):  # the caller went away
            return "CANCELLED"
        return "OK" if exc is None else "UNKNOWN"
    return _code_name(code)


class _ServerMetrics(grpc.aio.ServerInterceptor):
    """Outermost server interceptor: counts every call when it ends, with its status code
    (set by shared.interceptors' abort_with_status, or OK)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        stats = self.metrics.server_call(handler_call_details.method)
        if handler.unary_unary:
            return handler._replace(unary_unary=_count_unary(handler.unary_unary, stats))
        if handler.stream_unary:
            return handler._replace(stream_unary=_count_unary(handler.stream_unary, stats))
        if handler.unary_stream:
            return handler._replace(unary_stream=_count_stream(handler.unary_stream, stats))
        return handler._replace(stream_stream=_count_stream(handler.stream_stream, stats))


def _count_unary(behavior: Callable[..., Any], stats: _CallStats) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            stats.done(_status_of(context, error), time.perf_counter() - started)

    return handle


def _count_stream(behavior: Callable[..., Any], stats: _CallStats) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):
                await result
            else:
                for item in result:
                    yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            stats.done(_status_of(context, error), time.perf_counter() - started)

    return handle


class _ClientMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def watch(self, call: Any, method: str | bytes) -> Any:
        """Counts `call` when it is done, without waiting for it (streams are read by the
        caller through the very call returned)."""
        stats = self.metrics.client_call(method)
        started = time.perf_counter()

        def done(finished: Any) -> None:
            seconds = time.perf_counter() - started
            if finished.cancelled():
                stats.done("CANCELLED", seconds)
                return
            # aio calls give their code through a coroutine; it is settled once done.
            task = asyncio.ensure_future(finished.code())
            task.add_done_callback(
                lambda t: stats.done(
                    "UNKNOWN" if t.cancelled() or t.exception() else _code_name(t.result()),
                    seconds,
                )
            )

        call.add_done_callback(done)
        return call


class _ClientUnaryUnary(_ClientMetrics, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        stats = self.metrics.client_call(client_call_details.method)
        started = time.perf_counter()
        call = await continuation(client_call_details, request)
        # A unary call's caller awaits its end anyway: reading the code here costs no wait.
        try:
            code = await call.code()
        except asyncio.CancelledError:
            stats.done("CANCELLED", time.perf_counter() - started)
            raise
        stats.done(_code_name(code), time.perf_counter() - started)
        return call


class _ClientUnaryStream(_ClientMetrics, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        call = await continuation(client_call_details, request)
        return self.watch(call, client_call_details.method)


class _ClientStreamUnary(_ClientMetrics, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        call = await continuation(client_call_details, request_iterator)
        return self.watch(call, client_call_details.method)


class _ClientStreamStream(_ClientMetrics, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        call = await continuation(client_call_details, request_iterator)
        return self.watch(call, client_call_details.method)


# --- the HTTP endpoint -----------------------------------------------------------------


class MetricsServer:
    """`GET /metrics` on its own port (asyncio, in the process's loop)."""

    def __init__(self, server: asyncio.Server, metrics: Metrics) -> None:
        self.server = server
        self.metrics = metrics
        self.port: int = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


_MAX_REQUEST_BYTES = 16 * 1024
_READ_TIMEOUT_SECONDS = 5.0


async def serve_metrics(metrics: Metrics, address: str) -> MetricsServer:
    """Listen on `address` ("host:port"; port 0 picks a free one)."""
    host, _, port = address.rpartition(":")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_SECONDS)
            method, target, *_ = [*head.split(b"\r\n", 1)[0].split(b" "), b"", b""]
            path = target.split(b"?", 1)[0]
            if path != b"/metrics":
                status, content_type, body = b"404 Not Found", b"text/plain", b"not found\n"
            elif method not in (b"GET", b"HEAD"):
                status, content_type, body = b"405 Method Not Allowed", b"text/plain", b""
            else:
                status, content_type = b"200 OK", CONTENT_TYPE_LATEST.encode()
                body = await metrics.exposition()
            writer.write(
                b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type
                + b"\r\ncontent-length: " + str(len(body)).encode()
                + b"\r\nconnection: close\r\n\r\n"
                + (b"" if method == b"HEAD" else body)
            )  # fmt: skip
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(
        answer, host or "127.0.0.1", int(port), limit=_MAX_REQUEST_BYTES
    )
    return MetricsServer(server, metrics)


# --- the gateway's HTTP requests ---------------------------------------------------------

ROUTE_KEY = "hangar.route"  # the ASGI scope key the gateway sets to the matched template
UNMATCHED = "unmatched"


class HttpMetrics:
    """`http_requests_total` / `http_request_duration_seconds` around an ASGI app; the
    route label is what the app put in `scope[ROUTE_KEY]` (a template), else "unmatched"."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests answered, by route template and status code.",
            ["method", "route", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Time to answer an HTTP request (a stream: until it ended).",
            ["method", "route"],
            registry=r,
        )

    async def around(
        self,
        app: Callable[[dict[str, Any], Any, Any], Awaitable[None]],
        scope: dict[str, Any],
        receive: Any,
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        started = time.perf_counter()
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_status)
        finally:
            route = scope.get(ROUTE_KEY, UNMATCHED)
            method = scope["method"]
            if method not in _HTTP_METHODS:
                method = "other"
            self.requests.labels(method, route, str(status)).inc()
            self.duration.labels(method, route).observe(time.perf_counter() - started)


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# --- the outbox ------------------------------------------------------------------------


def watch_outbox(metrics: Metrics, db: Any, schema: str, *, cache_seconds: float = 5.0) -> None:
    """`outbox_head_position` (the newest event of `schema`'s outbox) and, per row of its
    `event_cursors`, `outbox_consumer_position{consumer,source}`: where this service's
    consumers are in other services' feeds. A service cannot read another's outbox, so a
    consumer's lag in events is the source's head minus that position (in PromQL).

    Read at most every `cache_seconds`, with two bounded queries (the newest row by the
    primary key; event_cursors has one row per consumer and source)."""
    state: dict[str, Any] = {"at": float("-inf"), "head": None, "cursors": []}

    async def refresh() -> None:
        now = time.monotonic()
        if now - state["at"] < cache_seconds:
            return
        async with db.session() as s:
            head = await s.fetchval(
                f"SELECT position FROM {schema}.outbox ORDER BY txid DESC, position DESC LIMIT 1"
            )
            cursors = await s.fetch(
                f"SELECT consumer, source, cursor FROM {schema}.event_cursors"
                " ORDER BY consumer, source LIMIT 100"
            )
        state.update(at=now, head=head, cursors=cursors)

    def read() -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "outbox_head_position",
            "Position of the newest event in this service's outbox (0: none).",
            value=state["head"] or 0,
        )
        positions = GaugeMetricFamily(
            "outbox_consumer_position",
            "Position (in the source's outbox) of the last event a consumer applied.",
            labels=["consumer", "source"],
        )
        for row in state["cursors"]:
            _, _, position = str(row["cursor"]).partition(".")
            positions.add_metric(
                [row["consumer"], row["source"]], int(position) if position.isdigit() else 0
            )
        yield positions

    metrics.add_refresher(refresh)
    metrics.add_gauges(read)
