"""The gateway's ASGI app: HTTP/JSON in front of the gRPC services.

A raw ASGI callable rather than a Starlette app: every request goes through one matcher built
from the protos' `google.api.http` annotations (routes.py), so a framework router, request
and response objects would only add per-request work. Per route, everything that does not
depend on the request (templates, query-field tables, the gRPC multicallable) is computed at
start-up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message

from hangar.billing.v1 import billing_pb2
from hangar.identity.v1 import identity_pb2
from hangar.project.v1 import project_pb2
from hangar.runtime.v1 import runtime_pb2
from services.gateway.errors import GatewayError
from services.gateway.health import upstream_health
from services.gateway.openapi import build_openapi
from services.gateway.routes import Route, Router, build_routes
from services.gateway.session_cookie import CookieSession, session_for
from services.gateway.transcode import (
    build_request,
    dump,
    prepare,
    render_message,
    render_response,
)
from services.gateway.web import Dashboard
from shared.cache import TtlCache
from shared.clients import channel_options, make_channel
from shared.errors import DomainError, NotFound, ResourceExhausted, Unauthenticated
from shared.metrics import ROUTE_KEY, HttpMetrics, Metrics, MetricsServer, serve_metrics
from shared.settings import SERVICES, Settings
from shared.tls import TlsCredentials
from shared.tracing import HttpTracing, client_interceptors, tracing_enabled

log = logging.getLogger("hangar.gateway")

PUBLIC_SERVICES: tuple[descriptor.ServiceDescriptor, ...] = (
    identity_pb2.DESCRIPTOR.services_by_name["IdentityService"],
    project_pb2.DESCRIPTOR.services_by_name["ProjectService"],
    runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"],
    billing_pb2.DESCRIPTOR.services_by_name["BillingService"],
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_JSON = b"application/json"
# A bearer API token ("hgr_..."), which the gateway exchanges for an access token.
API_TOKEN_BEARER = "Bearer hgr_"
EXCHANGE_PATH = "/hangar.identity.v1.IdentityService/ExchangeApiToken"
EXCHANGE_MARGIN_SECONDS = 30.0
UPLOAD_CHUNK_BYTES = 1 << 20
_NDJSON = b"application/x-ndjson"


@dataclass(frozen=True)
class GatewayOptions:
    """The gateway's own knobs (HANGAR_GATEWAY_*), on top of the shared Settings."""

    max_body_bytes: int = 1 << 20
    # Per header line (name + value), as common proxies allow; larger answers 431.
    max_header_bytes: int = 8192
    # Authorization travels on as gRPC metadata, whose whole block the services cap at 8 KiB
    # (grpc's default): a larger token must be a 431 here, not a RESOURCE_EXHAUSTED there.
    max_authorization_bytes: int = 4096
    # Server-streaming calls (TailLogs) outlive call_timeout_seconds but still get a deadline.
    stream_timeout_seconds: float = 3600.0
    # Uploads (a streamed request body: source archives) up to this size; larger is a 413.
    # The same variable sets runtime's own limit.
    max_upload_bytes: int = 200 * 1024 * 1024

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> GatewayOptions:
        return cls(
            max_body_bytes=int(environ.get("HANGAR_GATEWAY_MAX_BODY_BYTES", 1 << 20)),
            max_header_bytes=int(environ.get("HANGAR_GATEWAY_MAX_HEADER_BYTES", 8192)),
            max_authorization_bytes=int(
                environ.get("HANGAR_GATEWAY_MAX_AUTHORIZATION_BYTES", 4096)
            ),
            stream_timeout_seconds=float(
                environ.get("HANGAR_GATEWAY_STREAM_TIMEOUT_SECONDS", 3600.0)
            ),
            max_upload_bytes=int(environ.get("HANGAR_MAX_SOURCE_BYTES", 200 * 1024 * 1024)),
        )


class ClientGone(Exception):
    """The HTTP client disconnected; there is nobody to answer."""


def _message_class(desc: descriptor.Descriptor) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(desc)
    return cls


def _new_request_id() -> str:
    # 96 random bits: a request id needs uniqueness only, not an id's format.
    return os.urandom(12).hex()


class Gateway:
    """HTTP/JSON -> gRPC for the services' annotated RPCs, plus /healthz and /openapi.json."""

    def __init__(
        self,
        settings: Settings,
        options: GatewayOptions | None = None,
        services: Sequence[descriptor.ServiceDescriptor] = PUBLIC_SERVICES,
    ) -> None:
        self.settings = settings
        self.options = options or GatewayOptions()
        self.services = tuple(services)
        self.routes = build_routes(self.services, _message_class)
        for route in self.routes:
            route.plan = prepare(route)
        self.router = Router(self.routes)
        self.openapi = dump(build_openapi(self.routes))
        self.channels: dict[str, grpc.aio.Channel] = {}
        # API token secret's hash -> the access token it was exchanged for.
        self._exchanged: TtlCache[bytes, str] = TtlCache(ttl_seconds=60.0, max_entries=10_000)
        self._exchange_call: grpc.aio.UnaryUnaryMultiCallable[Any, Any] | None = None
        self._builtins: dict[str, Callable[[], Awaitable[tuple[int, bytes, bytes]]]] = {
            "/healthz": self._healthz,
            "/openapi.json": self._openapi,
        }
        self.dashboard = Dashboard()  # `/` and `/ui/...`: the web dashboard's static files
        # GET /metrics on its own port, only with HANGAR_GATEWAY_METRICS_ADDR (shared.metrics).
        self.metrics = Metrics() if settings.metrics_address else None
        self.http_metrics = HttpMetrics(self.metrics) if self.metrics else None
        self.metrics_server: MetricsServer | None = None
        # A span per request, only when tracing is on (shared.tracing); its calls are children.
        # grpc.aio's intercepted calls cost ~0.1 ms each: only sampled requests take the
        # channels with the client interceptors (_invoke).
        self.http_tracing = HttpTracing() if tracing_enabled() else None
        self.traced_channels: dict[str, grpc.aio.Channel] = {}
        self._traced_calls: dict[str, Any] = {}

    # --- lifecycle --------------------------------------------------------------------

    async def startup(self) -> None:
        if self.metrics is not None:
            self.metrics_server = await serve_metrics(self.metrics, self.settings.metrics_address)
        upstreams = sorted({*SERVICES, *(route.upstream for route in self.routes)})
        tls = TlsCredentials.from_files(self.settings.tls)  # mutual TLS when configured
        for name in upstreams:
            services = [s for s in self.services if s.full_name.split(".")[1] == name]
            address = self.settings.addresses[name]  # several: its replicas, round_robin
            options = channel_options(address, services)
            self.channels[name] = make_channel(address, options=options, tls=tls, peer=name)
            if self.http_tracing is not None:  # for the traces sampled: client spans
                self.traced_channels[name] = make_channel(
                    address,
                    options=options,
                    tls=tls,
                    peer=name,
                    interceptors=client_interceptors(),
                )
        self._exchange_call = (self.traced_channels or self.channels)["identity"].unary_unary(
            EXCHANGE_PATH,
            request_serializer=identity_pb2.ExchangeApiTokenRequest.SerializeToString,
            response_deserializer=identity_pb2.ExchangeApiTokenResponse.FromString,
        )
        # No interceptors of ours: the gateway sets deadline and metadata itself, per call.
        for route in self.routes:
            route.invoke = _multicallable(self.channels[route.upstream], route)
            if self.http_tracing is not None:
                traced = self.traced_channels[route.upstream]
                self._traced_calls[route.rpc_path] = _multicallable(traced, route)

    async def shutdown(self) -> None:
        for channel in [*self.channels.values(), *self.traced_channels.values()]:
            await channel.close()
        self.channels.clear()
        self.traced_channels.clear()
        if self.metrics_server is not None:
            await self.metrics_server.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and self.http_tracing is not None:
            await self.http_tracing.around(self._measured, scope, receive, send)
        elif kind == "http":
            await self._measured(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _measured(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.http_metrics is not None:
            await self.http_metrics.around(self._http, scope, receive, send)
        else:
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("gateway start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- one request ------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        headers: dict[bytes, bytes] = dict(raw_headers)
        given_id = headers.get(b"x-request-id")
        request_id = (
            given_id.decode()
            if given_id is not None and _REQUEST_ID.fullmatch(given_id)
            else _new_request_id()
        )
        extra: Headers = [(b"x-request-id", request_id.encode())]
        method: str = scope["method"]
        raw_path: bytes | None = scope.get("raw_path")
        path = raw_path.decode("utf-8", "replace") if raw_path else scope["path"]
        route: Route | None = None
        try:
            self._check_headers(raw_headers)
            page = self.dashboard.answer(method, path, headers)
            if page is not None:
                scope[ROUTE_KEY] = "dashboard"  # metrics' route label: never the raw path
                await _respond(
                    send, page.status, page.content_type, page.body, extra + page.headers
                )
                return
            builtin = self._builtins.get(path)
            if builtin is not None:
                scope[ROUTE_KEY] = path
                if method not in ("GET", "HEAD"):
                    raise _method_not_allowed(method, path, {"GET", "HEAD"})
                status, content_type, body = await builtin()
                await _respond(send, status, content_type, body, extra)
                return
            match = self.router.match(method, path)
            if match is None:
                raise GatewayError.from_domain(
                    NotFound(f"no route for {method} {path}", reason="ROUTE_NOT_FOUND")
                )
            if isinstance(match, set):
                raise _method_not_allowed(method, path, match)
            route = match.route
            scope[ROUTE_KEY] = route.template.text
            streamed = route.plan.streamed_body
            body = (
                await self._read_body(receive, headers) if route.plan.body and not streamed else b""
            )
            request = build_request(
                route,
                match.variables,
                scope["query_string"].decode("utf-8", "replace"),
                body,
                headers,
            )
            ttl = self.settings.refresh_token_ttl_seconds
            session = session_for(route.rpc_path, scope, headers, request, ttl)
            extra += session.headers_before() if session else []
            metadata: list[tuple[str, str]] = [("x-request-id", request_id)]
            authorization = headers.get(b"authorization")
            if authorization is not None:
                if not authorization.isascii():
                    raise GatewayError.from_domain(
                        Unauthenticated("the Authorization header must be ASCII")
                    )
                bearer = authorization.decode()
                if bearer.startswith(API_TOKEN_BEARER):
                    bearer = "Bearer " + await self._exchange(bearer.removeprefix("Bearer "))
                metadata.append(("authorization", bearer))
            if streamed:
                await self._upload(route, request, metadata, headers, receive, send, extra)
            elif route.streaming:
                await self._stream(route, request, metadata, receive, send, extra)
            else:
                await self._unary(route, request, metadata, receive, send, extra, session)
        except ClientGone:
            return
        except GatewayError as error:
            if error.http >= 500:
                log.warning(
                    "upstream error",
                    extra={
                        "request_id": request_id,
                        "method": route.method.full_name if route else path,
                        "code": error.status.code,
                        "http": error.http,
                    },
                )
            await _respond(send, error.http, _JSON, error.body(), extra + error.headers)
        except Exception:
            log.exception("gateway crashed", extra={"request_id": request_id, "path": path})
            crash = GatewayError.from_domain(DomainError("internal error"))
            await _respond(send, 500, _JSON, crash.body(), extra)

    def _check_headers(self, raw_headers: list[tuple[bytes, bytes]]) -> None:
        """431 for a header line too large to be sane or to pass on as gRPC metadata."""
        options = self.options
        fine = min(options.max_authorization_bytes, options.max_header_bytes)
        for name, value in raw_headers:
            size = len(name) + len(value)
            if size <= fine:
                continue
            allowed = (
                options.max_authorization_bytes
                if name == b"authorization"
                else options.max_header_bytes
            )
            if size > allowed:
                header = name.decode("latin-1")
                raise GatewayError.from_domain(
                    ResourceExhausted(
                        f"the {header} header is larger than {allowed} bytes",
                        reason="HEADER_TOO_LARGE",
                        metadata={"header": header, "limit": str(allowed)},
                    ),
                    431,
                )

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        limit = self.options.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _unary(
        self,
        route: Route,
        request: Message,
        metadata: list[tuple[str, str]],
        receive: Receive,
        send: Send,
        extra: Headers,
        session: CookieSession | None = None,
    ) -> None:
        invoke = self._invoke(route, metadata)
        call = invoke(request, timeout=self.settings.call_timeout_seconds, metadata=metadata)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, call))
        try:
            reply = await call
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled():
                raise ClientGone from None
            raise
        except grpc.aio.AioRpcError as exc:
            raise GatewayError.from_rpc_error(exc) from None
        finally:
            watcher.cancel()
        content_type, body = render_response(route.plan, reply)
        if session is not None:  # the dashboard's refresh token goes into a cookie
            body, cookie = session.answer(reply, body)
            extra = extra + cookie
        await _respond(send, 200, content_type, body, extra)

    async def _upload(
        self,
        route: Route,
        first: Message,
        metadata: list[tuple[str, str]],
        headers: dict[bytes, bytes],
        receive: Receive,
        send: Send,
        extra: Headers,
    ) -> None:
        """A client-streaming call fed with the raw request body as it arrives: the first
        message is `first` (path, query and header fields) with the first chunk, then one
        message per chunk of about UPLOAD_CHUNK_BYTES. Past max_upload_bytes the call is
        cancelled (the service stores nothing) and the answer is 413."""
        limit = self.options.max_upload_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        name = route.plan.body
        outcome: dict[str, bool] = {}

        async def messages() -> AsyncIterator[Message]:
            pending: list[bytes] = []
            size = total = 0
            sent_first = False
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    outcome["gone"] = True
                    call.cancel()
                    return
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > limit:
                    outcome["too_large"] = True
                    call.cancel()
                    return
                pending.append(chunk)
                size += len(chunk)
                more = message.get("more_body", False)
                if size < UPLOAD_CHUNK_BYTES and more:
                    continue
                data = b"".join(pending)
                pending, size = [], 0
                if not sent_first:
                    setattr(first, name, data)
                    sent_first = True
                    yield first
                else:
                    yield route.request_class(**{name: data})
                if not more:
                    return

        call = self._invoke(route, metadata)(
            messages(), timeout=self.options.stream_timeout_seconds, metadata=metadata
        )
        try:
            reply = await call
        except (asyncio.CancelledError, grpc.aio.AioRpcError) as exc:
            if outcome.get("too_large"):
                raise _too_large(limit) from None
            if outcome.get("gone"):
                raise ClientGone from None
            if isinstance(exc, grpc.aio.AioRpcError):
                raise GatewayError.from_rpc_error(exc) from None
            raise
        content_type, body = render_response(route.plan, reply)
        await _respond(send, 200, content_type, body, extra)

    async def _stream(
        self,
        route: Route,
        request: Message,
        metadata: list[tuple[str, str]],
        receive: Receive,
        send: Send,
        extra: Headers,
    ) -> None:
        """Newline-delimited JSON: `{"result": message}` per message, then `{"error": status}`
        if the stream ends in an error after it started (grpc-gateway's framing)."""
        invoke = self._invoke(route, metadata)
        call = invoke(request, timeout=self.options.stream_timeout_seconds, metadata=metadata)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, call))
        try:
            # Headers come with the first message or an early status: an error before any
            # message is still a proper HTTP error.
            await call.initial_metadata()
            if call.done():
                code = await call.code()
                if code != grpc.StatusCode.OK:
                    raise GatewayError.from_call(
                        code, await call.details(), await call.trailing_metadata()
                    )
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", _NDJSON), *extra],
                }
            )
            try:
                async for reply in call:
                    line = dump({"result": render_message(reply)}) + b"\n"
                    await send({"type": "http.response.body", "body": line, "more_body": True})
            except grpc.aio.AioRpcError as exc:
                error = GatewayError.from_rpc_error(exc)
                line = dump({"error": error.payload()}) + b"\n"
                await send({"type": "http.response.body", "body": line, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled():
                raise ClientGone from None
            raise
        except grpc.aio.AioRpcError as exc:
            raise GatewayError.from_rpc_error(exc) from None
        finally:
            watcher.cancel()
            call.cancel()

    def _invoke(self, route: Route, metadata: list[tuple[str, str]]) -> Any:
        """The route's call: with client spans inside a sampled trace, else plain (with the
        unsampled trace's traceparent added to `metadata`)."""
        if self.http_tracing is not None and self.http_tracing.sampled_call(metadata):
            return self._traced_calls[route.rpc_path]
        return route.invoke

    async def _exchange(self, secret: str) -> str:
        """An access token for an API token's secret (identity's ExchangeApiToken), kept
        until shortly before it expires: revoking the token ends it on every service at
        once whatever this cache holds (the access token's session is the token)."""
        key = hashlib.sha256(secret.encode()).digest()
        cached = self._exchanged.get(key)
        if cached is not None:
            return cached
        assert self._exchange_call is not None  # made at start-up
        try:
            reply = await self._exchange_call(
                identity_pb2.ExchangeApiTokenRequest(secret=secret),
                timeout=self.settings.call_timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            raise GatewayError.from_rpc_error(exc) from None
        left = reply.expire_time.seconds - time.time() - EXCHANGE_MARGIN_SECONDS
        if left > 0:
            self._exchanged.put(key, reply.access_token, expires_at=time.monotonic() + left)
        token: str = reply.access_token
        return token

    # --- built-in endpoints -----------------------------------------------------------

    async def _healthz(self) -> tuple[int, bytes, bytes]:
        statuses = await upstream_health(self.traced_channels or self.channels)
        healthy = all(status == "SERVING" for status in statuses.values())
        body = dump({"status": "ok" if healthy else "degraded", "upstreams": statuses})
        return (200 if healthy else 503), _JSON, body

    async def _openapi(self) -> tuple[int, bytes, bytes]:
        return 200, _JSON, self.openapi


async def _cancel_on_disconnect(receive: Receive, call: grpc.aio.Call) -> None:
    """Cancel the upstream call when the HTTP client goes away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            call.cancel()
            return


async def _respond(
    send: Send, status: int, content_type: bytes, body: bytes, extra: Headers
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _multicallable(channel: grpc.aio.Channel, route: Route) -> Any:
    if route.method.client_streaming:
        make = channel.stream_unary
    elif route.streaming:
        make = channel.unary_stream
    else:
        make = channel.unary_unary
    return make(
        route.rpc_path,
        request_serializer=route.request_class.SerializeToString,
        response_deserializer=route.response_class.FromString,
    )


def _method_not_allowed(method: str, path: str, allowed: set[str]) -> GatewayError:
    error = DomainError(f"{method} is not allowed on {path}", reason="METHOD_NOT_ALLOWED")
    error.code = grpc.StatusCode.UNIMPLEMENTED
    return GatewayError.from_domain(error, 405, [(b"allow", ", ".join(sorted(allowed)).encode())])


def _too_large(limit: int) -> GatewayError:
    return GatewayError.from_domain(
        ResourceExhausted(f"request body is larger than {limit} bytes", reason="BODY_TOO_LARGE"),
        413,
    )


def build_app(settings: Settings, options: GatewayOptions | None = None) -> Gateway:
    return Gateway(settings, options)
