"""Restarts and liveness in the agent, on real apps with both drivers (plain processes, and
runc containers where they can run): an app that ends on its own after it was healthy is
started again on the same public port after a growing back-off, per its restart policy;
quick crashes in a row make a crash loop; a failed liveness check restarts it; a stop during
the back-off ends it at once.

The app is a small HTTP server (its code in its environment, which both drivers hand to it)
whose paths make it crash, exit, write a file in its working directory or read it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import httpx
import pytest

from services.agent.containers import ContainerDriver, unavailable_reason
from services.agent.domain import (
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    LivenessCheck,
    RestartPolicy,
)
from services.agent.drivers import ProcessDriver
from services.agent.restarts import RestartRules
from shared.resources import Resources

APP = r"""
import http.server, os, sys
EXIT = int(os.environ.get("EXIT_CODE", "1"))
MODE = os.environ.get("MODE", "")

class App(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/live":
            return self.answer(500 if MODE == "sick" else 200, b"live")
        if self.path.startswith("/write/"):
            with open("state.txt", "w") as f:
                f.write(self.path.removeprefix("/write/"))
            return self.answer(200, b"written")
        if self.path == "/state":
            try:
                with open("state.txt") as f:
                    return self.answer(200, f.read().encode())
            except OSError:
                return self.answer(200, b"none")
        if self.path == "/hog":
            hog = bytearray(512 << 20)
            return self.answer(200, bytes(hog[:1]))
        self.answer(200, b"ok")
        if self.path == "/crash" or (self.path == "/healthz" and MODE == "crash-when-healthy"):
            print(f"crashing with code {EXIT}", file=sys.stderr, flush=True)
            os._exit(EXIT)

    def answer(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, *args):
        pass

print("app up", flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), App).serve_forever()
"""
COMMAND = 'exec python3 -c "$APP_CODE"'
RULES = RestartRules(
    backoff_seconds=0.05, max_backoff_seconds=0.4, stable_seconds=30, crash_loop_after=5
)


@pytest.fixture(params=["process", "container"])
async def driver(request: pytest.FixtureRequest) -> AsyncIterator[ProcessDriver]:
    common = {"start_timeout": 20, "stop_grace": 2, "probe_interval": 0.05}
    state_dir = ""
    if request.param == "container":
        if (why_not := unavailable_reason()) is not None:
            pytest.skip(f"containers cannot run here: {why_not}")
        state_dir = tempfile.mkdtemp(prefix="hangar-agent-")
        driver: ProcessDriver = ContainerDriver(
            state_dir=state_dir, freeze_seconds=600, restart_rules=RULES, **common
        )
    else:
        driver = ProcessDriver(restart_rules=RULES, **common)  # type: ignore[arg-type]
    try:
        yield driver
    finally:
        await driver.close()
        if state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)


def app(
    *,
    env: dict[str, str] | None = None,
    policy: RestartPolicy = RestartPolicy.ON_FAILURE,
    **fields: object,
) -> ContainerSpec:
    return ContainerSpec(
        container_id=f"c-{secrets.token_hex(4)}",
        deployment_id="d-1",
        project_id="p-restarts",
        command=COMMAND,
        env={"APP_CODE": APP, **(env or {})},
        resources=Resources(128, 1000),
        restart_policy=policy,
        **fields,  # type: ignore[arg-type]
    )


class Watch:
    """Every state a driver publishes for one container, and a wait for the next change."""

    def __init__(self, driver: ProcessDriver) -> None:
        self.driver = driver
        self.container_id = ""
        self.seen: list[ContainerInfo] = []
        self._changed = asyncio.Event()
        driver.subscribe(self._on_change)

    def _on_change(self, info: ContainerInfo) -> None:
        if info.container_id == self.container_id:
            self.seen.append(info)
            self._changed.set()

    async def start(self, spec: ContainerSpec) -> ContainerInfo:
        self.container_id = spec.container_id
        await self.driver.start(spec)
        return await self.until(lambda i: i.state is ContainerState.RUNNING)

    async def until(
        self, predicate: Callable[[ContainerInfo], bool], within: float = 60
    ) -> ContainerInfo:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            info = self.driver.inspect(self.container_id)
            assert info is not None
            if predicate(info):
                return info
            remaining = deadline - loop.time()
            assert remaining > 0, f"stuck: {info}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def notices(self) -> list[str]:
        logs = self.driver.logs(self.container_id)
        assert logs is not None
        return [line.text for line in logs.since(0) if line.text.startswith("[hangar agent]")]


async def get(address: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        return await client.get(f"http://{address}{path}")


async def test_an_app_that_crashes_after_it_was_healthy_restarts_on_the_same_address(
    driver: ProcessDriver,
) -> None:
    watch = Watch(driver)
    first = await watch.start(app())
    assert (await get(first.address, "/write/kept")).text == "written"

    assert (await get(first.address, "/crash")).status_code == 200  # answered, then exits 1
    crashed = await watch.until(lambda i: i.restarts == 1 or i.restart_delay > 0)
    # A request while it restarts waits for the next run, as one for a sleeping app does.
    served = await get(crashed.address, "/state")
    assert served.status_code == 200

    again = await watch.until(lambda i: i.state is ContainerState.RUNNING and i.restarts == 1)
    assert (again.address, again.port) == (first.address, first.port)
    assert again.run == 2 and again.pid and again.pid != first.pid
    assert again.last_exit_reason == "exited with code 1" and not again.crash_loop
    assert "crashing with code 1" in again.last_log_lines
    assert again.exit_code is None and again.ended_at is None  # the container goes on
    assert watch.notices() == [
        "[hangar agent] the app ended (exited with code 1); starting it again in 0.05s"
    ]
    if isinstance(driver, ContainerDriver):
        # A container's $HOME is a tmpfs of its run (as after a wake from a deep sleep): a
        # restart keeps its sandbox, network and public port, not files written in the run.
        assert served.text == "none"
    else:
        assert served.text == "kept"  # the same working directory
    stopped = await driver.stop(first.container_id)
    assert stopped.state is ContainerState.STOPPED and stopped.restarts == 1


@pytest.mark.parametrize(
    ("policy", "code", "reason"),
    [
        (RestartPolicy.ON_FAILURE, 0, ""),  # a clean exit is not a failure
        (RestartPolicy.NEVER, 3, "exited with code 3"),
    ],
)
async def test_an_exit_that_its_policy_does_not_restart_ends_the_container(
    driver: ProcessDriver, policy: RestartPolicy, code: int, reason: str
) -> None:
    watch = Watch(driver)
    running = await watch.start(app(policy=policy, env={"EXIT_CODE": str(code)}))
    await get(running.address, "/crash")
    ended = await watch.until(lambda i: i.state.ended)
    assert ended.state is ContainerState.EXITED
    assert (ended.exit_code, ended.reason, ended.restarts) == (code, reason, 0)
    assert all(info.restart_delay == 0 for info in watch.seen)
    assert watch.notices() == []


async def test_always_restarts_after_a_clean_exit(driver: ProcessDriver) -> None:
    watch = Watch(driver)
    running = await watch.start(app(policy=RestartPolicy.ALWAYS, env={"EXIT_CODE": "0"}))
    await get(running.address, "/crash")
    again = await watch.until(lambda i: i.state is ContainerState.RUNNING and i.restarts == 1)
    assert again.last_exit_reason == "exited with code 0"


async def test_quick_crashes_in_a_row_make_a_crash_loop_with_a_growing_back_off(
    driver: ProcessDriver,
) -> None:
    """Each run answers its health check and exits 1 at once: every crash is quick."""
    watch = Watch(driver)
    spec = app(env={"MODE": "crash-when-healthy"}, health_check_path="/healthz")
    watch.container_id = spec.container_id
    await driver.start(spec)
    looping = await watch.until(lambda i: i.crash_loop)

    assert looping.restarts == RULES.crash_loop_after  # the 5th crash, its restart pending
    assert looping.state is ContainerState.STARTING and looping.restart_delay > 0
    assert looping.last_exit_reason == "exited with code 1"
    assert looping.last_log_lines[-1] == "crashing with code 1"
    assert "app up" in looping.last_log_lines
    # The back-off schedule, as published before each restart: doubling up to its cap.
    delays = [info.restart_delay for info in watch.seen if info.restart_delay > 0]
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.4])
    crash_loop_flags = [info.crash_loop for info in watch.seen if info.restart_delay > 0]
    assert crash_loop_flags == [False, False, False, False, True]
    # One run after another, each started after the previous one's back-off.
    starts = sorted({(info.run, info.started_at) for info in watch.seen if info.started_at})
    assert [run for run, _ in starts] == list(range(1, RULES.crash_loop_after + 1))
    times = [at for _, at in starts]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert watch.notices()[-1].endswith("(crash loop: 5 quick crashes in a row)")

    # Still restarted while it loops; a stop ends it.
    await watch.until(lambda i: i.run > RULES.crash_loop_after)
    stopped = await driver.stop(spec.container_id)
    assert stopped.state is ContainerState.STOPPED and stopped.reason == "stopped"


async def test_a_failed_liveness_check_restarts_the_app_with_a_line_in_its_logs(
    driver: ProcessDriver,
) -> None:
    watch = Watch(driver)
    liveness = LivenessCheck("/live", period_seconds=0.1, failure_threshold=3)
    running = await watch.start(app(env={"MODE": "sick"}, liveness=liveness))
    assert running.restarts == 0
    restarted = await watch.until(lambda i: i.restarts >= 1)
    reason = "liveness check failed 3 times in a row (GET /live every 0.1s)"
    assert restarted.last_exit_reason == reason
    assert watch.notices()[0] == (
        f"[hangar agent] {reason}: stopping the app; it will be started again"
    )


async def test_a_healthy_liveness_check_leaves_the_app_alone(driver: ProcessDriver) -> None:
    watch = Watch(driver)
    liveness = LivenessCheck("/live", period_seconds=0.05, failure_threshold=1)
    running = await watch.start(app(liveness=liveness))
    for _ in range(3):  # requests of its own between checks
        assert (await get(running.address, "/state")).status_code == 200
    after = driver.inspect(running.container_id)
    assert after is not None and after.restarts == 0 and after.pid == running.pid


async def test_a_stop_during_the_back_off_ends_the_container_at_once(
    driver: ProcessDriver,
) -> None:
    driver.restart_rules = replace(RULES, backoff_seconds=30, max_backoff_seconds=60)
    watch = Watch(driver)
    running = await watch.start(app())
    await get(running.address, "/crash")
    waiting = await watch.until(lambda i: i.restart_delay > 0)
    assert waiting.restart_delay == 30 and waiting.next_restart_at is not None
    assert waiting.state is ContainerState.STARTING and waiting.pid == 0
    # The next start is further off than a connection is held: it is refused at once.
    with pytest.raises(httpx.TransportError):
        await get(running.address, "/state")

    stopped = await asyncio.wait_for(driver.stop(running.container_id), 10)
    assert stopped.state is ContainerState.STOPPED and stopped.reason == "stopped"
    assert stopped.run == 1 and stopped.restart_delay == 0  # never started again
    assert stopped.restarts == 1  # the crash was counted as it ended
    assert stopped.exit_code == 1  # the last run's


async def test_an_oom_kill_counts_as_a_crash(driver: ProcessDriver) -> None:
    if not isinstance(driver, ContainerDriver):
        pytest.skip("only containers have a memory limit the kernel enforces")
    watch = Watch(driver)
    running = await watch.start(replace(app(), resources=Resources(64, 1000)))
    with contextlib.suppress(httpx.TransportError):
        await get(running.address, "/hog")
    restarted = await watch.until(lambda i: i.restarts >= 1)
    assert restarted.last_exit_reason.startswith("OOM_KILLED") and "64 MiB" in (
        restarted.last_exit_reason
    )
