"""Start Hangar processes for tests: free loopback ports, wait for health, stop them all."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hangar_cli.cli import wait_healthy


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, for a process started later. Chosen below the
    kernel's ephemeral range: a port from that range may meanwhile become the local port of
    some outgoing connection (a database pool's), and the process's bind would then fail
    (seen in CI: a replica's metrics port). Never the same port twice in one test run."""
    low = max(1024, min(20_000, _EPHEMERAL_LOW - 2_000))
    for _ in range(1_000):
        port = random.randrange(low, _EPHEMERAL_LOW)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {low}-{_EPHEMERAL_LOW - 1}")


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


def stderr_file(name: str) -> Path:
    """A file for a child's stderr. Never a pipe nobody reads: once its ~64 KiB buffer fills,
    the child's next log line blocks its event loop (seen: runtime stopped answering)."""
    handle, path = tempfile.mkstemp(prefix=f"hangar-{name}-", suffix=".log")
    os.close(handle)
    return Path(path)


@dataclass
class ServiceProcess:
    name: str
    address: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(repr=False, default_factory=dict)
    log_path: Path | None = None

    @classmethod
    def start(
        cls, name: str, address: str, env: dict[str, str], timeout: float = 20
    ) -> ServiceProcess:
        log_path = stderr_file(name)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hangar_cli", "serve", name],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        started = cls(name, address, proc, env, log_path)
        if not wait_healthy(name, address, time.monotonic() + timeout):
            started.stop(keep_log=True)
            err = started.stderr_text()[-2000:]
            started.remove_log()
            raise RuntimeError(f"{name} did not become healthy: {err}")
        return started

    def stderr_text(self) -> str:
        """What the process wrote to stderr so far (its JSON log lines)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10, *, keep_log: bool = False) -> int:
        self.terminate()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if not keep_log:
            self.remove_log()
        return code

    def kill(self) -> None:
        """SIGKILL: no graceful anything (a crash, for recovery tests)."""
        self.proc.kill()
        self.proc.wait()
        self.remove_log()

    def remove_log(self) -> None:
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
