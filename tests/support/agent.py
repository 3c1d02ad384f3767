"""The agent for tests: in this process on a free port, or as a real `hangar serve agent`
process; both verify tokens with the keys of the identity they are pointed at."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import psutil

from hangar.agent.v1 import agent_pb2 as pb
from hangar.agent.v1 import agent_pb2_grpc
from services.agent.drivers import ProcessDriver
from services.agent.server import AgentApp
from shared.server import RunningServer, start_server
from shared.settings import Settings
from tests.support.identity import RunningIdentity
from tests.support.procs import ServiceProcess, free_port

ENDED = (pb.CONTAINER_STATUS_EXITED, pb.CONTAINER_STATUS_FAILED)


def agent_settings(identity_address: str, **overrides: Any) -> Settings:
    """An agent's settings, with a state directory of its own (several agents share the
    machine in tests; each clears what its directory's earlier agent left)."""
    base = Settings.from_env("agent")
    settings = replace(
        base,
        addresses={**base.addresses, "identity": identity_address},
        agent_state_dir=tempfile.mkdtemp(prefix="hangar-agent-"),
    )
    return replace(settings, **overrides)


@dataclass
class RunningAgent:
    address: str
    app: AgentApp | None = None
    server: RunningServer | None = None
    process: ServiceProcess | None = None
    state_dir: str = ""  # removed at close
    _channel: grpc.aio.Channel | None = field(default=None, repr=False)

    @property
    def stub(self) -> agent_pb2_grpc.AgentServiceStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        return agent_pb2_grpc.AgentServiceStub(self._channel)

    async def wait_for(
        self,
        container_id: str,
        statuses: tuple[int, ...],
        token: str,
        within: float = 15.0,
    ) -> pb.Container:
        """Poll GetContainer until the container reaches one of `statuses`."""
        deadline = time.monotonic() + within
        metadata = (("authorization", f"Bearer {token}"),)
        while True:
            container = await self.stub.GetContainer(
                pb.GetContainerRequest(container_id=container_id), metadata=metadata
            )
            if container.status in statuses:
                return container
            if time.monotonic() > deadline:
                raise AssertionError(f"{container_id} stuck in {container}")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self.server is not None:
            await self.server.stop()
        if self.process is not None:  # off the loop: servers of this test keep answering
            await asyncio.to_thread(self.process.stop)
        if self.state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)


@asynccontextmanager
async def running_agent(
    identity_address: str, *, driver: ProcessDriver | None = None
) -> AsyncIterator[RunningAgent]:
    """The agent in this process on a free loopback port; closing it stops its apps."""
    settings = agent_settings(identity_address)
    app = AgentApp(settings, driver=driver)
    server = await start_server(app, "127.0.0.1:0", grace=0.5)
    running = RunningAgent(
        f"127.0.0.1:{server.port}", app=app, server=server, state_dir=settings.agent_state_dir
    )
    try:
        yield running
    finally:
        await running.close()


def start_agent_process(
    identity_address: str,
    extra: Mapping[str, str] | None = None,
    address: str = "",
    state_dir: str = "",
) -> RunningAgent:
    """`hangar serve agent` as a real process (on a free port unless `address` is given),
    with a state directory of its own unless `state_dir` names an earlier agent's."""
    address = address or f"127.0.0.1:{free_port()}"
    state_dir = state_dir or tempfile.mkdtemp(prefix="hangar-agent-")
    env = dict(os.environ)
    env.update(
        {
            "HANGAR_AGENT_ADDR": address,
            "HANGAR_IDENTITY_ADDR": identity_address,
            "HANGAR_GRACE_SECONDS": "1",
            "HANGAR_AGENT_STOP_GRACE_SECONDS": "1",
            "HANGAR_LOG_LEVEL": "WARNING",
            "HANGAR_AGENT_STATE_DIR": state_dir,
        }
    )
    env.update(extra or {})
    return RunningAgent(
        address, process=ServiceProcess.start("agent", address, env), state_dir=state_dir
    )


async def caller_tokens(identity: RunningIdentity) -> dict[str, str]:
    """Tokens the agent must tell apart: runtime's, another service's, a user's."""
    user = await identity.sign_up()
    return {
        "runtime": await identity.service_token("runtime"),
        "project": await identity.service_token("project"),
        "user": user.access_token,
    }


def alive(pid: int) -> bool:
    """A process that still runs (a zombie waiting for a reaper does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process_tree(pid: int) -> list[int]:
    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []
