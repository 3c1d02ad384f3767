"""Start Hangar processes for tests: free loopback ports, wait for health, stop them all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.cli import wait_healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(
    database_url: str,
    db_passwords: Mapping[str, str],
    addresses: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url
    for svc, password in db_passwords.items():
        env[f"HANGAR_{svc.upper()}_DB_PASSWORD"] = password
    for name, address in addresses.items():
        env[f"HANGAR_{name.upper()}_ADDR"] = address
    env.setdefault("HANGAR_GRACE_SECONDS", "2")
    env.setdefault("HANGAR_LOG_LEVEL", "WARNING")
    env.update(extra or {})
    return env


@dataclass
class ServiceProcess:
    name: str
    address: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @classmethod
    def start(
        cls, name: str, address: str, env: dict[str, str], timeout: float = 20
    ) -> ServiceProcess:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "serve", name],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        started = cls(name, address, proc, env)
        if not wait_healthy(name, address, time.monotonic() + timeout):
            started.stop()
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"{name} did not become healthy: {err[-2000:]}")
        return started

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10) -> int:
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
