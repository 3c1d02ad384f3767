"""The billing service process."""

from __future__ import annotations

import grpc

from hangar.billing.v1 import billing_pb2, billing_pb2_grpc
from services.billing.api import BillingApi
from shared.app import ServiceApp
from shared.server import run_service


class BillingApp(ServiceApp):
    name = "billing"
    service_names = (billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,)

    def register(self, server: grpc.aio.Server) -> None:
        billing_pb2_grpc.add_BillingServiceServicer_to_server(BillingApi(self), server)


def main() -> None:
    run_service(BillingApp.name, BillingApp.create)
