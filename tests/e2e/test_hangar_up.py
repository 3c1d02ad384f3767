"""`hangar up` (what `make run` calls) as a user runs it: everything healthy, Ctrl-C stops it
all, the next run reuses the data, a taken port fails fast with nothing left behind, a start
logs no error, and a service that dies is restarted while the rest keep serving."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from hangar_cli.cli import METRICS_PORTS, PROCESSES, supervisor_tls, wait_healthy
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
    env["HANGAR_EDGE_HTTPS_PORT"] = str(free_port())
    env["HANGAR_EDGE_ADMIN_ADDRESS"] = f"127.0.0.1:{free_port()}"
    for name in METRICS_PORTS:  # never the defaults: a `make run` may hold them
        env[f"HANGAR_{name.upper()}_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
    return env, addresses


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _nothing_left_running() -> Iterator[None]:
    """Whatever a test started is stopped after it, even when an assertion failed midway: a
    `hangar up` left behind would keep every service (and Caddy) running."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # it stops what it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill_tree(proc)


def _start(env: dict[str, str], stderr: Path | None = None) -> subprocess.Popen[str]:
    """`hangar up`; its stderr (with every service's log lines) to a file when given: a pipe
    nobody reads would block the services once full."""
    command = [sys.executable, "-m", "hangar_cli", "up"]
    if stderr is None:
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    else:
        with stderr.open("w") as err:
            proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    _STARTED.append(proc)
    return proc


def _wait_for_banner(proc: subprocess.Popen[str], timeout: float = 90) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("  apps"):  # the banner's last line
            return lines
    _kill_tree(proc)
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
        assert "DATABASE_URL" in banner and "mutual TLS between every process" in banner
        tls = supervisor_tls(tmp_path / "home")  # every gRPC process takes mutual TLS only
        for name in PROCESSES:
            assert addresses[name] in banner
            assert wait_healthy(name, addresses[name], time.monotonic() + 5, tls), name
        assert not wait_healthy("identity", addresses["identity"], time.monotonic() + 1)
        families = {"gateway": "http_requests_total", "edge": "edge_route_applies_total"}
        for name in METRICS_PORTS:  # every process serves its metrics
            metrics = env[f"HANGAR_{name.upper()}_METRICS_ADDR"]
            assert f"{name} http://{metrics}/metrics" in banner
            scraped = httpx.get(f"http://{metrics}/metrics", timeout=10)
            family = families.get(name, "grpc_server_handled_total")
            assert scraped.status_code == 200 and f"# TYPE {family}" in scraped.text, name
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


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        return proc.wait()


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL `hangar up` and everything it started (its services would outlive it)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.kill()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue
    proc.wait()


def _service_pid(up: subprocess.Popen[str], name: str) -> int | None:
    """The pid of `hangar serve NAME` started by this `hangar up`, if one is running."""
    for child in psutil.Process(up.pid).children():
        try:
            if child.cmdline()[-2:] == ["serve", name] and child.status() != "zombie":
                return int(child.pid)
        except psutil.NoSuchProcess:
            continue
    return None


def test_three_starts_and_stops_log_no_error(tmp_path: Path) -> None:
    """Each service starts once what it calls answers its health check, so no first pass of
    a background loop meets a dependency that is not up yet; each stops without complaint.
    Three times on the same home: the first run creates everything, the next ones reuse it."""
    env, _ = _env(tmp_path / "home")
    for run in range(3):
        log = tmp_path / f"up-{run}.log"
        proc = _start(env, stderr=log)
        try:
            banner = "".join(_wait_for_banner(proc))
            time.sleep(3)  # the loops' first passes (reconcilers, consumers, heartbeats) ran
        finally:
            assert _stop(proc) == 0
        output = banner + log.read_text()
        assert "Traceback" not in output, f"run {run + 1}: {output}"
        errors = [
            line for line in output.splitlines() if "ERROR" in line or '"level": "error"' in line
        ]
        assert not errors, f"run {run + 1}: {output}"


def test_a_killed_service_is_restarted_while_the_rest_keep_serving(tmp_path: Path) -> None:
    env, addresses = _env(tmp_path / "home")
    log = tmp_path / "up.log"
    proc = _start(env, stderr=log)
    answers: list[int | str] = []
    done = threading.Event()

    def poll_gateway() -> None:
        with httpx.Client(base_url=f"http://{addresses['gateway']}", timeout=5) as client:
            while not done.is_set():
                try:
                    answers.append(client.get("/healthz").status_code)
                except httpx.HTTPError as exc:
                    answers.append(repr(exc))
                done.wait(0.1)

    poller = threading.Thread(target=poll_gateway)
    try:
        _wait_for_banner(proc)
        gateway_pid = _service_pid(proc, "gateway")
        old_pid = _service_pid(proc, "runtime")
        assert gateway_pid is not None and old_pid is not None
        poller.start()
        os.kill(old_pid, signal.SIGKILL)

        deadline = time.monotonic() + 30
        new_pid = None
        while new_pid in (None, old_pid) and time.monotonic() < deadline:
            new_pid = _service_pid(proc, "runtime")
            time.sleep(0.1)
        assert new_pid not in (None, old_pid), log.read_text()[-4000:]
        tls = supervisor_tls(tmp_path / "home")
        assert wait_healthy("runtime", addresses["runtime"], deadline, tls), log.read_text()[-4000:]
        # The gateway sees runtime again (it said "degraded" meanwhile, but it answered).
        assert wait_healthy("gateway", addresses["gateway"], deadline)
        done.set()
        poller.join()

        assert proc.poll() is None, "hangar up stopped"
        assert _service_pid(proc, "gateway") == gateway_pid
        for name in PROCESSES:
            assert wait_healthy(name, addresses[name], time.monotonic() + 5, tls), name
        assert answers and all(a in (200, 503) for a in answers), answers
        assert "runtime was killed by SIGKILL" in log.read_text()
    finally:
        done.set()
        if poller.is_alive():
            poller.join()
        assert _stop(proc) == 0
    for name in PROCESSES:
        assert _port_free(addresses[name]), f"{name} still listening after Ctrl-C"
