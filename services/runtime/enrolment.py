"""Agents enrolled with one-time join tokens, bound to their server by their certificate
(docs/tls.md, "Agent enrolment").

- A platform admin creates a join token for a server (`CreateJoinToken`); `hangar agent
  join` on that machine spends it (`AgentEnrolmentService.JoinAgent`, on the enrolment
  address) and gets a certificate for its own key, bound to the server id, signed by the
  agent CA runtime holds (shared.agent_certs).
- The agent renews it over mutual TLS with the current one (`RenewAgentCertificate`).
- An admin revokes a server's agent certificates (`RevokeAgentCertificate`).
- `AgentBinding` (a server interceptor) refuses an agent call whose server is not the one
  its certificate names, or made with a certificate that was revoked or replaced.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from google.protobuf import duration_pb2

from hangar.runtime.v1 import enrolment_pb2, enrolment_pb2_grpc
from hangar.runtime.v1 import runtime_pb2 as pb
from services.runtime import store
from services.runtime.store import enrolment as enrolment_store
from services.runtime.store.enrolment import AgentCertificateRow
from shared.agent_certs import (
    AGENT,
    AgentCa,
    CertificateRefused,
    JoinToken,
    bound_server,
    proof_holds,
    serial_text,
)
from shared.audit import current_actor, record_audit
from shared.auth import require_platform_admin, require_service
from shared.db import Database
from shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from shared.ids import new_id
from shared.interceptors import ServerInterceptor
from shared.proto import optional_timestamp

log = logging.getLogger("hangar.runtime.enrolment")

DEFAULT_TTL_SECONDS = 3600
MAX_TTL_SECONDS = 24 * 3600
MIN_TTL_SECONDS = 60


@dataclass(frozen=True)
class EnrolmentSettings:
    """Where runtime finds the agent CA (HANGAR_RUNTIME_AGENT_CA_DIR: tls.crt, tls.key,
    ca.crt; empty: enrolment off) and where it serves JoinAgent
    (HANGAR_RUNTIME_ENROLMENT_ADDR, "host:port"; empty: not served)."""

    agent_ca_dir: str = ""
    address: str = ""

    @classmethod
    def from_env(cls) -> EnrolmentSettings:
        return cls(
            os.environ.get("HANGAR_RUNTIME_AGENT_CA_DIR", "").strip(),
            os.environ.get("HANGAR_RUNTIME_ENROLMENT_ADDR", "").strip(),
        )

    def agent_ca(self) -> AgentCa | None:
        return AgentCa.from_directory(Path(self.agent_ca_dir)) if self.agent_ca_dir else None


@dataclass(frozen=True)
class IssuedCertificate:
    row: AgentCertificateRow
    chain_pem: bytes
    ca_pem: bytes


def peer_certificate(context: grpc.aio.ServicerContext) -> x509.Certificate | None:
    """The caller's certificate over mutual TLS; None over plaintext."""
    found = context.auth_context()
    if (found.get("transport_security_type") or [b""])[0] != b"ssl":
        return None
    pem = (found.get("x509_pem_cert") or [b""])[0]
    return x509.load_pem_x509_certificate(pem) if pem else None


def certificate_to_proto(
    issued: AgentCertificateRow, chain: bytes = b"", ca: bytes = b""
) -> pb.AgentCertificate:
    return pb.AgentCertificate(
        server_id=issued.server_id,
        serial=issued.serial or "",
        not_after=optional_timestamp(issued.not_after),
        revoke_time=optional_timestamp(issued.revoked_at),
        certificate_chain=chain.decode(),
        ca_bundle=ca.decode(),
    )


class AgentEnrolment:
    """Join tokens, joins, renewals, revocations, and the binding check."""

    def __init__(self, db: Database, agent_ca: AgentCa | None) -> None:
        self.db = db
        self.agent_ca = agent_ca

    def _ca(self) -> AgentCa:
        if self.agent_ca is None:
            raise FailedPrecondition(
                "agent enrolment is off: runtime has no agent CA (HANGAR_RUNTIME_AGENT_CA_DIR)",
                reason="ENROLMENT_OFF",
            )
        return self.agent_ca

    def _sign(self, csr: bytes, server_id: str) -> tuple[bytes, x509.Certificate]:
        if not csr:
            raise InvalidArgument.field("csr", "required")
        try:
            chain = self._ca().sign(csr, server_id)
        except CertificateRefused as exc:
            raise InvalidArgument.field("csr", str(exc)) from None
        return chain, x509.load_pem_x509_certificate(chain)

    async def create_join_token(self, server_id: str, ttl_seconds: float) -> pb.JoinToken:
        require_platform_admin()
        ca = self._ca()
        server_id = server_id.strip()
        if not server_id:
            raise InvalidArgument.field("id", "required")
        ttl = ttl_seconds or DEFAULT_TTL_SECONDS
        if not MIN_TTL_SECONDS <= ttl <= MAX_TTL_SECONDS:
            raise InvalidArgument.field(
                "ttl", f"between {MIN_TTL_SECONDS} s and {MAX_TTL_SECONDS // 3600} hours"
            )
        token = JoinToken.new(new_id(), ca.ca_hash)
        async with self.db.transaction() as tx:
            server = await store.get_server(tx, server_id)
            expires = await enrolment_store.insert_join_token(
                tx,
                token_id=token.token_id,
                server_id=server.id,
                public_key=token.public_key,
                created_by=current_actor() or "",
                ttl_seconds=ttl,
            )
            await record_audit(
                tx,
                "runtime",
                organization_id="",
                action="server.join_token_created",
                target_type="server",
                target_id=server.id,
                metadata={"token_id": token.token_id, "ttl_seconds": int(ttl)},
            )
        return pb.JoinToken(
            server_id=server.id,
            id=token.token_id,
            token=str(token),
            expire_time=optional_timestamp(expires),
        )

    async def join(self, token_id: str, csr: bytes, proof: bytes) -> IssuedCertificate:
        """Spend a join token: a certificate for the CSR's key, bound to its server."""
        token_id = token_id.strip()
        if not token_id:
            raise InvalidArgument.field("token_id", "required")
        if not proof:
            raise InvalidArgument.field("proof", "required")
        async with self.db.session() as s:
            token = await enrolment_store.find_join_token(s, token_id)
        if token is None or not proof_holds(token.public_key, token_id, csr, proof):
            raise Unauthenticated("this join token is not valid", reason="JOIN_TOKEN_INVALID")
        chain, leaf = self._sign(csr, token.server_id)
        async with self.db.transaction() as tx:
            if await enrolment_store.spend_join_token(tx, token_id) is None:
                raise Unauthenticated(
                    "this join token was used already or has expired", reason="JOIN_TOKEN_SPENT"
                )
            row = await enrolment_store.enrol_agent_certificate(
                tx, token.server_id, serial_text(leaf), leaf.not_valid_after_utc
            )
            await record_audit(
                tx,
                "runtime",
                organization_id="",
                action="server.agent_joined",
                target_type="server",
                target_id=token.server_id,
                metadata={"token_id": token_id, "serial": row.serial},
            )
        log.info("agent joined", extra={"server_id": token.server_id, "serial": row.serial})
        return IssuedCertificate(row, chain, self._ca().root_pem)

    async def renew(self, context: grpc.aio.ServicerContext, csr: bytes) -> IssuedCertificate:
        """A new certificate for the calling agent's server, for the CSR's (new) key."""
        require_service(AGENT)
        current = peer_certificate(context)
        server_id = bound_server(current) if current is not None else ""
        if current is None or not server_id:
            raise FailedPrecondition(
                "only an enrolled agent renews, over mutual TLS with its certificate",
                reason="AGENT_NOT_ENROLLED",
            )
        chain, leaf = self._sign(csr, server_id)
        async with self.db.transaction() as tx:
            row = await enrolment_store.renew_agent_certificate(
                tx, server_id, serial_text(current), serial_text(leaf), leaf.not_valid_after_utc
            )
            if row is None:
                raise PermissionDenied(
                    "this agent certificate was revoked or replaced; join again",
                    reason="AGENT_CERTIFICATE_REVOKED",
                )
        log.info("agent certificate renewed", extra={"server_id": server_id, "serial": row.serial})
        return IssuedCertificate(row, chain, self._ca().root_pem)

    async def revoke(self, server_id: str) -> AgentCertificateRow:
        require_platform_admin()
        server_id = server_id.strip()
        if not server_id:
            raise InvalidArgument.field("id", "required")
        async with self.db.transaction() as tx:
            server = await store.get_server(tx, server_id)
            row = await enrolment_store.revoke_agent_certificates(tx, server.id)
            await record_audit(
                tx,
                "runtime",
                organization_id="",
                action="server.agent_certificate_revoked",
                target_type="server",
                target_id=server.id,
            )
        return row

    async def require_bound(self, context: grpc.aio.ServicerContext, server: str | None) -> None:
        """Over mutual TLS, an agent's call for `server` (id or name; None: the call names
        none) only with a certificate that may act as it: bound to that server and not
        revoked or replaced; a platform agent certificate (no server in it) only for a
        server that never enrolled. Plaintext: nothing to check."""
        cert = peer_certificate(context)
        if cert is None:
            return
        bound = bound_server(cert)
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not bound and (not names or names[0].value != AGENT):
            return  # not an agent: the handler's require_service refuses it
        async with self.db.session() as s:
            found = await store.find_server(s, server) if server else None
            if bound:
                if server and (found is None or found.id != bound):
                    raise PermissionDenied(
                        f"this agent certificate is server {bound}'s: it cannot act as {server}",
                        reason="AGENT_SERVER_MISMATCH",
                    )
                row = await enrolment_store.agent_certificate(s, bound)
                if row is None or not row.accepts(serial_text(cert)):
                    raise PermissionDenied(
                        f"this agent certificate of server {bound} was revoked or replaced",
                        reason="AGENT_CERTIFICATE_REVOKED",
                    )
            elif (
                found is not None
                and await enrolment_store.agent_certificate(s, found.id) is not None
            ):
                raise PermissionDenied(
                    f"server {found.id} is enrolled: only its own agent certificate may act as it",
                    reason="AGENT_CERTIFICATE_UNBOUND",
                )


# ----------------------------------------------------------------- the binding check

_RUNTIME = "/hangar.runtime.v1.RuntimeService/"
# Agent RPCs and whether their requests name a server (server_id).
_AGENT_METHODS = {
    f"{_RUNTIME}Heartbeat": True,
    f"{_RUNTIME}ReportContainerStatus": True,
    f"{_RUNTIME}ShipMetrics": True,
    f"{_RUNTIME}ShipLogs": True,
    f"{_RUNTIME}FetchArtifact": False,
    f"{_RUNTIME}PutArtifact": False,
}


class AgentBinding(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Runs AgentEnrolment.require_bound before each agent RPC (for ShipLogs, on each batch
    that names another server than the last). Served inside shared.interceptors'
    ServerInterceptor, so a refusal is a status with its reason like any handler's."""

    def __init__(self, enrolment: AgentEnrolment) -> None:
        self.enrolment = enrolment

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        names_server = _AGENT_METHODS.get(handler_call_details.method)
        if handler is None or names_server is None:
            return handler
        check = self.enrolment.require_bound
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context, request.server_id if names_server else None)
                return await inner_uu(request, context)

            return handler._replace(unary_unary=unary)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def streamed(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context, None)
                async for item in inner_us(request, context):
                    yield item

            return handler._replace(unary_stream=streamed)
        inner_su = handler.stream_unary

        async def batches(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            if not names_server:
                await check(context, None)
                return await inner_su(requests, context)

            async def checked() -> AsyncIterator[Any]:
                last: str | None = None
                async for request in requests:
                    if request.server_id != last:
                        await check(context, request.server_id)
                        last = request.server_id
                    yield request

            return await inner_su(checked(), context)

        return handler._replace(stream_unary=batches)


# ------------------------------------------------------------------ the enrolment port


class AgentPeers:
    """Whose certificate runtime accepts from the agent it dials (docs/tls.md): an enrolled
    server's agent must present its own, `<server id>.agent.hangar.internal`, so no other
    agent (another server's, enrolled with the same CA) can answer for it and receive its
    apps' secrets; a server that never enrolled (`hangar up`'s, a DaemonSet's shared
    certificate) any agent certificate. The TLS peer name for Agents (shared.tls.peer_name
    of it), looked up again after `ttl_seconds`."""

    def __init__(self, db: Database, ttl_seconds: float = 5.0) -> None:
        self.db = db
        self.ttl = ttl_seconds
        self._known: dict[str, tuple[str, float]] = {}

    async def __call__(self, agent_address: str) -> str:
        now = time.monotonic()
        known = self._known.get(agent_address)
        if known is not None and known[1] > now:
            return known[0]
        async with self.db.session() as s:
            server_id = await enrolment_store.enrolled_server_at(s, agent_address)
        peer = f"{server_id}.{AGENT}" if server_id else AGENT
        self._known[agent_address] = (peer, now + self.ttl)
        return peer


class EnrolmentApi(enrolment_pb2_grpc.AgentEnrolmentServiceServicer):
    def __init__(self, enrolment: AgentEnrolment) -> None:
        self.enrolment = enrolment

    async def JoinAgent(
        self, request: enrolment_pb2.JoinAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.AgentCertificate:
        issued = await self.enrolment.join(request.token_id, request.csr, request.proof)
        return certificate_to_proto(issued.row, issued.chain_pem, issued.ca_pem)


class EnrolmentServer:
    """AgentEnrolmentService alone, on its own address, without TLS: a joining agent has
    no certificate yet, and nothing secret crosses this port (module docstring of
    shared.agent_certs). Every other RPC stays on the mutual-TLS port."""

    def __init__(self, enrolment: AgentEnrolment) -> None:
        self.enrolment = enrolment
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, address: str) -> int:
        server = grpc.aio.server(
            interceptors=[ServerInterceptor(None)], options=[("grpc.so_reuseport", 0)]
        )
        enrolment_pb2_grpc.add_AgentEnrolmentServiceServicer_to_server(
            EnrolmentApi(self.enrolment), server
        )
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from exc
        await server.start()
        self.server = server
        log.info("serving agent enrolment", extra={"address": address, "port": self.port})
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None


def seconds(duration: duration_pb2.Duration) -> float:
    """A google.protobuf.Duration's seconds (0 when unset)."""
    return float(duration.seconds + duration.nanos / 1e9)
