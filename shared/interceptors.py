"""Server interceptor: request id, caller, deadline into contextvars; errors to google.rpc.Status.

One interceptor wraps every handler of a service, so servicers stay plain `async def`s that
raise domain errors (shared.errors) and never touch status codes themselves.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
from grpc_status import rpc_status

from shared.context import (
    ANONYMOUS,
    Principal,
    PrincipalKind,
    bearer_token_var,
    deadline_var,
    principal_var,
    request_id_var,
)
from shared.errors import (
    DomainError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    internal_status,
    translate,
)
from shared.tls import certified_process
from shared.tracing import enter_call, record_status
from shared.validation import check_text

log = logging.getLogger("hangar.rpc")


class Authenticator(Protocol):
    """Turns a bearer token into a principal, or raises Unauthenticated."""

    async def authenticate(self, token: str) -> Principal: ...


# A token that was presented but did not verify (Unauthenticated), or could not be checked
# now (Unavailable: the signing keys could not be fetched); raised by the first guard that
# needs a caller, so an anonymous RPC still answers.
_auth_error_var: contextvars.ContextVar[DomainError | None] = contextvars.ContextVar(
    "auth_error", default=None
)


def auth_error_for_call() -> DomainError | None:
    return _auth_error_var.get()


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator | None = None) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        if handler.unary_unary:
            return handler._replace(
                unary_unary=self._unary(handler.unary_unary, method, metadata, True)
            )
        if handler.stream_unary:
            return handler._replace(
                stream_unary=self._unary(handler.stream_unary, method, metadata, False)
            )
        if handler.unary_stream:
            return handler._replace(
                unary_stream=self._streaming(handler.unary_stream, method, metadata, True)
            )
        return handler._replace(
            stream_stream=self._streaming(handler.stream_stream, method, metadata, False)
        )

    async def _enter(self, context: grpc.aio.ServicerContext, metadata: dict[str, Any]) -> None:
        enter_call(metadata)
        # A request id needs uniqueness, not cuid2's format: urandom is ~50x cheaper per call.
        request_id_var.set(str(metadata.get("x-request-id") or os.urandom(12).hex()))
        remaining = context.time_remaining()
        deadline_var.set(None if remaining is None else time.monotonic() + remaining)
        principal = ANONYMOUS
        error: DomainError | None = None
        authorization = str(metadata.get("authorization", ""))
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token:
                error = Unauthenticated("authorization must be 'Bearer <token>'")
            elif self.authenticator is None:
                error = Unauthenticated("this service does not accept tokens yet")
            else:
                bearer_token_var.set(token)
                try:
                    principal = await self.authenticator.authenticate(token)
                    if principal.kind is PrincipalKind.SERVICE:
                        _check_certified(context, principal.subject)
                except (Unauthenticated, Unavailable) as exc:
                    principal, error = ANONYMOUS, exc
        principal_var.set(principal)
        _auth_error_var.set(error)

    def _unary(
        self,
        behavior: Callable[..., Any],
        method: str,
        metadata: dict[str, Any],
        one_request: bool,
    ) -> Callable[..., Awaitable[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                # Inside the try: a session check that meets PostgreSQL or identity down is a
                # 503 like any handler's, not an unhandled exception.
                await self._enter(context, metadata)
                if one_request:
                    check_text(request)
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
            except Exception as exc:  # every failure becomes a status
                await _abort(context, method, exc, started)

        return handle

    def _streaming(
        self,
        behavior: Callable[..., Any],
        method: str,
        metadata: dict[str, Any],
        one_request: bool,
    ) -> Callable[..., AsyncIterator[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                # Inside the try: a session check that meets PostgreSQL or identity down is a
                # 503 like any handler's, not an unhandled exception.
                await self._enter(context, metadata)
                if one_request:
                    check_text(request)
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):
                    await result
                else:
                    for item in result:
                        yield item
            except Exception as exc:  # every failure becomes a status
                await _abort(context, method, exc, started)

        return handle


def _check_certified(context: grpc.aio.ServicerContext, service: str) -> None:
    """Over mutual TLS a service token must come from that service's own certificate: a
    stolen token is no use from another process (without TLS there is nothing to check)."""
    certified = certified_process(context)
    if certified and certified != service:
        raise Unauthenticated(
            f"a {service} service token sent with {certified}'s certificate",
            reason="TOKEN_PEER_MISMATCH",
        )


async def _abort(
    context: grpc.aio.ServicerContext, method: str, exc: Exception, started: float
) -> None:
    elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
    if isinstance(exc, NotImplementedError):
        exc = Unimplemented(f"{method} is not implemented yet")
    cause: BaseException | None = exc.__cause__
    if not isinstance(exc, DomainError):
        # A dependency down (identity, PostgreSQL) or text a query refused: say so, no trace.
        translated = translate(exc)
        if translated is not None:
            cause, exc = exc, translated
    if isinstance(exc, DomainError):
        extra = {"method": method, "code": exc.code.name, "reason": exc.reason, "ms": elapsed_ms}
        if isinstance(exc, Unavailable):
            if cause is not None:
                extra["cause"] = f"{type(cause).__name__}: {cause}"[:500]
            log.warning("rpc failed: unavailable", extra=extra)
        else:
            log.info("rpc failed", extra=extra)
        record_status(exc.code, exc.message)
        await context.abort_with_status(rpc_status.to_status(exc.to_status()))
    # grpc's own abort raises an exception that must pass through untouched.
    if isinstance(exc, grpc.aio.AbortError) or type(exc).__name__ == "AbortError":
        raise exc
    log.exception("rpc crashed", extra={"method": method, "ms": elapsed_ms}, exc_info=exc)
    record_status(grpc.StatusCode.INTERNAL, "internal error")
    await context.abort_with_status(rpc_status.to_status(internal_status()))
