"""The identity service process."""

from __future__ import annotations

import grpc

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity.access import AccessBroadcaster
from services.identity.api import IdentityApi
from services.identity.cleanup import Cleanup
from services.identity.oauth import OidcVerifier
from services.identity.passwords import Passwords
from services.identity.service import Identity
from services.identity.tokens import KeySet
from shared.app import ServiceApp
from shared.auth import TokenVerifier
from shared.db import Database
from shared.interceptors import Authenticator
from shared.outbox import OutboxFeed
from shared.server import run_service
from shared.settings import Settings


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
        self.identity = Identity(
            db, settings, self.keys, self.passwords, OidcVerifier(settings.oauth_providers)
        )
        super().__init__(settings, db)
        self.feed = IdentityFeed(db, self.identity.access)
        self.cleanup = Cleanup(db, interval_seconds=settings.identity_cleanup_seconds)
        self.add_loop(self.cleanup.run)

    def build_authenticator(self) -> Authenticator:
        # Identity verifies with its own key set (no call to itself), and checks sessions in
        # its own database: a sign-out is refused here from the moment it commits.
        return TokenVerifier.for_settings(
            self.settings, self.keys.jwks_source, sessions=self.identity.sessions
        )

    def register(self, server: grpc.aio.Server) -> None:
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(
            IdentityApi(self.identity, self.feed), server
        )

    async def close(self) -> None:
        await super().close()
        self.passwords.close()


def main() -> None:
    run_service(IdentityApp.name, IdentityApp.create)
