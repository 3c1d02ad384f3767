"""The project service process."""

from __future__ import annotations

import grpc

from hangar.project.v1 import project_pb2, project_pb2_grpc
from services.project.api import ProjectApi
from shared.app import ServiceApp
from shared.server import run_service


class ProjectApp(ServiceApp):
    name = "project"
    service_names = (project_pb2.DESCRIPTOR.services_by_name["ProjectService"].full_name,)

    def register(self, server: grpc.aio.Server) -> None:
        project_pb2_grpc.add_ProjectServiceServicer_to_server(ProjectApi(self), server)


def main() -> None:
    run_service(ProjectApp.name, ProjectApp.create)
