"""The runtime service process."""

from __future__ import annotations

import grpc

from hangar.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from services.runtime.api import RuntimeApi
from shared.app import ServiceApp
from shared.server import run_service


class RuntimeApp(ServiceApp):
    name = "runtime"
    service_names = (runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name,)

    def register(self, server: grpc.aio.Server) -> None:
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(RuntimeApi(self), server)


def main() -> None:
    run_service(RuntimeApp.name, RuntimeApp.create)
