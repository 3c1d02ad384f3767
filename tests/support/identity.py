"""Identity for tests of any service: start it (in-process or as a process), sign users up,
get tokens and service tokens, and mint OpenID Connect id_tokens from a local test issuer."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from hangar.identity.v1 import identity_pb2 as pb
from hangar.identity.v1 import identity_pb2_grpc
from services.identity.server import IdentityApp
from services.identity.tokens import generate_signing_key
from shared.db import Database
from shared.server import RunningServer, start_server
from shared.settings import SERVICES, OAuthProvider, Settings, SigningKey
from tests.support.procs import ServiceProcess, free_port, service_env

PASSWORD = "correct horse battery staple"
SERVICE_NAMES = (*SERVICES, "agent", "edge")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class TestIssuer:
    """A local OpenID Connect provider: an Ed25519 key pair that signs id_tokens."""

    __test__ = False  # not a pytest class

    def __init__(self, issuer: str = "https://accounts.test", client_id: str = "hangar-test"):
        self.issuer = issuer
        self.client_id = client_id
        self.kid = f"test-{secrets.token_hex(4)}"
        self._key = Ed25519PrivateKey.generate()

    def jwks(self) -> dict[str, Any]:
        public = json.loads(OKPAlgorithm.to_jwk(self._key.public_key()))
        return {"keys": [{**public, "kid": self.kid, "alg": "EdDSA", "use": "sig"}]}

    def provider(self) -> OAuthProvider:
        return OAuthProvider(issuer=self.issuer, client_id=self.client_id, jwks=self.jwks())

    def id_token(
        self,
        subject: str,
        email: str = "",
        *,
        email_verified: bool = True,
        audience: str | None = None,
        issuer: str | None = None,
        expires_in: int = 300,
        key: Ed25519PrivateKey | None = None,
        nonce: str = "",
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer or self.issuer,
            "aud": audience or self.client_id,
            "sub": subject,
            "iat": now,
            "exp": now + expires_in,
        }
        if email:
            claims["email"] = email
            claims["email_verified"] = email_verified
        if nonce:
            claims["nonce"] = nonce
        return jwt.encode(claims, key or self._key, algorithm="EdDSA", headers={"kid": self.kid})


def identity_settings(
    database_url: str,
    db_passwords: Mapping[str, str],
    *,
    address: str = "127.0.0.1:0",
    signing_keys: tuple[SigningKey, ...] | None = None,
    oauth: Mapping[str, OAuthProvider] | None = None,
    service_secrets: Mapping[str, str] | None = None,
) -> Settings:
    base = Settings.from_env("identity")
    return replace(
        base,
        database_url=database_url,
        db_passwords=dict(db_passwords),
        addresses={**base.addresses, "identity": address},
        jwt_signing_keys=signing_keys or (generate_signing_key(),),
        oauth_providers=dict(oauth or {}),
        service_secrets=dict(service_secrets or {s: f"secret-{s}" for s in SERVICE_NAMES}),
    )


@dataclass
class RunningIdentity:
    """A live identity server and what tests need to talk to it."""

    settings: Settings
    address: str
    app: IdentityApp | None = None
    server: RunningServer | None = None
    process: ServiceProcess | None = None
    _channel: grpc.aio.Channel | None = field(default=None, repr=False)

    @property
    def stub(self) -> identity_pb2_grpc.IdentityServiceStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        return identity_pb2_grpc.IdentityServiceStub(self._channel)

    async def service_token(self, service: str = "project") -> str:
        reply = await self.stub.IssueServiceToken(
            pb.IssueServiceTokenRequest(
                service=service, secret=self.settings.service_secrets[service]
            )
        )
        return reply.token

    async def sign_up(
        self, email: str | None = None, password: str = PASSWORD, name: str = "Test User"
    ) -> pb.AuthResponse:
        email = email or f"user-{secrets.token_hex(5)}@example.com"
        return await self.stub.SignUp(pb.SignUpRequest(email=email, password=password, name=name))

    async def create_org(self, token: str, slug: str | None = None) -> pb.Organization:
        slug = slug or f"org-{secrets.token_hex(5)}"
        return await self.stub.CreateOrganization(
            pb.CreateOrganizationRequest(organization=pb.Organization(name=slug, slug=slug)),
            metadata=bearer(token),
        )

    async def add_member(
        self, token: str, org_id: str, email: str, role: int = pb.ROLE_VIEWER
    ) -> pb.Member:
        return await self.stub.AddMember(
            pb.AddMemberRequest(organization_id=org_id, email=email, role=role),
            metadata=bearer(token),
        )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self.server is not None:
            await self.server.stop()
        if self.process is not None:
            self.process.stop()


@asynccontextmanager
async def running_identity(
    database_url: str, db_passwords: Mapping[str, str], **kwargs: Any
) -> AsyncIterator[RunningIdentity]:
    """Identity in this process on a free loopback port (the database must be migrated)."""
    settings = identity_settings(database_url, db_passwords, **kwargs)
    db = await Database.connect(settings.service_database_url("identity"), max_size=20)
    app = IdentityApp(settings, db)
    server = await start_server(app, "127.0.0.1:0", grace=0.5)
    address = f"127.0.0.1:{server.port}"
    settings = replace(settings, addresses={**settings.addresses, "identity": address})
    running = RunningIdentity(settings, address, app=app, server=server)
    try:
        yield running
    finally:
        await running.close()


def identity_process_env(settings: Settings) -> dict[str, str]:
    """The environment a separate identity process (or any service) needs for these keys."""
    env = service_env(settings.database_url, settings.db_passwords, settings.addresses)
    env["HANGAR_JWT_SIGNING_KEYS"] = json.dumps(
        [{"kid": k.kid, "private_key_pem": k.private_key_pem} for k in settings.jwt_signing_keys]
    )
    for name, secret in settings.service_secrets.items():
        env[f"HANGAR_{name.upper()}_SERVICE_SECRET"] = secret
    if settings.oauth_providers:
        env["HANGAR_OAUTH_PROVIDERS"] = json.dumps(
            {
                name: {"issuer": p.issuer, "client_id": p.client_id, "jwks": p.jwks}
                for name, p in settings.oauth_providers.items()
            }
        )
    return env


def start_identity_process(
    database_url: str, db_passwords: Mapping[str, str], **kwargs: Any
) -> RunningIdentity:
    """Identity as a real process (`hangar serve identity`) on a free port."""
    address = f"127.0.0.1:{free_port()}"
    settings = identity_settings(database_url, db_passwords, address=address, **kwargs)
    process = ServiceProcess.start("identity", address, identity_process_env(settings))
    return RunningIdentity(settings, address, process=process)
