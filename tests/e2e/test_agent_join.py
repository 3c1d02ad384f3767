"""A new machine's agent enrolled with a one-time token, all of it real processes: the whole
platform over mutual TLS (start_stack(tls=True), runtime with the agent CA `hangar up` makes
and an enrolment address), a platform admin's `hangar servers join-token`, `hangar agent
join` on the "new machine", then `hangar serve agent` with only the files it wrote: its
heartbeats reach runtime as the server the token was made for. `hangar servers
revoke-agent` then cuts it off (runtime refuses its calls; the server goes down)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hangar_cli.cli import wait_healthy
from shared.tls import KEY_FILE
from tests.support.procs import free_port
from tests.support.stack import Stack, module_stack, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(
    create_database: Callable[[str], str],
    db_passwords: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    enrolment = f"127.0.0.1:{free_port()}"
    with module_stack(
        create_database,
        db_passwords,
        tmp_path_factory.mktemp("join-stack"),
        tls=True,
        extra_env={
            "HANGAR_RUNTIME_ENROLMENT_ADDR": enrolment,
            # A revoked agent's silence takes the server down quickly.
            "HANGAR_RUNTIME_HEARTBEAT_TIMEOUT_SECONDS": "3",
        },
    ) as running:
        yield running


def _hangar(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HANGAR_URL": stack.url, "HANGAR_TOKEN": stack.admin_token}
    env.pop("HANGAR_TLS_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "hangar_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _server(stack: Stack, server_id: str) -> dict[str, object]:
    with stack.client() as http:
        reply = http.get(
            f"/v1/servers/{server_id}", headers={"Authorization": f"Bearer {stack.admin_token}"}
        )
    assert reply.status_code == 200, reply.text
    found: dict[str, object] = reply.json()
    return found


def test_an_agent_enrolled_with_a_join_token_reaches_runtime(stack: Stack, tmp_path: Path) -> None:
    agent_address = f"127.0.0.1:{free_port()}"
    name = f"joined-{secrets.token_hex(4)}"
    with stack.client() as http:
        made = http.post(
            "/v1/servers",
            headers={"Authorization": f"Bearer {stack.admin_token}"},
            json={
                "name": name,
                "region": "elsewhere",
                "agentAddress": agent_address,
                "capacity": {"ramMb": 1024, "cpuMillis": 1000},
            },
        )
    assert made.status_code == 200, made.text
    server_id = made.json()["id"]

    created = _hangar(stack, "servers", "join-token", name, "--ttl-minutes", "10", "--json")
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    directory = tmp_path / "agent-tls"
    enrolment = stack.env["HANGAR_RUNTIME_ENROLMENT_ADDR"]
    joined = _hangar(stack, "agent", "join", token, "--runtime", enrolment, "--dir", str(directory))
    assert joined.returncode == 0, joined.stderr
    assert server_id in joined.stdout
    assert (directory / KEY_FILE).stat().st_mode & 0o777 == 0o600
    again = _hangar(stack, "agent", "join", token, "--runtime", enrolment, "--dir", str(tmp_path))
    assert again.returncode == 3 and "used already" in again.stderr  # spent

    # The new machine's agent: its own files only, no server name (its certificate says).
    env = {k: v for k, v in stack.env.items() if not k.startswith("HANGAR_TLS")}
    env.pop("HANGAR_AGENT_SERVER", None)
    env.update(
        {
            "HANGAR_TLS_DIR": str(directory),
            "HANGAR_AGENT_ADDR": agent_address,
            "HANGAR_AGENT_DRIVER": "process",
            "HANGAR_AGENT_STATE_DIR": str(tmp_path / "state"),
        }
    )
    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen(
        [sys.executable, "-m", "hangar_cli", "serve", "agent"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        assert wait_healthy("agent", agent_address, time.monotonic() + 30, stack.client_tls)
        beat = wait_for(
            lambda: _server(stack, server_id).get("lastHeartbeatAt"), "the joined agent's beat"
        )
        assert beat

        revoked = _hangar(stack, "servers", "revoke-agent", name)
        assert revoked.returncode == 0, revoked.stderr
        # Runtime refuses its heartbeats now: the server falls silent, then down.
        wait_for(
            lambda: _server(stack, server_id).get("status") == "SERVER_STATUS_DOWN",
            "the revoked agent's server to go down",
            within=30,
        )
        assert agent.poll() is None  # refused, not crashed
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        log.close()
