"""The identity service process."""

from __future__ import annotations

import asyncio
import logging

import grpc

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity.access import AccessBroadcaster
from services.identity.access_relay import AccessRelay
from services.identity.accounts import Accounts
from services.identity.api import IdentityApi
from services.identity.api_tokens import ApiTokens
from services.identity.audit import AuditTrail
from services.identity.cleanup import Cleanup
from services.identity.oauth import OidcVerifier
from services.identity.orgs import Organizations
from services.identity.passwords import Passwords
from services.identity.service_auth import LocalAuthorizer, LocalSessions, ServiceAuth
from services.identity.tokens import KeySet
from shared.app import ServiceApp
from shared.auth import TokenVerifier
from shared.db import Database
from shared.interceptors import Authenticator
from shared.outbox import OutboxFeed
from shared.server import run_service
from shared.settings import Settings

log = logging.getLogger(__name__)


class IdentityFeed(OutboxFeed):
    """Identity's outbox feed. The server ends the feed's streams when it stops (shared.server
    RunningServer.stop); identity's WatchAccess streams must end with them."""

    def __init__(self, db: Database, access: AccessBroadcaster) -> None:
        super().__init__(db, "identity")
        self.access = access

    def end_watches(self) -> None:
        super().end_watches()
        self.access.end_watches()


class IdentityApp(ServiceApp):
    name = "identity"
    service_names = (identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name,)
    watches_access = False  # it is where access changes come from

    def __init__(self, settings: Settings, db: Database, *, keys: KeySet | None = None) -> None:
        self.keys = keys or KeySet.from_settings(settings)
        self.passwords = Passwords.from_settings(settings)
        self.access = AccessBroadcaster(
            lease_seconds=settings.access_lease_seconds,
            ack_timeout_seconds=settings.access_ack_timeout_seconds,
        )
        # Changes reach the watchers of the other identity replicas too (LISTEN/NOTIFY).
        self.relay = AccessRelay(db, self.access)
        self.sessions = LocalSessions(db)
        authorizer = LocalAuthorizer(db)
        self.audit = AuditTrail(db, authorizer)
        self.accounts = Accounts(
            db,
            settings,
            self.keys,
            self.passwords,
            self.audit,
            self.access,
            OidcVerifier(settings.oauth_providers),
        )
        self.orgs = Organizations(db, authorizer, self.audit, self.access)
        self.service_auth = ServiceAuth(db, settings, self.keys, self.access)
        self.api_tokens = ApiTokens(db, settings, self.keys, self.audit, self.access)
        super().__init__(settings, db)
        self.feed = IdentityFeed(db, self.access)
        self.cleanup = Cleanup(db, interval_seconds=settings.identity_cleanup_seconds)
        self.add_loop(self.cleanup.run)
        self.add_loop(self.relay.run)

    def build_authenticator(self) -> Authenticator:
        # Identity verifies with its own key set (no call to itself), and checks sessions in
        # its own database: a sign-out is refused here from the moment it commits.
        return TokenVerifier.for_settings(
            self.settings, self.keys.jwks_source, sessions=self.sessions
        )

    def register(self, server: grpc.aio.Server) -> None:
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(
            IdentityApi(
                self.accounts,
                self.orgs,
                self.service_auth,
                self.audit,
                self.feed,
                self.api_tokens,
            ),
            server,
        )

    async def start(self) -> None:
        await super().start()
        # Watchers are refused until the relay listens: serve only once it does (bounded,
        # so a slow database does not keep the process from starting; it listens later).
        try:
            async with asyncio.timeout(self.settings.call_timeout_seconds):
                await self.relay.wait_listening()
        except TimeoutError:
            log.warning("identity serves before its access relay listens")

    async def close(self) -> None:
        await self.relay.close()
        await super().close()
        self.passwords.close()


def main() -> None:
    run_service(IdentityApp.name, IdentityApp.create)
