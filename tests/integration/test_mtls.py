"""Mutual TLS on real loopback gRPC servers (shared.server with shared.tls credentials): a
client with a certificate of the platform CA is served; a plaintext client, one of another
CA, one whose certificate may not authenticate a client or has expired are refused at the
handshake; and a client refuses a server whose certificate names another process."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from shared import clients as clients_module
from shared.auth import require_service
from shared.clients import Clients, open_channel
from shared.context import Principal, PrincipalKind
from shared.server import RunningServer, start_server
from shared.tls import (
    CLIENT_AUTH,
    SERVER_AUTH,
    Issued,
    TlsCredentials,
    create_ca,
    issue_certificate,
    write_issued,
)
from tests.support.procs import free_port
from tests.unit.test_grpc_plumbing import SERVICE, Recorder, _App

REQUEST = identity_pb2.GetOrganizationRequest(id="org-1")


def _credentials(ca: Issued, leaf: Issued) -> TlsCredentials:
    return TlsCredentials(ca.cert_pem, leaf.cert_pem, leaf.key_pem)


@pytest.fixture(scope="module")
def ca() -> Issued:
    return create_ca()


async def _serve(ca: Issued, process: str = "identity") -> RunningServer:
    leaf = issue_certificate(ca, process, ["127.0.0.1"])
    return await start_server(
        _App(Recorder()), "127.0.0.1:0", grace=0.2, tls=_credentials(ca, leaf)
    )


@pytest.fixture
async def identity(ca: Issued) -> AsyncIterator[RunningServer]:
    server = await _serve(ca)
    yield server
    await server.stop()


async def _call(address: str, tls: TlsCredentials, peer: str = "") -> identity_pb2.Organization:
    async with open_channel(
        address, services=[SERVICE], default_timeout=10, tls=tls, peer=peer
    ) as channel:
        reply: identity_pb2.Organization = await identity_pb2_grpc.IdentityServiceStub(
            channel
        ).GetOrganization(REQUEST)
        return reply


async def _refused(address: str, tls: TlsCredentials, peer: str = "") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(address, tls, peer)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    return caught.value


async def test_a_client_with_a_certificate_of_the_platform_ca_is_served(
    ca: Issued, identity: RunningServer
) -> None:
    runtime = _credentials(ca, issue_certificate(ca, "runtime"))
    address = f"127.0.0.1:{identity.port}"
    assert (await _call(address, runtime)).id == "org-1"  # peer: from the service called
    clients = Clients({"identity": address}, default_timeout=10, tls=runtime)  # services' way
    try:
        stub = clients.stub("identity", identity_pb2_grpc.IdentityServiceStub, SERVICE)
        assert (await stub.GetOrganization(REQUEST)).name == "ok"
    finally:
        await clients.close()


async def test_a_plaintext_client_is_refused(identity: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{identity.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity_pb2_grpc.IdentityServiceStub(channel).GetOrganization(
                REQUEST, timeout=10
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_without_a_certificate_is_refused(
    ca: Issued, identity: RunningServer
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{identity.port}",
        credentials,
        options=TlsCredentials.channel_options("identity"),
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity_pb2_grpc.IdentityServiceStub(channel).GetOrganization(
                REQUEST, timeout=10
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_certificate_of_another_ca_is_refused(
    ca: Issued, identity: RunningServer
) -> None:
    other = create_ca("Someone else's CA")
    # It trusts our CA (it would accept the server) but its own certificate is the other's.
    impostor = TlsCredentials(ca.cert_pem, *_leaf_pems(issue_certificate(other, "runtime")))
    await _refused(f"127.0.0.1:{identity.port}", impostor)


def _leaf_pems(leaf: Issued) -> tuple[bytes, bytes]:
    return leaf.cert_pem, leaf.key_pem


async def test_a_certificate_that_may_not_authenticate_a_client_is_refused(
    ca: Issued, identity: RunningServer
) -> None:
    server_only = issue_certificate(ca, "runtime", usages=(SERVER_AUTH,))
    await _refused(f"127.0.0.1:{identity.port}", _credentials(ca, server_only))


async def test_an_expired_client_certificate_is_refused(
    ca: Issued, identity: RunningServer
) -> None:
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=100)
    expired = issue_certificate(ca, "runtime", days=90, not_before=long_ago)
    await _refused(f"127.0.0.1:{identity.port}", _credentials(ca, expired))
    assert (await _call(f"127.0.0.1:{identity.port}", _credentials(ca, _fresh(ca)))).id


def _fresh(ca: Issued) -> Issued:
    return issue_certificate(ca, "runtime", usages=(CLIENT_AUTH,))


async def test_a_client_refuses_a_server_certificate_naming_another_process(
    ca: Issued,
) -> None:
    # A billing server answers where the client expects identity: same CA, wrong name.
    billing = await _serve(ca, "billing")
    try:
        runtime = _credentials(ca, issue_certificate(ca, "runtime"))
        address = f"127.0.0.1:{billing.port}"
        await _refused(address, runtime, peer="identity")
        assert (await _call(address, runtime, peer="billing")).id == "org-1"
    finally:
        await billing.stop()


def test_a_tls_channel_must_name_the_process_it_calls(ca: Issued) -> None:
    runtime = _credentials(ca, issue_certificate(ca, "runtime"))
    with pytest.raises(ValueError, match="must name the process"):
        open_channel("127.0.0.1:1", tls=runtime)


class _ServiceTokens:
    """Takes the bearer token as the name of the service that sent it."""

    async def authenticate(self, token: str) -> Principal:
        return Principal(kind=PrincipalKind.SERVICE, subject=token)


class _ServiceOnly(Recorder):
    async def GetOrganization(self, request, context):  # type: ignore[no-untyped-def]
        caller = require_service()
        return identity_pb2.Organization(id=request.id, name=caller.subject)


async def test_a_service_token_must_come_with_that_service_s_certificate(ca: Issued) -> None:
    leaf = issue_certificate(ca, "identity", ["127.0.0.1"])
    server = await start_server(
        _App(_ServiceOnly()),
        "127.0.0.1:0",
        grace=0.2,
        authenticator=_ServiceTokens(),
        tls=_credentials(ca, leaf),
    )
    runtime = _credentials(ca, issue_certificate(ca, "runtime"))
    try:
        async with open_channel(
            f"127.0.0.1:{server.port}", services=[SERVICE], default_timeout=10, tls=runtime
        ) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            own = await stub.GetOrganization(
                REQUEST, metadata=[("authorization", "Bearer runtime")]
            )
            assert own.name == "runtime"
            with pytest.raises(grpc.aio.AioRpcError) as caught:  # billing's token, runtime's cert
                await stub.GetOrganization(REQUEST, metadata=[("authorization", "Bearer billing")])
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "runtime's certificate" in (caught.value.details() or "")
    finally:
        await server.stop()


async def test_a_server_whose_files_are_renewed_serves_the_new_certificate_without_restart(
    ca: Issued, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cert-manager (or an agent's renewal) replaces the files: the next connection gets
    the new certificate from the running server; a client's next channel presents its new
    one (shared.clients makes a new channel once its files changed)."""
    monkeypatch.setattr(clients_module, "STAMP_EVERY_SECONDS", 0)  # look at every call
    served, own = tmp_path / "identity", tmp_path / "client"
    write_issued(served, ca.cert_pem, issue_certificate(ca, "identity", ["127.0.0.1"]))
    write_issued(own, ca.cert_pem, issue_certificate(ca, "runtime"))
    server = await start_server(
        _App(Recorder()), "127.0.0.1:0", grace=0.2, tls=TlsCredentials.from_directory(served)
    )
    address = f"127.0.0.1:{server.port}"
    client = TlsCredentials.from_directory(own)
    try:
        assert (await _call(address, client)).id == "org-1"
        # Renewed as something a client of identity must refuse: observable from outside.
        write_issued(served, ca.cert_pem, issue_certificate(ca, "project", ["127.0.0.1"]))
        await _refused(address, client, peer="identity")
        assert (await _call(address, client, peer="project")).id == "org-1"

        # The client's files replaced by a certificate of another CA: its next channel uses
        # them (and is refused), so it no longer presents the one it started with.
        write_issued(served, ca.cert_pem, issue_certificate(ca, "identity", ["127.0.0.1"]))
        clients = Clients({"identity": address}, default_timeout=10, tls=client)
        try:
            first = clients.stub("identity", identity_pb2_grpc.IdentityServiceStub, SERVICE)
            assert (await first.GetOrganization(REQUEST)).name == "ok"
            other = create_ca("Someone else's CA")
            write_issued(own, ca.cert_pem, issue_certificate(other, "runtime"))
            renewed = clients.stub("identity", identity_pb2_grpc.IdentityServiceStub, SERVICE)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await renewed.GetOrganization(REQUEST)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await clients.close()
    finally:
        await server.stop()


async def test_the_plaintext_health_port_answers_health_checks_only(ca: Issued) -> None:
    """What kubelet's gRPC probes reach (they present no certificate): grpc.health.v1 and
    nothing else; the service itself stays behind mutual TLS."""
    health_address = f"127.0.0.1:{free_port()}"
    leaf = issue_certificate(ca, "identity", ["127.0.0.1"])
    server = await start_server(
        _App(Recorder()),
        "127.0.0.1:0",
        grace=0.2,
        tls=_credentials(ca, leaf),
        health_address=health_address,
    )
    try:
        async with grpc.aio.insecure_channel(health_address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await identity_pb2_grpc.IdentityServiceStub(channel).GetOrganization(
                    REQUEST, timeout=10
                )
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop()
