"""The gateway alone, over real HTTP, in front of a recording fake upstream.

The gateway runs on uvicorn (in a thread, on a free port); the upstream is an in-process
gRPC server whose handlers, built from the same descriptors, record the request message and
metadata they received and answer with a reply, an error status or a stream the test sets.
This pins the mechanics (path/body/query mapping, metadata, deadlines, cancellation,
streaming, error details); tests/integration/test_gateway_services.py runs the real services.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from google.protobuf import message_factory
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2_grpc
from grpc_status import rpc_status

from hangar.identity.v1 import identity_pb2
from hangar.project.v1 import project_pb2
from hangar.runtime.v1 import runtime_pb2
from hangar.type.v1 import resources_pb2
from services.gateway.app import PUBLIC_SERVICES, Gateway, GatewayOptions
from shared.errors import InvalidArgument
from shared.settings import SERVICES, Settings
from tests.support.procs import free_port


@dataclass
class Upstream:
    """What the fake services received, and what they answer next."""

    address: str = ""
    requests: dict[str, Message] = field(default_factory=dict)
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    replies: dict[str, Message] = field(default_factory=dict)
    errors: dict[str, status_pb2.Status] = field(default_factory=dict)
    streams: dict[str, list[Message]] = field(default_factory=dict)
    stream_errors: dict[str, status_pb2.Status] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)
    cancelled: dict[str, threading.Event] = field(default_factory=dict)

    def handle(self, name: str, request: Message, context: grpc.ServicerContext) -> None:
        self.requests[name] = request
        self.metadata[name] = {k: v for k, v in context.invocation_metadata()}
        if name in self.hang:
            event = self.cancelled.setdefault(name, threading.Event())
            while context.is_active():
                time.sleep(0.01)
            event.set()
        if name in self.errors:
            context.abort_with_status(rpc_status.to_status(self.errors[name]))


def _handlers(upstream: Upstream) -> list[grpc.GenericRpcHandler]:
    handlers = []
    for service in PUBLIC_SERVICES:
        methods = {}
        for method in service.methods:
            request_class = message_factory.GetMessageClass(method.input_type)
            reply_class = message_factory.GetMessageClass(method.output_type)
            if method.client_streaming:
                continue
            if method.server_streaming:

                def stream(request: Any, context: Any, name: str = method.name) -> Iterator[Any]:
                    upstream.handle(name, request, context)
                    yield from upstream.streams.get(name, [])
                    if name in upstream.stream_errors:
                        context.abort_with_status(
                            rpc_status.to_status(upstream.stream_errors[name])
                        )

                methods[method.name] = grpc.unary_stream_rpc_method_handler(
                    stream, request_class.FromString, reply_class.SerializeToString
                )
            else:

                def unary(
                    request: Any, context: Any, name: str = method.name, reply: Any = reply_class
                ) -> Any:
                    upstream.handle(name, request, context)
                    return upstream.replies.get(name, reply())

                methods[method.name] = grpc.unary_unary_rpc_method_handler(
                    unary, request_class.FromString, reply_class.SerializeToString
                )
        handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
    return handlers


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn + uvloop on a free port, in a thread."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="uvloop", log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    fake = Upstream()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    for handler in _handlers(fake):
        server.add_generic_rpc_handlers((handler,))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.address = f"127.0.0.1:{port}"
    yield fake
    server.stop(0)


def settings_for(address: str, timeout: float = 5.0) -> Settings:
    addresses = {name: address for name in SERVICES}
    addresses["gateway"] = "127.0.0.1:0"
    return Settings(service="gateway", addresses=addresses, call_timeout_seconds=timeout)


@pytest.fixture(scope="module")
def make_gateway(upstream: Upstream) -> Iterator[Callable[..., str]]:
    stack: list[Any] = []

    def make(timeout: float = 5.0, **options: Any) -> str:
        app = Gateway(settings_for(upstream.address, timeout), GatewayOptions(**options))
        context = serving(app)
        stack.append(context)
        return context.__enter__()

    yield make
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(make_gateway: Callable[..., str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=make_gateway(max_body_bytes=4096), timeout=10) as http:
        yield http


@pytest.fixture(autouse=True)
def _reset(upstream: Upstream) -> None:
    for bucket in (upstream.requests, upstream.metadata, upstream.replies, upstream.errors):
        bucket.clear()
    upstream.streams.clear()
    upstream.stream_errors.clear()
    upstream.hang.clear()


def test_path_body_and_query_reach_the_rpc(client: httpx.Client, upstream: Upstream) -> None:
    resources = resources_pb2.Resources(ram_mb=512)
    upstream.replies["UpdateProject"] = project_pb2.Project(
        id="p1", name="web", resources=resources
    )
    response = client.patch(
        "/v1/projects/p1",
        params={"updateMask": "name,resources.ramMb"},
        json={"id": "ignored", "name": "web", "resources": {"ram_mb": 512}},
    )
    assert response.status_code == 200, response.text
    assert upstream.requests["UpdateProject"] == project_pb2.UpdateProjectRequest(
        project=project_pb2.Project(id="p1", name="web", resources=resources),
        update_mask={"paths": ["name", "resources.ram_mb"]},
    )
    body = response.json()
    assert body["id"] == "p1" and body["resources"]["ramMb"] == 512
    assert body["sleepAfterSeconds"] == 0  # defaults are printed
    assert response.headers["content-type"] == "application/json"


def test_a_patch_without_update_mask_sends_the_fields_its_body_names(
    client: httpx.Client, upstream: Upstream
) -> None:
    upstream.replies["UpdateProject"] = project_pb2.Project(id="p1", sleep_enabled=True)
    response = client.patch("/v1/projects/p1", json={"sleepEnabled": True, "sleepAfterSeconds": 45})
    assert response.status_code == 200, response.text
    assert upstream.requests["UpdateProject"] == project_pb2.UpdateProjectRequest(
        project=project_pb2.Project(id="p1", sleep_enabled=True, sleep_after_seconds=45),
        update_mask={"paths": ["sleep_enabled", "sleep_after_seconds"]},
    )


def test_custom_verb_route(client: httpx.Client, upstream: Upstream) -> None:
    upstream.replies["RollbackDeployment"] = runtime_pb2.Deployment(id="d0")
    response = client.post("/v1/deployments/d1:rollback")
    assert response.status_code == 200, response.text
    assert upstream.requests["RollbackDeployment"] == runtime_pb2.RollbackDeploymentRequest(id="d1")
    assert response.json()["id"] == "d0"


def test_authorization_and_request_id_are_passed_as_metadata(
    client: httpx.Client, upstream: Upstream
) -> None:
    response = client.get(
        "/v1/users/me", headers={"Authorization": "Bearer tok", "X-Request-Id": "req-42"}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-42"
    assert upstream.metadata["GetCurrentUser"]["authorization"] == "Bearer tok"
    assert upstream.metadata["GetCurrentUser"]["x-request-id"] == "req-42"


def test_a_request_id_is_generated_when_missing_or_unusable(
    client: httpx.Client, upstream: Upstream
) -> None:
    first = client.get("/v1/users/me").headers["x-request-id"]
    second = client.get("/v1/users/me", headers={"X-Request-Id": "bad id\twith spaces"})
    assert first and first != second.headers["x-request-id"]
    assert " " not in second.headers["x-request-id"]
    assert upstream.metadata["GetCurrentUser"]["x-request-id"] == second.headers["x-request-id"]
    assert "authorization" not in upstream.metadata["GetCurrentUser"]


def test_upstream_error_details_become_the_json_body(
    client: httpx.Client, upstream: Upstream
) -> None:
    error = InvalidArgument.field("organization.slug", "already used by nobody, just bad")
    upstream.errors["CreateOrganization"] = error.to_status()
    response = client.post("/v1/organizations", json={"name": "Acme", "slug": "BAD"})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 3
    assert body["details"][1]["fieldViolations"] == [
        {"field": "organization.slug", "description": "already used by nobody, just bad"}
    ]
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("code", "http"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.FAILED_PRECONDITION, 400),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_status_codes_over_http(
    client: httpx.Client, upstream: Upstream, code: grpc.StatusCode, http: int
) -> None:
    upstream.errors["GetProject"] = status_pb2.Status(code=code.value[0], message="nope")
    response = client.get("/v1/projects/p1")
    assert response.status_code == http
    assert response.json() == {"code": code.value[0], "message": "nope", "details": []}


def test_stripe_webhook_gets_the_raw_bytes_and_signature(
    client: httpx.Client, upstream: Upstream
) -> None:
    raw = b'{"id":"evt_1", "type":"invoice.paid"}\n'
    response = client.post(
        "/v1/webhooks/stripe",
        content=raw,
        headers={"Stripe-Signature": "t=1,v1=abc", "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    received = upstream.requests["HandleStripeWebhook"]
    assert received.body.data == raw
    assert received.body.content_type == "application/json"
    assert received.stripe_signature == "t=1,v1=abc"


def test_jwks_is_served_at_the_well_known_path(client: httpx.Client, upstream: Upstream) -> None:
    upstream.replies["GetJwks"] = identity_pb2.GetJwksResponse(
        keys=[identity_pb2.Jwk(kty="OKP", crv="Ed25519", x="abc", kid="k1", use="sig", alg="EdDSA")]
    )
    response = client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.json()["keys"][0]["kid"] == "k1"


def test_server_streaming_is_newline_delimited_json(
    client: httpx.Client, upstream: Upstream
) -> None:
    upstream.streams["TailLogs"] = [
        runtime_pb2.LogEntry(line="hello"),
        runtime_pb2.LogEntry(line="world"),
    ]
    upstream.stream_errors["TailLogs"] = status_pb2.Status(code=14, message="agent went away")
    with client.stream("GET", "/v1/projects/p1/logs:tail", params={"tailLines": 2}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert [line["result"]["line"] for line in lines[:2]] == ["hello", "world"]
    assert lines[2] == {"error": {"code": 14, "message": "agent went away", "details": []}}
    assert upstream.requests["TailLogs"] == runtime_pb2.TailLogsRequest(
        project_id="p1", tail_lines=2
    )


def test_a_stream_that_fails_before_any_message_is_an_http_error(
    client: httpx.Client, upstream: Upstream
) -> None:
    upstream.stream_errors["TailLogs"] = status_pb2.Status(code=7, message="not yours")
    response = client.get("/v1/projects/p1/logs:tail")
    assert response.status_code == 403
    assert response.json()["message"] == "not yours"


def test_gateway_errors_are_json(client: httpx.Client) -> None:
    unknown = client.get("/v1/nowhere")
    assert unknown.status_code == 404
    assert unknown.json()["details"][0]["reason"] == "ROUTE_NOT_FOUND"
    wrong = client.delete("/v1/plans")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET"
    malformed = client.post(
        "/v1/auth/login", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.json()["details"][0]["reason"] == "MALFORMED_JSON"
    too_big = client.post("/v1/auth/login", json={"email": "x" * 5000})
    assert too_big.status_code == 413
    assert too_big.json()["details"][0]["reason"] == "BODY_TOO_LARGE"


def test_oversized_chunked_body_is_a_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    response = client.post("/v1/auth/login", content=chunks())
    assert response.status_code == 413


def test_bad_input_is_a_400_naming_the_field_never_a_500(client: httpx.Client) -> None:
    response = client.post("/v1/organizations/o1/projects", json={"resources": {"ramMb": "lots"}})
    assert response.status_code == 400
    violation = response.json()["details"][1]["fieldViolations"][0]
    assert violation["field"] == "project.resources.ramMb"
    response = client.get("/v1/organizations", params={"pageSize": "ten"})
    assert response.status_code == 400
    assert response.json()["details"][1]["fieldViolations"][0]["field"] == "pageSize"


def test_upstream_deadline_is_a_504(make_gateway: Callable[..., str], upstream: Upstream) -> None:
    upstream.hang.add("GetPlan")
    with httpx.Client(base_url=make_gateway(timeout=0.3), timeout=10) as http:
        started = time.monotonic()
        response = http.get("/v1/plans/basic")
    assert response.status_code == 504
    assert time.monotonic() - started < 3


def test_a_client_that_disconnects_cancels_the_upstream_call(
    client: httpx.Client, upstream: Upstream
) -> None:
    upstream.hang.add("GetSubscription")
    upstream.cancelled["GetSubscription"] = threading.Event()
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.get("/v1/organizations/o1/subscription", timeout=0.3)
    # The gateway's deadline is 5 s: seeing the cancel well before it means it came from us.
    assert upstream.cancelled["GetSubscription"].wait(3)
    assert time.monotonic() - started < 3


def test_upstream_down_is_a_503(make_gateway: Callable[..., str]) -> None:
    app = Gateway(settings_for(f"127.0.0.1:{free_port()}", timeout=2))
    with serving(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        response = http.get("/v1/plans")
        health = http.get("/healthz")
    assert response.status_code == 503
    assert response.json()["code"] == 14
    assert health.status_code == 503
    assert set(health.json()["upstreams"]) == set(SERVICES)


def test_healthz_and_openapi(client: httpx.Client) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "upstreams": dict.fromkeys(SERVICES, "SERVING"),
    }
    document = client.get("/openapi.json")
    assert document.status_code == 200
    assert "/v1/deployments/{id}:rollback" in document.json()["paths"]
    assert client.post("/healthz").status_code == 405
