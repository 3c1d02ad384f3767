"""The identity service process."""

from __future__ import annotations

import grpc

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
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
from shared.server import run_service
from shared.settings import Settings


class IdentityApp(ServiceApp):
    name = "identity"
    service_names = (identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name,)

    def __init__(self, settings: Settings, db: Database, *, keys: KeySet | None = None) -> None:
        self.keys = keys or KeySet.from_settings(settings)
        super().__init__(settings, db)
        self.identity = Identity(
            db,
            settings,
            self.keys,
            Passwords.from_settings(settings),
            OidcVerifier(settings.oauth_providers),
        )
        self.cleanup = Cleanup(db, interval_seconds=settings.identity_cleanup_seconds)
        self.add_loop(self.cleanup.run)

    def build_authenticator(self) -> Authenticator:
        # Identity verifies with its own key set: no call to itself.
        return TokenVerifier.for_settings(self.settings, self.keys.jwks_source)

    def register(self, server: grpc.aio.Server) -> None:
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(
            IdentityApi(self.identity, self.feed), server
        )


def main() -> None:
    run_service(IdentityApp.name, IdentityApp.create)
