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
from services.agent.containers import netns_prefix, unavailable_reason
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


@pytest.mark.parametrize("driver", ["process", "container"])
async def test_sigterm_stops_every_app_and_leaves_no_process(
    identity: RunningIdentity, tmp_path: Path, driver: str
) -> None:
    if driver == "container" and unavailable_reason() is not None:
        pytest.skip(f"containers cannot run here: {unavailable_reason()}")
    tokens = await caller_tokens(identity)
    auth = bearer(tokens["runtime"])
    agent = start_agent_process(
        identity.address,
        {"HANGAR_AGENT_SERVICE_SECRET": AGENT_SECRET, "HANGAR_AGENT_DRIVER": driver},
    )
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
            # a container cannot write the host's files: it prints its environment
            f"env | tee {env_file if driver == 'process' else '/dev/null'}; sleep 600 & "
            'exec python3 -m http.server "$PORT"',
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

        if driver == "process":
            app_env = env_file.read_text()
            assert "MY_SECRET=app-secret" in app_env
            assert AGENT_SECRET not in app_env
            assert not [
                line for line in app_env.splitlines() if "SECRET=" in line and "MY_" not in line
            ]
        prefix = netns_prefix(agent.state_dir)
        namespaces = await asyncio.to_thread(_namespaces, prefix)
        assert len(namespaces) == (3 if driver == "container" else 0)

        agent.process.terminate()
        code = await asyncio.to_thread(agent.process.proc.wait, 15)
        assert code == 0
        assert [pid for pid in pids if alive(pid)] == []
        assert await asyncio.to_thread(_namespaces, prefix) == []  # each container's went
    finally:
        await agent.close()


def _namespaces(prefix: str) -> list[str]:
    return sorted(p.name for p in Path("/run/netns").glob(f"{prefix}*"))
