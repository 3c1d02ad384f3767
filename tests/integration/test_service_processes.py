"""Each service as a real process: reflection and health seen by the real grpcurl, the
standard health check, and a clean SIGTERM. (UNIMPLEMENTED for unbuilt RPCs: test_grpc_plumbing.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.settings import SERVICES
from tests.support.procs import ServiceProcess, free_port, service_env

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"
GRACE_SECONDS = 2.0


@pytest.fixture(scope="module")
def processes(
    database_url: str, db_passwords: dict[str, str]
) -> Iterator[dict[str, ServiceProcess]]:
    addresses = {svc: f"127.0.0.1:{free_port()}" for svc in SERVICES}
    env = service_env(
        database_url, db_passwords, addresses, {"HANGAR_GRACE_SECONDS": str(GRACE_SECONDS)}
    )
    started: dict[str, ServiceProcess] = {}
    try:
        for svc in SERVICES:
            started[svc] = ServiceProcess.start(svc, addresses[svc], env)
        yield started
    finally:
        for proc in started.values():
            proc.stop()


def grpcurl(*args: str) -> str:
    result = subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("svc", SERVICES)
def test_grpcurl_lists_service_reflection_and_health(
    processes: dict[str, ServiceProcess], svc: str
) -> None:
    listed = grpcurl(processes[svc].address, "list").split()
    assert f"hangar.{svc}.v1.{svc.capitalize()}Service" in listed
    assert "grpc.health.v1.Health" in listed
    assert "grpc.reflection.v1alpha.ServerReflection" in listed


@pytest.mark.parametrize("svc", SERVICES)
def test_health_check_answers_serving(processes: dict[str, ServiceProcess], svc: str) -> None:
    reply = json.loads(grpcurl(processes[svc].address, "grpc.health.v1.Health/Check"))
    assert reply["status"] == "SERVING"
    with grpc.insecure_channel(processes[svc].address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        named = stub.Check(
            health_pb2.HealthCheckRequest(service=f"hangar.{svc}.v1.{svc.capitalize()}Service"),
            timeout=5,
        )
        assert named.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("svc", SERVICES)
def test_sigterm_exits_within_grace(processes: dict[str, ServiceProcess], svc: str) -> None:
    proc = processes[svc]
    proc.terminate()
    # Idle servers drain at once; the grace period (plus process start-up slack) bounds it.
    try:
        code = proc.proc.wait(timeout=GRACE_SECONDS + 2)
    except subprocess.TimeoutExpired:
        proc.proc.kill()
        proc.proc.wait()
        code = None
    stderr = proc.stderr_text()
    assert code == 0, f"exit {code}; stderr:\n{stderr[-4000:]}"
