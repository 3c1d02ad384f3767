"""Agent enrolment through the real path (docs/tls.md, "Agent enrolment"): runtime serving
mutual TLS on a loopback port with an agent CA, beside real identity, project and billing; a
platform admin's CreateJoinToken over mutual TLS; `hangar agent join`'s code spending it at
the enrolment address (its own key, a CSR, the CA pin checked, the files written); then the
agent's calls to runtime with the certificate it got, through shared.clients as the agent
makes them. An agent certificate acts only as its own server, a revoked one is refused, a
token is spent once even by concurrent joins, and a certificate near its end is renewed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hangar.runtime.v1 import enrolment_pb2, enrolment_pb2_grpc, runtime_pb2, runtime_pb2_grpc
from services.agent.drivers import ProcessDriver
from services.agent.enrolment import CertificateRenewer, Joined, join
from services.agent.shipping import AgentTelemetry
from services.runtime.agents import Agents
from services.runtime.enrolment import AgentPeers, EnrolmentSettings
from services.runtime.server import RuntimeApp
from shared.agent_certs import (
    CertificateRefused,
    JoinToken,
    bound_server,
    make_csr,
    new_agent_key,
)
from shared.clients import Clients
from shared.db import Database
from shared.server import RunningServer, start_server
from shared.settings import Settings
from shared.tls import (
    AGENT_CA_DIR,
    CERT_FILE,
    KEY_FILE,
    Issued,
    TlsCredentials,
    create_ca,
    ensure_agent_ca,
    issue_certificate,
    write_issued,
)
from tests.support import runtime as runtime_fixtures
from tests.support.procs import free_port
from tests.support.runtime import Neighbours, add_servers, region_name
from tests.unit.test_grpc_plumbing import Recorder, _App

neighbours = runtime_fixtures.neighbours

RUNTIME_SERVICE = runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
Code = grpc.StatusCode


@dataclass
class Platform:
    """Runtime over mutual TLS with enrolment on, and what callers need to reach it."""

    ca: Issued
    pki: Path
    runtime: RuntimeApp
    server: RunningServer
    address: str
    enrolment_address: str
    neighbours: Neighbours

    def credentials(self, process: str) -> TlsCredentials:
        """A platform-issued certificate (`hangar up`'s kind) for `process`."""
        directory = self.pki / process
        if not directory.exists():
            write_issued(directory, self.ca.cert_pem, issue_certificate(self.ca, process))
        return TlsCredentials.from_directory(directory)

    async def admin(self) -> runtime_pb2_grpc.RuntimeServiceStub:
        """RuntimeService as a platform admin calls it through the gateway."""
        member = await self.neighbours.platform_admin()
        return self._stub(self.credentials("gateway"), member.token)

    async def agent(self, tls: TlsCredentials) -> Clients:
        """The agent's clients (as AgentApp makes them) with its token and `tls`."""
        token = await self.neighbours.service_token("agent")

        async def provide() -> str:
            return token

        return Clients({"runtime": self.address}, token_provider=provide, tls=tls)

    def _stub(self, tls: TlsCredentials, token: str) -> runtime_pb2_grpc.RuntimeServiceStub:
        clients = Clients({"runtime": self.address}, tls=tls)

        async def provide() -> str:
            return token

        clients.token_provider = provide
        self._opened.append(clients)
        return clients.stub("runtime", runtime_pb2_grpc.RuntimeServiceStub, RUNTIME_SERVICE)

    _opened: list[Clients] = field(default_factory=list)


@pytest.fixture
async def platform(neighbours: Neighbours, tmp_path: Path) -> AsyncIterator[Platform]:
    ca = create_ca()
    pki = tmp_path / "pki"
    write_issued(pki / "runtime", ca.cert_pem, issue_certificate(ca, "runtime", ["127.0.0.1"]))
    ensure_agent_ca(pki / AGENT_CA_DIR, ca, 30)
    address = f"127.0.0.1:{free_port()}"
    enrolment_address = f"127.0.0.1:{free_port()}"
    config = neighbours.settings(address)
    db = await Database.connect(config.service_database_url(), min_size=1, max_size=10)
    app = RuntimeApp(
        config,
        db,
        background=False,
        enrolment=EnrolmentSettings(str(pki / AGENT_CA_DIR), enrolment_address),
    )
    server = await start_server(
        app, address, grace=0.2, tls=TlsCredentials.from_directory(pki / "runtime")
    )
    found = Platform(ca, pki, app, server, address, enrolment_address, neighbours)
    yield found
    for clients in found._opened:
        await clients.close()
    await server.stop()


async def _refusal(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    """(code, ErrorInfo reason) of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    reason = ""
    status = rpc_status.from_call(caught.value)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            reason = info.reason
    return caught.value.code(), reason


async def _server(platform: Platform) -> str:
    (server_id,) = await add_servers(platform.runtime.db, region_name("enrol"), 1, 1024, 1000)
    return server_id


async def _token(platform: Platform, server_id: str, ttl: int = 600) -> runtime_pb2.JoinToken:
    admin = await platform.admin()
    return await admin.CreateJoinToken(
        runtime_pb2.CreateJoinTokenRequest(id=server_id, ttl=duration_pb2.Duration(seconds=ttl))
    )


async def _join(platform: Platform, token: str, directory: Path) -> Joined:
    return await join(token, platform.enrolment_address, directory, call_timeout=10)


async def _beat(clients: Clients, server: str) -> runtime_pb2.HeartbeatResponse:
    stub = clients.stub("runtime", runtime_pb2_grpc.RuntimeServiceStub, RUNTIME_SERVICE)
    return await stub.Heartbeat(runtime_pb2.HeartbeatRequest(server_id=server), timeout=10)


async def test_an_agent_enrolled_with_a_join_token_reaches_runtime(
    platform: Platform, tmp_path: Path
) -> None:
    server_id = await _server(platform)
    made = await _token(platform, server_id)
    assert made.server_id == server_id and made.token.startswith(f"hjt1.{made.id}.")

    joined = await _join(platform, made.token, tmp_path / "agent-tls")

    assert joined.server_id == server_id
    assert (tmp_path / "agent-tls" / KEY_FILE).stat().st_mode & 0o777 == 0o600
    tls = TlsCredentials.from_directory(tmp_path / "agent-tls")
    assert tls.pair_matches()
    agent = await platform.agent(tls)
    try:
        reply = await _beat(agent, server_id)
        assert reply.server_status == runtime_pb2.SERVER_STATUS_ACTIVE
    finally:
        await agent.close()


async def test_a_join_token_is_spent_once_even_by_concurrent_joins(
    platform: Platform, tmp_path: Path
) -> None:
    server_id = await _server(platform)
    token = (await _token(platform, server_id)).token

    results = await asyncio.gather(
        *(_join(platform, token, tmp_path / f"agent-{i}") for i in range(6)),
        return_exceptions=True,
    )

    joined = [r for r in results if isinstance(r, Joined)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(joined) == 1 and len(refused) == 5, results
    assert {r.code() for r in refused} == {Code.UNAUTHENTICATED}
    assert await _refusal(_join(platform, token, tmp_path / "late")) == (
        Code.UNAUTHENTICATED,
        "JOIN_TOKEN_SPENT",
    )


async def test_a_forged_or_expired_token_enrols_nothing(platform: Platform, tmp_path: Path) -> None:
    server_id = await _server(platform)
    made = await _token(platform, server_id)
    real = JoinToken.parse(made.token)
    forged = str(JoinToken(real.token_id, bytes(32), real.ca_hash))
    assert await _refusal(_join(platform, forged, tmp_path / "forged")) == (
        Code.UNAUTHENTICATED,
        "JOIN_TOKEN_INVALID",
    )
    # A runtime of another CA: the joiner believes nothing the token does not pin.
    other_ca = str(JoinToken(real.token_id, real.secret, "0" * 64))
    with pytest.raises(CertificateRefused, match="pins"):
        await _join(platform, other_ca, tmp_path / "other")
    assert not (tmp_path / "other").exists()

    expiring = await _token(platform, server_id)
    async with platform.runtime.db.transaction() as tx:
        await tx.execute(
            "UPDATE runtime.agent_join_tokens SET expires_at = now() - interval '1 second'"
            " WHERE id = $1",
            expiring.id,
        )
    assert await _refusal(_join(platform, expiring.token, tmp_path / "expired")) == (
        Code.UNAUTHENTICATED,
        "JOIN_TOKEN_SPENT",
    )


async def test_enrolment_refuses_bad_input_naming_the_field(platform: Platform) -> None:
    server_id = await _server(platform)
    admin = await platform.admin()
    too_long = runtime_pb2.CreateJoinTokenRequest(
        id=server_id, ttl=duration_pb2.Duration(seconds=2 * 86400)
    )
    code, _ = await _refusal(admin.CreateJoinToken(too_long))
    assert code is Code.INVALID_ARGUMENT
    assert (await _refusal(admin.CreateJoinToken(runtime_pb2.CreateJoinTokenRequest(id="nope"))))[
        0
    ] is Code.NOT_FOUND
    user = await platform.neighbours.user()
    as_user = platform._stub(platform.credentials("gateway"), user.token)
    request = runtime_pb2.CreateJoinTokenRequest(id=server_id)
    assert (await _refusal(as_user.CreateJoinToken(request)))[0] is Code.PERMISSION_DENIED

    made = await _token(platform, server_id)
    token = JoinToken.parse(made.token)
    async with grpc.aio.insecure_channel(platform.enrolment_address) as channel:
        stub = enrolment_pb2_grpc.AgentEnrolmentServiceStub(channel)
        bad_csr = b"not a csr"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.JoinAgent(
                enrolment_pb2.JoinAgentRequest(
                    token_id=token.token_id, csr=bad_csr, proof=token.prove(bad_csr)
                ),
                timeout=10,
            )
        assert caught.value.code() is Code.INVALID_ARGUMENT
        assert "csr" in (caught.value.details() or "")
        # The enrolment port serves JoinAgent only: the rest of runtime is not there.
        plain = runtime_pb2_grpc.RuntimeServiceStub(channel)
        code, _ = await _refusal(plain.ListServers(runtime_pb2.ListServersRequest(), timeout=10))
        assert code is Code.UNIMPLEMENTED


async def test_an_agent_certificate_cannot_act_as_another_server(
    platform: Platform, tmp_path: Path
) -> None:
    server_a, server_b = await _server(platform), await _server(platform)
    await _join(platform, (await _token(platform, server_a)).token, tmp_path / "a")
    agent_a = await platform.agent(TlsCredentials.from_directory(tmp_path / "a"))
    platform_agent = await platform.agent(platform.credentials("agent"))  # no server in it
    try:
        assert await _refusal(_beat(agent_a, server_b)) == (
            Code.PERMISSION_DENIED,
            "AGENT_SERVER_MISMATCH",
        )
        stub = agent_a.stub("runtime", runtime_pb2_grpc.RuntimeServiceStub, RUNTIME_SERVICE)
        report = runtime_pb2.ReportContainerStatusRequest(
            server_id=server_b,
            report=runtime_pb2.ContainerStatusReport(container_id="c-1"),
        )
        assert (await _refusal(stub.ReportContainerStatus(report, timeout=10)))[1] == (
            "AGENT_SERVER_MISMATCH"
        )
        metrics = runtime_pb2.ShipMetricsRequest(server_id=server_b)
        assert (await _refusal(stub.ShipMetrics(metrics, timeout=10)))[1] == (
            "AGENT_SERVER_MISMATCH"
        )

        async def batches() -> AsyncIterator[runtime_pb2.ShipLogsRequest]:
            yield runtime_pb2.ShipLogsRequest(server_id=server_a)
            yield runtime_pb2.ShipLogsRequest(server_id=server_b)  # a later batch: refused

        assert (await _refusal(stub.ShipLogs(batches(), timeout=10)))[1] == (
            "AGENT_SERVER_MISMATCH"
        )
        assert (await _beat(agent_a, server_a)).server_status == runtime_pb2.SERVER_STATUS_ACTIVE
        # A platform agent certificate acts as a server that never enrolled, not as one that did.
        assert (await _beat(platform_agent, server_b)).server_status
        assert await _refusal(_beat(platform_agent, server_a)) == (
            Code.PERMISSION_DENIED,
            "AGENT_CERTIFICATE_UNBOUND",
        )
    finally:
        await agent_a.close()
        await platform_agent.close()


async def test_a_revoked_agent_certificate_is_refused(platform: Platform, tmp_path: Path) -> None:
    server_id = await _server(platform)
    await _join(platform, (await _token(platform, server_id)).token, tmp_path / "agent")
    agent = await platform.agent(TlsCredentials.from_directory(tmp_path / "agent"))
    try:
        assert (await _beat(agent, server_id)).server_status == runtime_pb2.SERVER_STATUS_ACTIVE
        admin = await platform.admin()
        revoked = await admin.RevokeAgentCertificate(
            runtime_pb2.RevokeAgentCertificateRequest(id=server_id)
        )
        assert revoked.serial == "" and revoked.HasField("revoke_time")

        assert await _refusal(_beat(agent, server_id)) == (
            Code.PERMISSION_DENIED,
            "AGENT_CERTIFICATE_REVOKED",
        )
        stub = agent.stub("runtime", runtime_pb2_grpc.RuntimeServiceStub, RUNTIME_SERVICE)
        fetch = stub.FetchArtifact(runtime_pb2.FetchArtifactRequest(sha256="0" * 64), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in fetch:
                pass
        assert caught.value.code() is Code.PERMISSION_DENIED
        renew = runtime_pb2.RenewAgentCertificateRequest(csr=make_csr(new_agent_key()[0]))
        assert (await _refusal(stub.RenewAgentCertificate(renew, timeout=10)))[1] == (
            "AGENT_CERTIFICATE_REVOKED"
        )
    finally:
        await agent.close()

    # Joining again with a new token gives a certificate runtime takes.
    await _join(platform, (await _token(platform, server_id)).token, tmp_path / "again")
    again = await platform.agent(TlsCredentials.from_directory(tmp_path / "again"))
    try:
        assert (await _beat(again, server_id)).server_status == runtime_pb2.SERVER_STATUS_ACTIVE
    finally:
        await again.close()


async def test_an_agent_near_expiry_renews_its_certificate_and_keeps_working(
    platform: Platform, tmp_path: Path
) -> None:
    server_id = await _server(platform)
    joined = await _join(platform, (await _token(platform, server_id)).token, tmp_path / "agent")
    tls = TlsCredentials.from_directory(tmp_path / "agent")
    assert tls.files is not None
    agent = await platform.agent(tls)
    try:
        assert (await _beat(agent, server_id)).server_status
        # 90 days left: not due with the default (30 days before the end).
        assert not await CertificateRenewer(tls.files, agent).renew_if_due()
        # The log and metric shippers call on the agent's clients and follow each renewal.
        shipping = AgentTelemetry(Settings("agent"), ProcessDriver(), agent)
        near_end = CertificateRenewer(
            tls.files, agent, renew_within_days=365, on_renewed=shipping.follow_files
        )

        assert await near_end.renew_if_due()

        renewed = tls.current()
        assert renewed.cert_chain_pem != tls.cert_chain_pem and renewed.pair_matches()
        cert = x509.load_pem_x509_certificate(renewed.cert_chain_pem)
        assert bound_server(cert) == server_id
        assert format(cert.serial_number, "x") != joined.serial
        # The agent's next call goes on a channel with the new files, and runtime takes it.
        assert (await _beat(agent, server_id)).server_status
        async with platform.runtime.db.session() as s:
            row = await s.fetchrow(
                "SELECT serial, previous_serial FROM runtime.agent_certificates"
                " WHERE server_id = $1",
                server_id,
            )
        assert row is not None
        assert (row["serial"], row["previous_serial"]) == (
            format(cert.serial_number, "x"),
            joined.serial,
        )
        # Twice renewed: the first certificate is no longer one runtime takes, and the
        # agent's own calls go on with the newest (its clients follow the files).
        assert await near_end.renew_if_due()
        assert (await _beat(agent, server_id)).server_status
        shipped = await shipping.metrics.stub.ShipMetrics(
            runtime_pb2.ShipMetricsRequest(server_id=server_id), timeout=10
        )
        assert (shipped.accepted, shipped.rejected) == (0, 0)  # taken: on the newest files
        first = TlsCredentials(tls.ca_pem, tls.cert_chain_pem, tls.key_pem)
        old = await platform.agent(first)
        try:
            assert (await _refusal(_beat(old, server_id)))[1] == "AGENT_CERTIFICATE_REVOKED"
        finally:
            await old.close()
    finally:
        await agent.close()


async def test_runtime_takes_an_enrolled_server_s_answers_from_its_own_agent_only(
    platform: Platform, tmp_path: Path
) -> None:
    """Runtime dials a server's agent to hand it apps and their secrets: an enrolled server's
    agent must present that server's certificate, not any agent's."""
    first, second = await _server(platform), await _server(platform)
    await _join(platform, (await _token(platform, first)).token, tmp_path / "first")
    await _join(platform, (await _token(platform, second)).token, tmp_path / "second")
    # The first server's agent (its joined certificate) listens at one address.
    agent = await start_server(
        _App(Recorder()),
        "127.0.0.1:0",
        grace=0.2,
        tls=TlsCredentials.from_directory(tmp_path / "first"),
    )
    address = f"127.0.0.1:{agent.port}"
    agents = Agents(
        None,
        timeout=10,
        peer_of=AgentPeers(platform.runtime.db, ttl_seconds=0),
        tls=platform.credentials("runtime"),
    )

    async def registered_at(server_id: str, other: str) -> None:
        async with platform.runtime.db.transaction() as tx:
            await tx.execute(
                "UPDATE runtime.servers SET agent_address = $2 WHERE id = $1", server_id, address
            )
            await tx.execute(
                "UPDATE runtime.servers SET agent_address = '127.0.0.1:1' WHERE id = $1", other
            )

    try:
        # Runtime means the second server there: the first's certificate does not do.
        await registered_at(second, first)
        assert (await _refusal(agents.list(address)))[0] == Code.UNAVAILABLE
        # The first server there: the handshake holds (this stand-in serves no agent RPC).
        await registered_at(first, second)
        assert (await _refusal(agents.list(address)))[0] == Code.UNIMPLEMENTED
    finally:
        await agents.close()
        await agent.stop()


async def test_the_agent_ca_can_mint_agent_certificates_only(
    platform: Platform, tmp_path: Path
) -> None:
    """Name constraints: a certificate the agent CA signs for another process is refused at
    the handshake, whatever runtime (which holds that key) would make it say."""
    agent_ca = (platform.pki / AGENT_CA_DIR / CERT_FILE).read_bytes()
    agent_key = (platform.pki / AGENT_CA_DIR / KEY_FILE).read_bytes()
    forged = issue_certificate(Issued(agent_ca, agent_key), "identity")
    impostor = TlsCredentials(platform.ca.cert_pem, forged.cert_pem + agent_ca, forged.key_pem)
    clients = Clients({"runtime": platform.address}, tls=impostor)
    try:
        stub = clients.stub("runtime", runtime_pb2_grpc.RuntimeServiceStub, RUNTIME_SERVICE)
        code, _ = await _refusal(stub.ListServers(runtime_pb2.ListServersRequest(), timeout=5))
        assert code is Code.UNAVAILABLE
    finally:
        await clients.close()
