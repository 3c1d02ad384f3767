"""gRPC status -> HTTP status and the JSON error body (docs/architecture.md, "Errors")."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import status_pb2

from services.gateway.app import Gateway
from services.gateway.errors import GatewayError, http_status
from shared.errors import InvalidArgument, NotFound, Unavailable
from shared.settings import Settings


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.OK, 200),
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.ABORTED, 409),
        (grpc.StatusCode.FAILED_PRECONDITION, 400),
        (grpc.StatusCode.OUT_OF_RANGE, 400),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.CANCELLED, 499),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.UNIMPLEMENTED, 501),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.UNKNOWN, 500),
        (grpc.StatusCode.DATA_LOSS, 500),
    ],
)
def test_grpc_codes_map_to_http_statuses(code: grpc.StatusCode, status: int) -> None:
    assert http_status(code) == status


def trailers(status: status_pb2.Status) -> tuple[tuple[str, bytes], ...]:
    return (("grpc-status-details-bin", status.SerializeToString()),)


def test_upstream_details_render_with_type_and_field_violations() -> None:
    error = InvalidArgument.field("organization.slug", "must be lower-case")
    gateway = GatewayError.from_call(
        grpc.StatusCode.INVALID_ARGUMENT, error.message, trailers(error.to_status())
    )
    assert gateway.http == 400
    body = json.loads(gateway.body())
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert body["message"] == "organization.slug: must be lower-case"
    info, bad = body["details"]
    assert info == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "INVALID_ARGUMENT",
        "domain": "hangar.dev",
    }
    assert bad == {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"field": "organization.slug", "description": "must be lower-case"}],
    }


def test_status_without_details_still_has_the_three_keys() -> None:
    gateway = GatewayError.from_call(grpc.StatusCode.UNIMPLEMENTED, "not yet", ())
    assert gateway.http == 501
    assert json.loads(gateway.body()) == {"code": 12, "message": "not yet", "details": []}


def test_details_that_disagree_with_the_code_are_not_trusted() -> None:
    other = NotFound("gone").to_status()
    gateway = GatewayError.from_call(grpc.StatusCode.UNAVAILABLE, "down", trailers(other))
    assert gateway.http == 503
    assert json.loads(gateway.body())["message"] == "down"


def test_garbled_details_trailer_keeps_the_status() -> None:
    gateway = GatewayError.from_call(
        grpc.StatusCode.PERMISSION_DENIED, "no", (("grpc-status-details-bin", b"\xff\x00"),)
    )
    assert gateway.http == 403


def test_unknown_detail_type_stays_opaque() -> None:
    detail = any_pb2.Any(type_url="type.googleapis.com/acme.Unknown", value=b"\x08\x01")
    status = status_pb2.Status(code=5, message="x", details=[detail])
    gateway = GatewayError.from_call(grpc.StatusCode.NOT_FOUND, "x", trailers(status))
    assert json.loads(gateway.body())["details"] == [
        {"@type": "type.googleapis.com/acme.Unknown", "value": "CAE="}
    ]


def test_unauthenticated_asks_for_a_bearer_token() -> None:
    gateway = GatewayError.from_call(grpc.StatusCode.UNAUTHENTICATED, "who?", ())
    assert gateway.http == 401
    assert (b"www-authenticate", b"Bearer") in gateway.headers


def test_unavailable_says_when_to_retry_from_its_retry_info() -> None:
    error = Unavailable("identity is down", retry_after=2.5)
    gateway = GatewayError.from_call(
        grpc.StatusCode.UNAVAILABLE, "down", trailers(error.to_status())
    )
    assert gateway.http == 503
    assert (b"retry-after", b"3") in gateway.headers
    retry = json.loads(gateway.body())["details"][-1]
    assert retry == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.500s"}


def test_unavailable_without_details_still_says_when_to_retry() -> None:
    # The upstream process itself is down: grpc's own UNAVAILABLE, no details.
    gateway = GatewayError.from_call(grpc.StatusCode.UNAVAILABLE, "failed to connect", ())
    assert gateway.http == 503
    assert (b"retry-after", b"1") in gateway.headers


def test_other_errors_have_no_retry_after() -> None:
    gateway = GatewayError.from_call(grpc.StatusCode.NOT_FOUND, "gone", ())
    assert not [h for h in gateway.headers if h[0] == b"retry-after"]


async def _call(gateway: Gateway, headers: list[tuple[bytes, bytes]]) -> tuple[int, Any]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/projects/p1",
        "raw_path": b"/v1/projects/p1",
        "query_string": b"",
        "headers": headers,
    }
    await gateway(scope, receive, send)
    return sent[0]["status"], json.loads(sent[1]["body"])


async def test_an_oversize_header_is_a_431_before_any_upstream_call() -> None:
    gateway = Gateway(Settings.from_env("gateway"))  # not started: no channel to call
    status, body = await _call(gateway, [(b"authorization", b"Bearer " + b"x" * 100_000)])
    assert status == 431
    assert body["details"][0]["reason"] == "HEADER_TOO_LARGE"
    assert body["details"][0]["metadata"] == {"header": "authorization", "limit": "4096"}
    status, body = await _call(gateway, [(b"cookie", b"c" * 9000)])
    assert status == 431
    assert body["details"][0]["metadata"] == {"header": "cookie", "limit": "8192"}
