"""Each service as a real process: reflection and health seen by the real grpcurl, the
standard health check, and a clean SIGTERM, also with a WatchEvents stream open.
(UNIMPLEMENTED for unbuilt RPCs: test_grpc_plumbing.)"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hangar.events.v1 import events_pb2
from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
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


def test_sigterm_ends_open_watch_streams_instead_of_waiting_out_the_grace(
    database_url: str, db_passwords: dict[str, str]
) -> None:
    """A consumer's WatchEvents stream never ends by itself; shutdown ends it (UNAVAILABLE,
    so the consumer reconnects) rather than letting it hold the process for the whole grace."""
    grace = 5.0
    secret = secrets.token_urlsafe(16)
    address = f"127.0.0.1:{free_port()}"
    env = service_env(
        database_url,
        db_passwords,
        {"identity": address},
        {"HANGAR_GRACE_SECONDS": str(grace), "HANGAR_PROJECT_SERVICE_SECRET": secret},
    )
    proc = ServiceProcess.start("identity", address, env)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            token = stub.IssueServiceToken(
                identity_pb2.IssueServiceTokenRequest(service="project", secret=secret),
                timeout=10,
            ).token
            stream = stub.WatchEvents(
                events_pb2.WatchEventsRequest(types=["no.such.event"]),
                metadata=[("authorization", f"Bearer {token}")],
            )
            # The stream is open: nothing to send yet, so a short wait for its first event
            # times out on the client while the server keeps it.
            with pytest.raises(grpc.RpcError) as idle:
                next(
                    stub.WatchEvents(
                        events_pb2.WatchEventsRequest(types=["no.such.event"]),
                        metadata=[("authorization", f"Bearer {token}")],
                        timeout=0.5,
                    )
                )
            assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            signalled = time.monotonic()
            proc.terminate()
            with pytest.raises(grpc.RpcError) as ended:
                next(stream)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
            code = proc.proc.wait(timeout=grace + 5)
            took = time.monotonic() - signalled
        assert code == 0, proc.stderr_text()[-4000:]
        assert took < 3.0, f"exited {took:.1f}s after SIGTERM (grace {grace}s)"
    finally:
        proc.stop()
