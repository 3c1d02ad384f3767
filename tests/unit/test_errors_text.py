"""Text PostgreSQL cannot store is a 400 naming the field; a dependency down is UNAVAILABLE
with a RetryInfo; on a real loopback gRPC server, never INTERNAL and never a traceback."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from hangar.project.v1 import project_pb2
from shared.auth import TokenVerifier, require_user
from shared.clients import open_channel
from shared.errors import (
    DeadlineExceeded,
    InvalidArgument,
    Unavailable,
    translate,
)
from shared.server import RunningServer, start_server
from shared.validation import check_text, text_violation
from tests.support.procs import free_port

SERVICE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]


# ------------------------------------------------------------------------ the field walk


def test_clean_requests_have_no_violation() -> None:
    request = identity_pb2.AuthorizeRequest(organization_id="o1", permission="p", user_id="u")
    assert text_violation(request) is None
    assert text_violation(identity_pb2.GetJwksRequest()) is None  # no string field at all


def test_nul_is_found_and_named_at_any_depth() -> None:
    assert text_violation(identity_pb2.LoginRequest(email="a\x00@x.com")).field == "email"  # type: ignore[union-attr]
    update = project_pb2.UpdateProjectRequest(project=project_pb2.Project(name="w\x00b"))
    assert text_violation(update).field == "project.name"  # type: ignore[union-attr]
    deep = struct_pb2.Struct()
    deep.update({"a": {"b": ["x", "y\x00"]}})
    found = text_violation(deep)
    assert found is not None
    assert found.field == ("fields['a'].struct_value.fields['b'].list_value.values[1].string_value")
    keyed = struct_pb2.Struct()
    keyed.update({"k\x00": 1})
    assert text_violation(keyed).field == "fields"  # type: ignore[union-attr]


def test_check_text_raises_invalid_argument_with_a_field_violation() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_text(identity_pb2.GetOrganizationRequest(id="a\x00b"))
    assert caught.value.reason == "INVALID_TEXT"
    assert [v.field for v in caught.value.violations] == ["id"]


def test_unpaired_surrogates_never_reach_a_message() -> None:
    # Why the walk looks for NUL only: protobuf refuses what UTF-8 cannot encode.
    with pytest.raises(ValueError):
        identity_pb2.LoginRequest(email="a\ud800")


# ------------------------------------------------------------------------ translate()


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), "ipv4:10.0.0.7:5001 refused"
    )


def test_a_downstream_unavailable_or_timeout_keeps_its_code_not_its_text() -> None:
    down = translate(rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert isinstance(down, Unavailable) and "10.0.0.7" not in down.message
    assert isinstance(translate(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)), DeadlineExceeded)
    assert translate(rpc_error(grpc.StatusCode.INTERNAL)) is None  # a bug stays a 500


def test_postgresql_gone_is_unavailable() -> None:
    for exc in (
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
        asyncpg.exceptions.InterfaceError("cannot call Connection.fetch(): connection is closed"),
    ):
        error = translate(exc)
        assert isinstance(error, Unavailable), exc
        assert error.reason == "DATABASE_UNAVAILABLE"
    assert isinstance(translate(ConnectionRefusedError(111, "refused")), Unavailable)


def test_bugs_stay_bugs() -> None:
    assert translate(RuntimeError("boom")) is None
    assert translate(FileNotFoundError("no such file")) is None  # not raised in asyncpg
    assert translate(asyncpg.exceptions.UndefinedTableError("no table")) is None


def test_text_a_query_refused_is_invalid_argument() -> None:
    error = translate(asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte 0x00"))
    assert isinstance(error, InvalidArgument) and error.reason == "INVALID_TEXT"


def test_unavailable_carries_retry_info() -> None:
    status = Unavailable("down", retry_after=2.5).to_status()
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
    assert retry.retry_delay.seconds == 2 and retry.retry_delay.nanos == 500_000_000


# ---------------------------------------------------------------- on a real gRPC server


class Failing(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, downstream: str) -> None:
        self.downstream = downstream
        self.calls = 0

    async def GetOrganization(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        if request.id == "refused":
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
        if request.id == "downstream":
            async with open_channel(self.downstream, services=[SERVICE]) as channel:
                return await identity_pb2_grpc.IdentityServiceStub(channel).GetOrganization(
                    identity_pb2.GetOrganizationRequest(id="x"), timeout=2
                )
        if request.id == "caller":
            require_user()
        return identity_pb2.Organization(id=request.id)


class _App:
    service_names: Sequence[str] = (SERVICE.full_name,)

    def __init__(self, servicer: Failing) -> None:
        self.servicer = servicer

    def register(self, server: grpc.aio.Server) -> None:
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def _no_keys() -> list[dict[str, str]]:
    raise ConnectionRefusedError(111, "identity is down")


@pytest.fixture
async def served() -> AsyncIterator[tuple[Failing, identity_pb2_grpc.IdentityServiceStub]]:
    servicer = Failing(downstream=f"127.0.0.1:{free_port()}")  # nothing listens there
    verifier = TokenVerifier(issuer="hangar", audience="hangar", jwks=_no_keys)
    server: RunningServer = await start_server(
        _App(servicer), "127.0.0.1:0", authenticator=verifier, grace=0.2
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield servicer, identity_pb2_grpc.IdentityServiceStub(channel)
    await channel.close()
    await server.stop()


def details(error: grpc.aio.AioRpcError) -> dict[str, object]:
    status = rpc_status.from_call(error)
    assert status is not None
    found: dict[str, object] = {}
    for kind in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
    ):
        for detail in status.details:
            message = kind()
            if detail.Unpack(message):
                found[kind.DESCRIPTOR.name] = message
    return found


async def test_nul_in_a_request_is_invalid_argument_before_the_handler(
    served: tuple[Failing, identity_pb2_grpc.IdentityServiceStub],
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer, stub = served
    caplog.set_level(logging.INFO, "hangar.rpc")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetOrganization(identity_pb2.GetOrganizationRequest(id="a\x00b"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = details(caught.value)["BadRequest"]
    assert [v.field for v in bad.field_violations] == ["id"]  # type: ignore[attr-defined]
    assert servicer.calls == 0
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_refused_connection_is_unavailable_with_retry_info(
    served: tuple[Failing, identity_pb2_grpc.IdentityServiceStub],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, stub = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetOrganization(identity_pb2.GetOrganizationRequest(id="refused"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "RetryInfo" in details(caught.value)
    assert "5432" not in (caught.value.details() or "")
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_downstream_that_is_down_is_unavailable(
    served: tuple[Failing, identity_pb2_grpc.IdentityServiceStub],
) -> None:
    _, stub = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetOrganization(identity_pb2.GetOrganizationRequest(id="downstream"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = details(caught.value)["ErrorInfo"]
    assert info.reason == "DEPENDENCY_UNAVAILABLE"  # type: ignore[attr-defined]


async def test_keys_that_cannot_be_fetched_are_unavailable_not_unauthenticated(
    served: tuple[Failing, identity_pb2_grpc.IdentityServiceStub],
) -> None:
    _, stub = served
    token = "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.e30.c2ln"  # EdDSA, kid k1: needs the keys
    metadata = (("authorization", f"Bearer {token}"),)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetOrganization(
            identity_pb2.GetOrganizationRequest(id="caller"), metadata=metadata
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details(caught.value)["ErrorInfo"].reason == "KEYS_UNAVAILABLE"  # type: ignore[attr-defined]
    # A call that needs no caller still answers: the token is only checked when needed.
    reply = await stub.GetOrganization(
        identity_pb2.GetOrganizationRequest(id="ok"), metadata=metadata
    )
    assert reply.id == "ok"
