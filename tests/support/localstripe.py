"""A localstripe (stateful fake Stripe, PyPI) on a free loopback port, for the real SDK."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import free_port

API_KEY = "sk_test_hangar"


def _binary() -> list[str]:
    script = Path(sys.executable).parent / "localstripe"
    if script.exists():
        return [str(script)]
    found = shutil.which("localstripe")
    if found:
        return [found]
    return [sys.executable, "-m", "localstripe"]


def _wait_listening(
    port: int, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = log_path.read_text(errors="replace")
            raise RuntimeError(f"localstripe exited: {err[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("localstripe did not start listening")


@pytest.fixture(scope="session")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a running localstripe, started empty (--from-scratch: it otherwise
    reloads /tmp/localstripe.pickle, the one file every localstripe on the host writes)."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("localstripe")
    log_path = workdir / "stderr.log"  # a file, not a pipe: an unread pipe fills and blocks it
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*_binary(), "--port", str(port), "--from-scratch"],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        _wait_listening(port, proc, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
