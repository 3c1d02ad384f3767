"""Builds are tenant code: they run in the container sandbox with the deployment's limits and
a time limit, and see nothing of the host. The agent's own builder (services/agent/builds.py)
through the container driver, with its artifact cache holding the source already (so
nothing is fetched from runtime: the builds here fail before any slug is stored; the whole
path, runtime included, is tests/e2e/test_ship_source.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import secrets
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.agent.artifacts import RuntimeArtifacts
from services.agent.builds import BuildFailed
from services.agent.containers import ContainerDriver, unavailable_reason
from services.agent.domain import ContainerSpec, LogBuffer, LogStream
from shared.clients import Clients
from shared.resources import Resources

if os.geteuid() != 0:
    pytest.skip("builds need the container sandbox, which needs root", allow_module_level=True)


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[ContainerDriver]:
    why_not = unavailable_reason()
    assert why_not is None, f"make test installs what containers need: {why_not}"
    built = ContainerDriver(state_dir=tmp_path / "agent", build_timeout=8.0)
    clients = Clients({})  # never called: every source is in the agent's cache already
    built.builder.artifacts = RuntimeArtifacts(clients, tmp_path / "agent" / "artifacts")
    yield built
    await built.close()
    await clients.close()


def _node_app(build_script: str) -> bytes:
    """A Node.js app whose package.json `build` script is `build_script`."""
    package = {"name": "probe", "version": "1.0.0", "scripts": {"build": build_script}}
    files = {"package.json": json.dumps(package).encode(), "Procfile": b"web: node -v\n"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def _build(driver: ContainerDriver, archive: bytes, ram_mb: int = 256) -> tuple[str, str]:
    """(the failure's reason, the build's log) of a build expected to fail."""
    digest = hashlib.sha256(archive).hexdigest()
    cache = driver.builder.artifacts.directory  # type: ignore[union-attr]
    cache.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread((cache / digest).write_bytes, archive)
    spec = ContainerSpec(
        container_id=f"build-{secrets.token_hex(4)}",
        deployment_id="d",
        project_id=f"p-{secrets.token_hex(4)}",
        source_sha256=digest,
        resources=Resources(ram_mb, 500),
    )
    logs = LogBuffer(10_000)
    with pytest.raises(BuildFailed) as failed:
        await driver.builder.build(spec, logs)
    return failed.value.reason, logs.text(LogStream.BUILD)


pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/npm").exists(), reason="npm is not installed: these builds are Node's"
)


async def test_a_build_past_its_time_limit_is_stopped(driver: ContainerDriver) -> None:
    reason, log = await _build(driver, _node_app("echo started; sleep 600"))
    assert reason.startswith("BUILD_FAILED: the build took longer than 8 s"), reason
    assert "started" in log


async def test_a_build_over_its_memory_is_killed_by_the_kernel(driver: ContainerDriver) -> None:
    hog = 'node -e "const a = []; for (;;) a.push(Buffer.alloc(1 << 24, 1))"'
    reason, _ = await _build(driver, _node_app(hog), ram_mb=128)
    assert reason.startswith("BUILD_FAILED: the build exited with code"), reason


async def test_a_build_sees_its_own_app_and_cache_and_nothing_of_the_host(
    driver: ContainerDriver, tmp_path: Path
) -> None:
    (tmp_path / "agent" / "secret-of-the-host").write_text("no")
    probe = (
        "echo uid=$(id -u); echo cwd=$(pwd); ls / | tr '\\n' ' '; echo;"
        " test -e /etc/shadow && echo SHADOW-$((1 + 1));"
        " ls /cache >/dev/null && echo CACHE-$((2 + 2)); exit 3"
    )
    reason, log = await _build(driver, _node_app(probe))
    assert reason.startswith("BUILD_FAILED: the build exited with code"), reason
    uid = next(line for line in log.splitlines() if line.startswith("uid="))
    assert int(uid.removeprefix("uid=")) >= 2_000_000  # the project's own, never root
    lines = log.splitlines()  # npm echoes the script: what it printed are whole lines
    assert "cwd=/app" in lines and "CACHE-4" in lines
    assert "SHADOW-2" not in lines
    assert "secret-of-the-host" not in log and "agent" not in log.split("cwd=/app")[1]
