"""The shared server bootstrap and client factory, on real loopback gRPC servers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from shared.clients import open_channel, retry_service_config
from shared.context import remaining_seconds, request_id_var
from shared.errors import FieldViolation, InvalidArgument, NotFound
from shared.server import RunningServer, start_server

# gRPC rounds deadlines to its timer granularity, a few milliseconds either way.
SLACK = 0.1
SERVICE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]


class Recorder(identity_pb2_grpc.IdentityServiceServicer):
    """A servicer whose RPCs fail in the ways the interceptor must translate."""

    def __init__(self, downstream: str | None = None) -> None:
        self.downstream = downstream
        self.seen_remaining: list[float | None] = []
        self.seen_request_ids: list[str] = []

    async def GetOrganization(self, request, context):  # type: ignore[no-untyped-def]
        self.seen_remaining.append(remaining_seconds())
        self.seen_request_ids.append(request_id_var.get())
        if request.id == "bad":
            raise InvalidArgument([FieldViolation("id", "must not be 'bad'")])
        if request.id == "crash":
            raise RuntimeError("secret internal detail")
        if request.id == "relay" and self.downstream:
            async with open_channel(self.downstream, services=[SERVICE]) as channel:
                return await identity_pb2_grpc.IdentityServiceStub(channel).GetOrganization(
                    identity_pb2.GetOrganizationRequest(id="ok")
                )
        if request.id == "missing":
            raise NotFound("organization not found")
        return identity_pb2.Organization(id=request.id, name="ok")


class _App:
    service_names = (SERVICE.full_name,)

    def __init__(self, servicer: Recorder) -> None:
        self.servicer = servicer

    def register(self, server: grpc.aio.Server) -> None:
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture
async def servers() -> AsyncIterator[tuple[Recorder, Recorder, RunningServer, RunningServer]]:
    inner = Recorder()
    inner_server = await start_server(_App(inner), "127.0.0.1:0", grace=0.5)
    outer = Recorder(downstream=f"127.0.0.1:{inner_server.port}")
    outer_server = await start_server(_App(outer), "127.0.0.1:0", grace=0.5)
    yield outer, inner, outer_server, inner_server
    await outer_server.stop()
    await inner_server.stop()


def _stub(server: RunningServer) -> identity_pb2_grpc.IdentityServiceStub:
    return identity_pb2_grpc.IdentityServiceStub(
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    )


async def test_invalid_argument_carries_bad_request_naming_the_field(servers) -> None:  # type: ignore[no-untyped-def]
    _, _, outer_server, _ = servers
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stub(outer_server).GetOrganization(identity_pb2.GetOrganizationRequest(id="bad"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    assert status is not None
    kinds = {d.TypeName(): d for d in status.details}
    bad = error_details_pb2.BadRequest()
    kinds["google.rpc.BadRequest"].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["id"]
    info = error_details_pb2.ErrorInfo()
    kinds["google.rpc.ErrorInfo"].Unpack(info)
    assert info.reason == "INVALID_ARGUMENT" and info.domain == "hangar.dev"


async def test_unexpected_exception_is_internal_without_leaking_detail(servers) -> None:  # type: ignore[no-untyped-def]
    _, _, outer_server, _ = servers
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stub(outer_server).GetOrganization(identity_pb2.GetOrganizationRequest(id="crash"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internal detail" not in (caught.value.details() or "")


async def test_rpc_not_built_answers_unimplemented(servers) -> None:  # type: ignore[no-untyped-def]
    _, _, outer_server, _ = servers
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stub(outer_server).GetCurrentUser(identity_pb2.GetCurrentUserRequest())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_deadline_and_request_id_propagate_downstream(servers) -> None:  # type: ignore[no-untyped-def]
    outer, inner, outer_server, _ = servers
    reply = await _stub(outer_server).GetOrganization(
        identity_pb2.GetOrganizationRequest(id="relay"),
        timeout=3.0,
        metadata=(("x-request-id", "req-123"),),
    )
    assert reply.name == "ok"
    assert outer.seen_request_ids == ["req-123"]
    assert inner.seen_request_ids == ["req-123"]
    outer_left, inner_left = outer.seen_remaining[0], inner.seen_remaining[0]
    assert outer_left is not None and inner_left is not None
    # The inner call inherits the caller's 3 s, not the 5 s default (gRPC rounds up by ms).
    assert inner_left < 3.0 + SLACK and outer_left < 3.0 + SLACK


async def test_calls_without_a_deadline_get_the_default_one(servers) -> None:  # type: ignore[no-untyped-def]
    _, inner, _, inner_server = servers
    async with open_channel(
        f"127.0.0.1:{inner_server.port}", services=[SERVICE], default_timeout=1.5
    ) as channel:
        await identity_pb2_grpc.IdentityServiceStub(channel).GetOrganization(
            identity_pb2.GetOrganizationRequest(id="x")
        )
    left = inner.seen_remaining[-1]
    assert left is not None and 0 < left < 1.5 + SLACK


def test_retry_policy_covers_only_idempotent_methods() -> None:
    import json

    config = json.loads(retry_service_config([SERVICE]))
    names = {n["method"] for mc in config["methodConfig"] for n in mc["name"]}
    for method in SERVICE.methods:
        level = method.GetOptions().idempotency_level
        assert (method.name in names) == (level != 0), method.name
