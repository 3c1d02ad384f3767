"""Runtime's calls to the agents: one channel per agent address, runtime's service token and
a deadline on every call. Nothing here touches the database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime

import grpc
from google.protobuf import duration_pb2

from hangar.agent.v1 import agent_pb2, agent_pb2_grpc
from services.runtime.domain import REGISTRY_PASSWORD, REGISTRY_USERNAME, WEB
from services.runtime.store.records import Container, Deployment
from shared.agent_certs import AGENT
from shared.clients import TokenProvider, open_channel
from shared.tls import TlsCredentials

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
_RESTART_POLICY = {
    "on-failure": agent_pb2.RESTART_POLICY_ON_FAILURE,
    "always": agent_pb2.RESTART_POLICY_ALWAYS,
    "never": agent_pb2.RESTART_POLICY_NEVER,
}

# Codes after which asking the same agent again may succeed.
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAUTHENTICATED,  # runtime's token not issued yet, keys rotating
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


def is_transient(error: grpc.aio.AioRpcError) -> bool:
    return error.code() in TRANSIENT


# The TLS peer (a process name for shared.tls.peer_name) whose certificate the agent at an
# address must present: "agent", or "<server id>.agent" for an enrolled server's.
PeerOf = Callable[[str], Awaitable[str]]


async def _any_agent(address: str) -> str:
    return AGENT


class Agents:
    def __init__(
        self,
        token_provider: TokenProvider | None,
        *,
        timeout: float = 5.0,
        stop_grace: float | None = None,
        peer_of: PeerOf = _any_agent,
        tls: TlsCredentials | None = None,
    ) -> None:
        self.token_provider = token_provider
        self.timeout = timeout
        self.stop_grace = stop_grace
        self.peer_of = peer_of  # with TLS: services.runtime.enrolment.AgentPeers
        self.tls = tls  # None: the process's (HANGAR_TLS_*), as open_channel says
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    async def stub(self, address: str) -> agent_pb2_grpc.AgentServiceStub:
        key = (address, await self.peer_of(address))
        if key not in self._channels:
            self._channels[key] = open_channel(
                address,
                services=[AGENT_SERVICE],
                default_timeout=self.timeout,
                token_provider=self.token_provider,
                tls=self.tls,
                peer=key[1],
            )
        return agent_pb2_grpc.AgentServiceStub(self._channels[key])

    async def start(
        self,
        address: str,
        container: Container,
        deployment: Deployment,
        env: Mapping[str, str],
    ) -> agent_pb2.StartContainerResponse:
        """Start one container of the deployment: its process type, with that process's
        share of the deployment's resources (all of them for a deployment of one)."""
        share = deployment.share_of(container.process_type)
        web = share.type == WEB
        request = agent_pb2.StartContainerRequest(
            container_id=container.id,
            deployment_id=deployment.id,
            project_id=deployment.project_id,
            env={k: v for k, v in env.items() if k not in (REGISTRY_USERNAME, REGISTRY_PASSWORD)},
            resources=share.resources.to_proto(),
            health_check_path=deployment.health_check_path if web else "",
            restart_policy=_RESTART_POLICY.get(
                deployment.restart_policy, agent_pb2.RESTART_POLICY_ON_FAILURE
            ),
            liveness_check_path=deployment.liveness_check_path if web else "",
            liveness_failure_threshold=deployment.liveness_failure_threshold,
            process_type=share.type,
        )
        if deployment.liveness_check_path and web:
            request.liveness_period.FromSeconds(deployment.liveness_period_seconds)
        if deployment.image is not None:
            request.image = deployment.image_to_run
            request.image_command = deployment.image_command
            # A private registry's credentials go to the pull alone, never to the app.
            request.registry_username = env.get(REGISTRY_USERNAME, "")
            request.registry_password = env.get(REGISTRY_PASSWORD, "")
        elif deployment.source_sha256:
            # Built in the sandbox first, unless a slug of it exists (a rollback, a restart
            # with new config): then that exact slug runs.
            request.source_sha256 = deployment.source_sha256
            request.slug_sha256 = deployment.slug_sha256
        else:
            request.command = deployment.command or ""
        agent = await self.stub(address)
        reply: agent_pb2.StartContainerResponse = await agent.StartContainer(
            request, timeout=self.timeout
        )
        return reply

    async def stop(self, address: str, container_id: str) -> agent_pb2.Container:
        request = agent_pb2.StopContainerRequest(container_id=container_id)
        grace = self.stop_grace
        if grace is not None:
            request.grace.CopyFrom(duration_pb2.Duration(seconds=int(grace)))
        # The agent answers once the process has ended: SIGTERM, then SIGKILL after the grace.
        timeout = self.timeout + (grace if grace is not None else 30.0)
        agent = await self.stub(address)
        stopped: agent_pb2.Container = await agent.StopContainer(request, timeout=timeout)
        return stopped

    async def get(self, address: str, container_id: str) -> agent_pb2.Container:
        agent = await self.stub(address)
        container: agent_pb2.Container = await agent.GetContainer(
            agent_pb2.GetContainerRequest(container_id=container_id), timeout=self.timeout
        )
        return container

    async def sleep(
        self, address: str, container_id: str, idle_since: datetime
    ) -> agent_pb2.Container:
        """Put an idle container to sleep, unless its agent saw a request after idle_since."""
        request = agent_pb2.SleepContainerRequest(container_id=container_id)
        request.idle_since.FromDatetime(idle_since)
        grace = self.stop_grace
        if grace is not None:
            request.grace.CopyFrom(duration_pb2.Duration(seconds=int(grace)))
        timeout = self.timeout + (grace if grace is not None else 30.0)
        agent = await self.stub(address)
        asleep: agent_pb2.Container = await agent.SleepContainer(request, timeout=timeout)
        return asleep

    async def wake(self, address: str, container_id: str, within: float) -> agent_pb2.Container:
        """Wake a sleeping container; the agent answers once its app answers."""
        agent = await self.stub(address)
        awake: agent_pb2.Container = await agent.WakeContainer(
            agent_pb2.WakeContainerRequest(container_id=container_id), timeout=within
        )
        return awake

    async def list(self, address: str) -> list[agent_pb2.Container]:
        found: list[agent_pb2.Container] = []
        token = ""
        while True:
            agent = await self.stub(address)
            page = await agent.ListContainers(
                agent_pb2.ListContainersRequest(page_size=1000, page_token=token),
                timeout=self.timeout,
            )
            found += page.containers
            token = page.next_page_token
            if not token:
                return found

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
