"""The agent process: runs on each server and starts / stops app processes for runtime.

It has no database: its state is the processes it runs. Shutting it down stops them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from hangar.agent.v1 import agent_pb2, agent_pb2_grpc
from services.agent.api import AgentApi
from services.agent.drivers import Driver, ProcessDriver
from shared.auth import IdentityJwks, TokenVerifier
from shared.interceptors import Authenticator
from shared.server import run_service
from shared.settings import Settings

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]


class AgentApp:
    """What shared.server serves: the AgentService over one driver."""

    name = "agent"
    service_names: Sequence[str] = (AGENT_SERVICE.full_name,)

    def __init__(
        self,
        settings: Settings,
        *,
        driver: Driver | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.settings = settings
        self.driver: Driver = driver or ProcessDriver(
            advertise_host=settings.agent_app_host,
            start_timeout=settings.agent_start_timeout_seconds,
            stop_grace=settings.agent_stop_grace_seconds,
            log_lines=settings.agent_log_buffer_lines,
        )
        self._jwks: IdentityJwks | None = None
        if authenticator is None:
            # Tokens are verified locally with identity's published keys.
            self._jwks = IdentityJwks(settings)
            authenticator = TokenVerifier.for_settings(settings, self._jwks)
        self.authenticator = authenticator

    @classmethod
    async def create(cls, settings: Settings) -> AgentApp:
        return cls(settings)

    def register(self, server: grpc.aio.Server) -> None:
        agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentApi(self.driver), server)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        await self.driver.close()  # no app outlives the agent
        if self._jwks is not None:
            await self._jwks.close()


def main() -> None:
    run_service(AgentApp.name, AgentApp.create)
