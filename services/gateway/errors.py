"""gRPC status -> HTTP status, and the JSON error body `{"code", "message", "details"}`.

`code` is the gRPC code number and `details` the google.rpc.Status details as proto3 JSON
with "@type" (the body is google.rpc.Status in JSON, as grpc-gateway renders it). Errors the
gateway makes itself (bad JSON, unknown route, ...) are shared.errors domain errors, so they
carry the same ErrorInfo / BadRequest details as a service's.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.rpc import error_details_pb2, status_pb2

from shared.errors import DomainError, FieldViolation, InvalidArgument

# The contract of every Hangar route (README); OUT_OF_RANGE and CANCELLED as
# google/rpc/code.proto documents them.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_DETAILS_KEY = "grpc-status-details-bin"
_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
# An UNAVAILABLE without a RetryInfo (the upstream process itself is down) still says when.
DEFAULT_RETRY_AFTER_SECONDS = 1


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status for a gRPC code; anything not in the table is a 500."""
    return HTTP_STATUS.get(code, 500)


class GatewayError(Exception):
    """An error response: HTTP status plus a google.rpc.Status rendered as JSON."""

    def __init__(
        self,
        status: status_pb2.Status,
        http: int | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(status.message)
        self.status = status
        code = _CODES_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN)
        self.http = http if http is not None else http_status(code)
        self.headers = list(headers)
        if code is grpc.StatusCode.UNAUTHENTICATED:
            self.headers.append((b"www-authenticate", b"Bearer"))
        elif code is grpc.StatusCode.UNAVAILABLE or self.http == 429:
            seconds = retry_after(status)
            if seconds is None and code is grpc.StatusCode.UNAVAILABLE:
                seconds = DEFAULT_RETRY_AFTER_SECONDS
            if seconds is not None:
                self.headers.append((b"retry-after", str(seconds).encode()))

    @classmethod
    def from_domain(
        cls, error: DomainError, http: int | None = None, headers: Sequence[Any] = ()
    ) -> GatewayError:
        return cls(error.to_status(), http, headers)

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> GatewayError:
        return cls.from_call(error.code(), error.details(), error.trailing_metadata())

    @classmethod
    def from_call(cls, code: grpc.StatusCode, message: str | None, trailing: Any) -> GatewayError:
        """The upstream's status, with its google.rpc details when it sent them."""
        status = None
        for key, value in trailing or ():
            if key == _DETAILS_KEY and isinstance(value, bytes):
                try:
                    status = status_pb2.Status.FromString(value)
                except Exception:  # a garbled trailer must not hide the status code
                    status = None
        if status is None or status.code != code.value[0]:
            status = status_pb2.Status(code=code.value[0], message=message or code.name)
        return cls(status)

    def payload(self) -> dict[str, Any]:
        return {
            "code": self.status.code,
            "message": self.status.message,
            "details": [render_detail(d) for d in self.status.details],
        }

    def body(self) -> bytes:
        return json.dumps(self.payload(), separators=(",", ":"), ensure_ascii=False).encode()


def retry_after(status: status_pb2.Status) -> int | None:
    """Whole seconds (at least 1) from the status's google.rpc.RetryInfo, if it has one."""
    for detail in status.details:
        if detail.type_url == _RETRY_INFO:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                nanos: int = info.retry_delay.ToNanoseconds()
                return max(1, math.ceil(nanos / 1e9))
    return None


def render_detail(detail: any_pb2.Any) -> dict[str, Any]:
    """An Any as proto3 JSON with "@type"; a type this process does not know stays opaque."""
    try:
        rendered: dict[str, Any] = json_format.MessageToDict(detail)
        return rendered
    except Exception:
        return {
            "@type": detail.type_url,
            "value": base64.b64encode(detail.value).decode(),
        }


def bad_request(field: str, description: str, reason: str = "INVALID_ARGUMENT") -> GatewayError:
    """A 400 naming the field (a BadRequest field violation), for input the gateway rejects."""
    return GatewayError.from_domain(
        InvalidArgument([FieldViolation(field, description)], reason=reason)
    )
