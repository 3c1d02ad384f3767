"""`hangar up` (what `make run` calls) as a user runs it: everything healthy, Ctrl-C stops it
all, the next run reuses the data, and a taken port fails fast with nothing left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.cli import PROCESSES, wait_healthy
from tests.support.procs import free_port

pytestmark = pytest.mark.slow


def _env(home: Path) -> tuple[dict[str, str], dict[str, str]]:
    addresses = {name: f"127.0.0.1:{free_port()}" for name in (*PROCESSES, "agent")}
    env = dict(os.environ)
    env["HANGAR_HOME"] = str(home)
    env["HANGAR_GRACE_SECONDS"] = "2"
    env["HANGAR_LOG_LEVEL"] = "WARNING"
    for name, address in addresses.items():
        env[f"HANGAR_{name.upper()}_ADDR"] = address
    return env, addresses


def _start(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_banner(proc: subprocess.Popen[str], timeout: float = 90) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("  gateway"):
            return lines
    proc.kill()
    raise AssertionError(f"no banner: {lines} {proc.stderr.read() if proc.stderr else ''}")


def _port_free(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def test_up_serves_everything_stops_on_ctrl_c_and_reuses_data(tmp_path: Path) -> None:
    env, addresses = _env(tmp_path / "home")
    for attempt in range(2):
        proc = _start(env)
        banner = "".join(_wait_for_banner(proc))
        assert "DATABASE_URL" in banner
        for name in PROCESSES:
            assert addresses[name] in banner
            assert wait_healthy(name, addresses[name], time.monotonic() + 5), name
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        for name in PROCESSES:
            assert _port_free(addresses[name]), f"{name} still listening after Ctrl-C"
        if attempt == 0:
            credentials = (tmp_path / "home" / "credentials.json").read_text()
            assert (tmp_path / "home" / "pgdata" / "PG_VERSION").exists() or os.environ.get(
                "DATABASE_URL"
            )
    # The second run kept the same generated credentials (and so the same roles and data).
    assert (tmp_path / "home" / "credentials.json").read_text() == credentials


def test_taken_port_fails_in_one_line_and_starts_nothing(tmp_path: Path) -> None:
    env, addresses = _env(tmp_path / "home")
    host, _, port = addresses["billing"].rpartition(":")
    with socket.socket() as blocker:
        blocker.bind((host, int(port)))
        blocker.listen()
        proc = _start(env)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert err.strip().count("\n") == 0 and "already in use" in err
    assert not (tmp_path / "home" / "pgdata").exists()
    for name in PROCESSES:
        if name != "billing":
            assert _port_free(addresses[name])


def test_unreachable_database_fails_in_one_line(tmp_path: Path) -> None:
    env, addresses = _env(tmp_path / "home")
    env["DATABASE_URL"] = f"postgresql://nobody:secret@127.0.0.1:{free_port()}/hangar"
    proc = _start(env)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert err.strip().count("\n") == 0 and "PostgreSQL is not available" in err
    assert "secret" not in err
    for name in PROCESSES:
        assert _port_free(addresses[name])
