"""The agent as a real `hangar serve agent` process: health and reflection on its port, apps
that do not inherit its secrets, and a SIGTERM that leaves no app process behind."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hangar.agent.v1 import agent_pb2 as pb
from tests.support.agent import alive, caller_tokens, process_tree, start_agent_process
from tests.support.identity import RunningIdentity, bearer, running_identity

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"
AGENT_SECRET = "agent-own-secret-never-for-apps"


@pytest.fixture(scope="module")
async def identity(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RunningIdentity]:
    async with running_identity(database_url, db_passwords) as running:
        yield running


async def test_sigterm_stops_every_app_and_leaves_no_process(
    identity: RunningIdentity, tmp_path: Path
) -> None:
    tokens = await caller_tokens(identity)
    auth = bearer(tokens["runtime"])
    agent = start_agent_process(identity.address, {"HANGAR_AGENT_SERVICE_SECRET": AGENT_SECRET})
    assert agent.process is not None
    try:
        listed = await asyncio.to_thread(
            subprocess.run,
            [GRPCURL, "-plaintext", agent.address, "list"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert "hangar.agent.v1.AgentService" in listed.stdout.split(), listed.stderr

        env_file = tmp_path / "app.env"
        commands = [
            'exec python3 -m http.server "$PORT"',
            # ignores SIGTERM: the agent's shutdown must SIGKILL it after its grace
            "trap '' TERM; python3 -m http.server \"$PORT\" & wait",
            f'env > {env_file}; sleep 600 & exec python3 -m http.server "$PORT"',
        ]
        pids: list[int] = []
        for index, command in enumerate(commands):
            request = pb.StartContainerRequest(
                container_id=f"c-{index}", command=command, env={"MY_SECRET": "app-secret"}
            )
            started = await agent.stub.StartContainer(request, metadata=auth)
            await agent.wait_for(
                request.container_id, (pb.CONTAINER_STATUS_RUNNING,), tokens["runtime"]
            )
            pids += process_tree(started.pid)
        assert len(pids) >= 5 and all(alive(pid) for pid in pids)

        app_env = env_file.read_text()
        assert "MY_SECRET=app-secret" in app_env
        assert AGENT_SECRET not in app_env and "HANGAR_" not in app_env

        agent.process.terminate()
        code = await asyncio.to_thread(agent.process.proc.wait, 15)
        assert code == 0
        assert [pid for pid in pids if alive(pid)] == []
    finally:
        await agent.close()
