"""ProcessDriver on real processes: start-up and health, exit codes, SIGTERM then SIGKILL,
log capture, resource samples, and that nothing it started outlives it."""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import psutil
import pytest
import uvloop

from services.agent.domain import (
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    LogStream,
    RestartPolicy,
    SleepState,
)
from services.agent.drivers import ProcessDriver, inherited_env
from shared.errors import AlreadyExists, FailedPrecondition, NotFound
from tests.support.agent import alive, process_tree

HTTP_SERVER = 'exec python3 -m http.server "$PORT"'
# Listens on $PORT (healthy by TCP) and ignores SIGTERM: only SIGKILL ends it.
STUBBORN = (
    'exec python3 -c "import os, signal, socket, time; signal.signal(signal.SIGTERM, '
    "signal.SIG_IGN); s = socket.socket(); s.bind(('127.0.0.1', int(os.environ['PORT']))); "
    's.listen(); time.sleep(600)"'
)

# An HTTP server that ignores SIGTERM (SIGKILL after the grace ends it).
STUBBORN_BUT_SERVES = (
    'exec python3 -c "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); '
    "sys.argv = ['http.server', sys.argv[1]]; import runpy; "
    "runpy.run_module('http.server', run_name='__main__')\" \"$PORT\""
)


@pytest.fixture
async def driver() -> AsyncIterator[ProcessDriver]:
    driver = ProcessDriver(start_timeout=10, stop_grace=2, probe_interval=0.05)
    yield driver
    await driver.close()


def spec(command: str, **fields: object) -> ContainerSpec:
    return ContainerSpec(
        container_id=f"c-{secrets.token_hex(4)}",
        deployment_id="d-1",
        project_id="p-1",
        command=command,
        **fields,  # type: ignore[arg-type]
    )


async def settle(
    driver: ProcessDriver, container_id: str, *states: ContainerState, within: float = 15
) -> ContainerInfo:
    deadline = time.monotonic() + within
    while True:
        info = driver.inspect(container_id)
        assert info is not None
        if info.state in states:
            return info
        assert time.monotonic() < deadline, f"stuck: {info}"
        await asyncio.sleep(0.05)


async def test_http_server_becomes_running_and_answers_on_its_port(driver: ProcessDriver) -> None:
    started = await driver.start(spec(HTTP_SERVER))
    assert started.state is ContainerState.STARTING and started.pid > 0
    running = await settle(driver, started.container_id, ContainerState.RUNNING)
    async with httpx.AsyncClient(trust_env=False) as client:
        reply = await client.get(f"http://{running.address}/")
    assert reply.status_code == 200

    stopped = await driver.stop(started.container_id)
    assert stopped.state is ContainerState.STOPPED and stopped.reason == "stopped"
    assert stopped.exit_code is not None and stopped.ended_at is not None
    assert not psutil.pid_exists(started.pid)


async def test_health_path_must_answer_with_success(driver: ProcessDriver) -> None:
    driver.start_timeout = 1.5
    healthy = await driver.start(spec(HTTP_SERVER, health_check_path="/"))
    missing = await driver.start(spec(HTTP_SERVER, health_check_path="/healthz"))
    assert (await settle(driver, healthy.container_id, ContainerState.RUNNING)).pid
    failed = await settle(driver, missing.container_id, ContainerState.FAILED)
    assert "not healthy within" in failed.reason
    assert not alive(missing.pid)


async def test_command_that_exits_at_once_fails_with_its_exit_code(driver: ProcessDriver) -> None:
    started = await driver.start(spec("echo bye; exit 3"))
    failed = await settle(driver, started.container_id, ContainerState.FAILED)
    assert failed.exit_code == 3
    assert failed.reason == "exited with code 3 during start-up"
    logs = driver.logs(started.container_id)
    assert logs is not None and logs.text() == "bye"


async def test_app_that_ends_after_running_is_exited(driver: ProcessDriver) -> None:
    command = (
        'exec python3 -c "import os, socket, time; s = socket.socket(); '
        "s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen(); time.sleep(1)\""
    )
    started = await driver.start(spec(command))
    await settle(driver, started.container_id, ContainerState.RUNNING)
    ended = await settle(driver, started.container_id, ContainerState.EXITED)
    assert ended.exit_code == 0 and ended.reason == ""


async def test_command_that_cannot_run_fails(driver: ProcessDriver) -> None:
    started = await driver.start(spec("/no/such/program"))
    failed = await settle(driver, started.container_id, ContainerState.FAILED)
    assert failed.exit_code == 127


async def test_app_ignoring_sigterm_is_killed_after_the_grace_period(
    driver: ProcessDriver,
) -> None:
    started = await driver.start(spec(STUBBORN))
    await settle(driver, started.container_id, ContainerState.RUNNING)
    began = time.monotonic()
    stopped = await driver.stop(started.container_id, grace=0.5)
    took = time.monotonic() - began
    assert stopped.state is ContainerState.STOPPED
    assert stopped.exit_code == 137  # 128 + SIGKILL
    assert 0.5 <= took < 3, took
    assert not alive(started.pid)


async def test_stop_is_idempotent_and_concurrent_stops_agree(driver: ProcessDriver) -> None:
    started = await driver.start(spec(HTTP_SERVER))
    await settle(driver, started.container_id, ContainerState.RUNNING)
    first, second = await asyncio.gather(
        driver.stop(started.container_id), driver.stop(started.container_id)
    )
    again = await driver.stop(started.container_id)
    assert first == second == again
    assert again.state is ContainerState.STOPPED
    with pytest.raises(NotFound):
        await driver.stop("c-never-started")


async def test_start_is_idempotent_on_container_id(driver: ProcessDriver) -> None:
    request = spec(HTTP_SERVER)
    first, second = await asyncio.gather(driver.start(request), driver.start(request))
    assert first.pid == second.pid and first.port == second.port
    assert len(driver.list()) == 1
    with pytest.raises(AlreadyExists):
        await driver.start(
            ContainerSpec(container_id=request.container_id, deployment_id="d-2", command="true")
        )


async def test_images_are_refused_without_an_image_driver(driver: ProcessDriver) -> None:
    with pytest.raises(FailedPrecondition, match="no image driver"):
        await driver.start(ContainerSpec(container_id="c-image", image="nginx:latest"))


async def test_app_env_is_the_given_env_and_port_without_the_agents_own(
    driver: ProcessDriver,
) -> None:
    agent_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HANGAR_AGENT_SERVICE_SECRET": "x"}
    driver.base_env = inherited_env(agent_env)
    started = await driver.start(spec("env; exit 0", env={"MY_SECRET": "s3cret", "PORT": "1"}))
    await settle(driver, started.container_id, ContainerState.FAILED)
    logs = driver.logs(started.container_id)
    assert logs is not None
    seen = dict(line.split("=", 1) for line in logs.text().splitlines() if "=" in line)
    assert seen["MY_SECRET"] == "s3cret"
    # The agent's PORT wins: the app's private port, behind the proxy on the public one.
    assert seen["PORT"] == str(driver._containers[started.container_id].private_port)
    assert seen["PORT"] not in ("1", str(started.port))
    assert "HANGAR_AGENT_SERVICE_SECRET" not in seen


async def test_output_is_kept_line_by_line_newest_first_to_go(driver: ProcessDriver) -> None:
    driver.log_lines = 10
    driver.max_line_chars = 100
    command = (
        "seq 1 100; echo oops >&2; python3 -c \"print('x' * 1000 + 'END'); print('after')\"; exit 1"
    )
    started = await driver.start(spec(command))
    await settle(driver, started.container_id, ContainerState.FAILED)
    logs = driver.logs(started.container_id)
    assert logs is not None
    stdout = logs.text(LogStream.STDOUT).splitlines()
    assert stdout[-2:] == ["x" * 100, "after"]
    assert logs.text(LogStream.STDERR) == "oops"
    assert len(logs) == 10 and logs.last_sequence == 103
    assert logs.dropped == 93 and logs.trimmed == 1
    sequences = [line.sequence for line in logs.since(0)]
    assert sequences == list(range(94, 104))


async def test_samples_rss_and_cpu_time_of_the_process_tree(driver: ProcessDriver) -> None:
    burn = (
        'python3 -c "import time; end = time.time() + 0.5\nwhile time.time() < end: pass"; '
        + HTTP_SERVER
    )
    started = await driver.start(spec(burn))
    await settle(driver, started.container_id, ContainerState.RUNNING)
    sample = driver.sample(started.container_id)
    assert sample is not None
    assert sample.rss_bytes > 1_000_000
    assert sample.cpu_seconds >= 0.3  # the burner, reaped, counts through children_*
    running = driver.sample(started.container_id)
    await driver.stop(started.container_id)
    final = driver.sample(started.container_id)  # the reading taken as it ended
    assert final is not None and running is not None
    info = driver.inspect(started.container_id)
    assert info is not None and final.sampled_at == info.ended_at
    assert final.cpu_seconds >= running.cpu_seconds - 0.01  # the kernel's account at reaping
    assert final.rss_bytes > 1_000_000  # the peak
    assert final.rx_bytes == 0 and final.tx_bytes == 0  # nobody called it


async def test_a_short_lived_apps_cpu_is_read_when_it_is_reaped(driver: ProcessDriver) -> None:
    """An app that works and exits between two periodic samples: its CPU time is still
    known exactly (wait4's account of the process and the children it waited for)."""
    burn = 'python3 -c "import time; end = time.time() + 0.6\nwhile time.time() < end: pass"'
    started = await driver.start(spec(burn, health_check_path=""))
    ended = await settle(driver, started.container_id, ContainerState.EXITED, ContainerState.FAILED)
    final = driver.sample(started.container_id)
    assert final is not None and final.sampled_at == ended.ended_at
    assert 0.4 <= final.cpu_seconds < 5
    assert final.rss_bytes > 1_000_000
    assert final.rx_bytes == 0


async def test_close_stops_every_app_and_its_background_children() -> None:
    driver = ProcessDriver(start_timeout=10, stop_grace=0.5, probe_interval=0.05)
    pids: list[int] = []
    for command in (HTTP_SERVER, STUBBORN, 'sleep 600 & exec python3 -m http.server "$PORT"'):
        started = await driver.start(spec(command))
        await settle(driver, started.container_id, ContainerState.RUNNING)
        pids += process_tree(started.pid)
    assert len(pids) >= 4 and all(alive(pid) for pid in pids)
    await driver.close()
    assert not [pid for pid in pids if alive(pid)]
    assert {info.state for info in driver.list()} == {ContainerState.STOPPED}


def test_under_uvloop_output_is_captured_and_exits_are_seen() -> None:
    """`hangar serve agent` runs on uvloop: the driver must not depend on its child watcher."""

    async def scenario() -> tuple[ContainerInfo, str]:
        driver = ProcessDriver(start_timeout=10, stop_grace=1, probe_interval=0.05)
        try:
            started = await driver.start(spec('echo hello; exec python3 -m http.server "$PORT"'))
            await settle(driver, started.container_id, ContainerState.RUNNING)
            stopped = await driver.stop(started.container_id)
            logs = driver.logs(started.container_id)
            return stopped, logs.text(LogStream.STDOUT) if logs else ""
        finally:
            await driver.close()

    stopped, stdout = uvloop.run(scenario())
    assert stopped.state is ContainerState.STOPPED and not alive(stopped.pid)
    assert stdout.startswith("hello")


def test_under_uvloop_repeated_wakes_keep_each_runs_output_pipe() -> None:
    """uvloop leaves a pipe transport open at EOF: if the driver left it to the garbage
    collector, the descriptor was closed twice, the second time under a woken app's new
    output pipe, and the app died of SIGPIPE mid-request (a real failure, 3 runs in 3)."""

    async def scenario() -> list[int]:
        driver = ProcessDriver(start_timeout=10, stop_grace=1, probe_interval=0.02)
        limits = httpx.Limits(max_keepalive_connections=0)
        codes = []
        try:
            started = await driver.start(spec(HTTP_SERVER))
            running = await settle(driver, started.container_id, ContainerState.RUNNING)
            async with httpx.AsyncClient(trust_env=False, timeout=30, limits=limits) as client:
                for _ in range(12):
                    await asyncio.sleep(0.05)
                    await driver.sleep(started.container_id)
                    gc.collect()  # what a busy agent's collector does at any moment
                    for _ in range(2):  # the wake, then the app awake
                        codes.append((await client.get(f"http://{running.address}/")).status_code)
        finally:
            await driver.close()
        return codes

    assert uvloop.run(scenario()) == [200] * 24


async def test_without_pidfd_a_thread_sees_the_exit_and_the_group_is_killed(
    driver: ProcessDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "pidfd_open")
    started = await driver.start(spec("sleep 600 & echo $!; exit 5"))
    failed = await settle(driver, started.container_id, ContainerState.FAILED)
    assert failed.exit_code == 5
    logs = driver.logs(started.container_id)
    assert logs is not None
    assert not alive(int(logs.text()))  # the background child went with its leader


# ------------------------------------------------------------------------ sleep and wake


async def test_a_sleeping_app_is_woken_by_the_next_request_and_serves_it(
    driver: ProcessDriver,
) -> None:
    started = await driver.start(spec(HTTP_SERVER))
    running = await settle(driver, started.container_id, ContainerState.RUNNING)
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"http://{running.address}/")).status_code == 200
    await asyncio.sleep(0.1)  # the client's kept-alive connection is closed
    asleep = await driver.sleep(started.container_id)
    assert asleep.sleep is SleepState.SLEEPING and asleep.pid == 0
    assert asleep.state is ContainerState.RUNNING  # still deployed: capacity held
    assert not alive(started.pid)
    final = driver.sample(started.container_id)  # the first run's last reading
    assert final is not None and final.rss_bytes > 1_000_000
    assert (await driver.sleep(started.container_id)).sleep is SleepState.SLEEPING  # no-op

    # The public port still listens; this request starts the app and is served by it.
    async with httpx.AsyncClient(trust_env=False) as client:
        reply = await client.get(f"http://{running.address}/", timeout=30)
    assert reply.status_code == 200
    awake = driver.inspect(started.container_id)
    assert awake is not None and awake.sleep is SleepState.AWAKE
    assert awake.run == 2 and awake.pid not in (0, started.pid) and alive(awake.pid)
    assert awake.last_request_at is not None
    stopped = await driver.stop(started.container_id)
    assert stopped.state is ContainerState.STOPPED and not alive(awake.pid)


async def test_requests_arriving_together_share_one_wake(driver: ProcessDriver) -> None:
    started = await driver.start(spec(HTTP_SERVER))
    running = await settle(driver, started.container_id, ContainerState.RUNNING)
    await driver.sleep(started.container_id)
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        replies = await asyncio.gather(
            *(client.get(f"http://{running.address}/") for _ in range(8))
        )
    assert [r.status_code for r in replies] == [200] * 8
    awake = driver.inspect(started.container_id)
    assert awake is not None and awake.run == 2  # one start for all of them


async def test_sleep_is_refused_while_a_client_is_connected_or_came_after_idle_since(
    driver: ProcessDriver,
) -> None:
    started = await driver.start(spec(HTTP_SERVER))
    running = await settle(driver, started.container_id, ContainerState.RUNNING)
    before = datetime.now(UTC)
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"http://{running.address}/")).status_code == 200
    with pytest.raises(FailedPrecondition) as refused:  # runtime's view is older than that
        await driver.sleep(started.container_id, idle_since=before)
    assert refused.value.reason == "NOT_IDLE"
    host, port = running.address.rsplit(":", 1)
    _reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await asyncio.sleep(0.1)
        with pytest.raises(FailedPrecondition):  # a client is connected now
            await driver.sleep(started.container_id)
    finally:
        writer.close()
    await asyncio.sleep(0.1)
    info = driver.inspect(started.container_id)
    assert info is not None and info.sleep is SleepState.AWAKE and alive(info.pid)
    asleep = await driver.sleep(started.container_id, idle_since=info.last_request_at)
    assert asleep.sleep is SleepState.SLEEPING


async def test_a_sleeping_container_stops_and_its_port_closes(driver: ProcessDriver) -> None:
    started = await driver.start(spec(HTTP_SERVER))
    running = await settle(driver, started.container_id, ContainerState.RUNNING)
    await driver.sleep(started.container_id)
    stopped = await driver.stop(started.container_id)
    assert stopped.state is ContainerState.STOPPED and stopped.reason == "stopped"
    host, port = running.address.rsplit(":", 1)
    with pytest.raises(OSError):
        await asyncio.open_connection(host, int(port))
    with pytest.raises(FailedPrecondition):
        await driver.sleep(started.container_id)


async def test_an_app_listening_beyond_loopback_is_told_in_its_logs(driver: ProcessDriver) -> None:
    """Sharing the host's network, such an app can be reached around the counting proxy;
    the agent says so in the app's own logs (one bound to 127.0.0.1 hears nothing)."""
    everywhere = await driver.start(spec(HTTP_SERVER))  # http.server binds every interface
    private = await driver.start(spec('exec python3 -m http.server --bind 127.0.0.1 "$PORT"'))
    for started in (everywhere, private):
        await settle(driver, started.container_id, ContainerState.RUNNING)

    def notices(container_id: str) -> list[str]:
        logs = driver.logs(container_id)
        assert logs is not None
        return [line.text for line in logs.since(0) if line.text.startswith("[hangar agent]")]

    (notice,) = notices(everywhere.container_id)
    assert "beyond 127.0.0.1" in notice and everywhere.address in notice
    assert notices(private.container_id) == []


async def test_a_request_during_the_going_to_sleep_waits_and_wakes_the_app(
    driver: ProcessDriver,
) -> None:
    """Sleep and a request race: the request waits for the app to finish stopping, then
    starts it again and is served; two sleeps at once stop it once."""
    started = await driver.start(spec(STUBBORN_BUT_SERVES))
    running = await settle(driver, started.container_id, ContainerState.RUNNING)
    sleeps = [asyncio.create_task(driver.sleep(started.container_id, grace=1)) for _ in range(2)]
    await asyncio.sleep(0.2)  # SIGTERM is ignored: the app is stopping for a second
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        reply = await client.get(f"http://{running.address}/")
    assert reply.status_code == 200
    slept = await asyncio.gather(*sleeps)
    assert {info.sleep for info in slept} == {SleepState.SLEEPING}
    awake = driver.inspect(started.container_id)
    assert awake is not None and awake.sleep is SleepState.AWAKE and awake.run == 2
    assert alive(awake.pid) and not alive(started.pid)


async def test_an_app_that_fails_to_start_again_ends_the_container_and_its_client_is_cut(
    driver: ProcessDriver,
) -> None:
    """Its working directory survives the sleep (the marker is there), so the second start
    exits 3: the waiting connection is closed and the container ends with that code (with
    restart policy never; under on-failure the agent would start it again after a back-off,
    see test_agent_restart.py)."""
    command = f"if [ -f slept ]; then echo refusing >&2; exit 3; fi; touch slept; {HTTP_SERVER}"
    started = await driver.start(spec(command, restart_policy=RestartPolicy.NEVER))
    running = await settle(driver, started.container_id, ContainerState.RUNNING)
    await driver.sleep(started.container_id)
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        with pytest.raises(httpx.HTTPError):
            await client.get(f"http://{running.address}/")
    ended = await settle(driver, started.container_id, ContainerState.FAILED)
    assert ended.exit_code == 3 and ended.reason == "exited with code 3 while waking from sleep"
    assert ended.run == 2
    logs = driver.logs(started.container_id)
    assert logs is not None and "refusing" in [line.text for line in logs.since(0)]
