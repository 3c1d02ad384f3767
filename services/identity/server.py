"""The identity service process."""

from __future__ import annotations

import grpc

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity.api import IdentityApi
from shared.app import ServiceApp
from shared.server import run_service


class IdentityApp(ServiceApp):
    name = "identity"
    service_names = (identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name,)

    def register(self, server: grpc.aio.Server) -> None:
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(IdentityApi(self), server)


def main() -> None:
    run_service(IdentityApp.name, IdentityApp.create)
