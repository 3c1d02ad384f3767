"""An agent killed with SIGKILL leaves its apps running, and the next agent of the same state
directory adopts them: listed as they were, their output shipped from where it stopped
(what they wrote meanwhile included), answering through the proxy again, stoppable without
leftovers; an app that ended meanwhile is reported with its exit code. A graceful SIGTERM
still stops every app, within the stop grace even for one that ignores SIGTERM.

Real `hangar serve agent` processes, for each driver, reporting to a stand-in for runtime
that keeps every log line shipped to it (and acknowledges it, as runtime does)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from google.protobuf import empty_pb2

from hangar.agent.v1 import agent_pb2 as pb
from hangar.runtime.v1 import runtime_pb2 as rpb
from hangar.runtime.v1 import runtime_pb2_grpc
from hangar.type.v1 import resources_pb2
from services.agent.containers import netns_prefix, unavailable_reason
from tests.support.agent import (
    ENDED,
    RunningAgent,
    alive,
    process_tree,
    start_agent_process,
)
from tests.support.identity import RunningIdentity, bearer, running_identity
from tests.support.procs import free_port

pytestmark = pytest.mark.slow

# Writes a numbered line every 0.1 s, and serves HTTP on $PORT.
TICKER = (
    'i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 0.1; done & '
    'exec python3 -m http.server "$PORT"'
)
HTTP_SERVER = 'exec python3 -m http.server "$PORT"'
# Serves HTTP and ignores SIGTERM: only SIGKILL ends it.
STUBBORN = (
    'exec python3 -c "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); '
    "sys.argv = ['http.server', sys.argv[1]]; import runpy; "
    "runpy.run_module('http.server', run_name='__main__')\" \"$PORT\""
)
DRIVERS = ["process", "container"]


@dataclass
class StandInRuntime(runtime_pb2_grpc.RuntimeServiceServicer):
    """What the agents report to: every log line shipped (acknowledged as runtime would),
    and each container's newest status."""

    lines: list[rpb.LogLine] = field(default_factory=list)
    statuses: dict[str, rpb.ContainerStatusReport] = field(default_factory=dict)

    async def ShipLogs(self, request_iterator, context):  # type: ignore[no-untyped-def]
        acknowledged: dict[str, int] = {}
        async for batch in request_iterator:
            for line in batch.lines:
                self.lines.append(line)
                acknowledged[line.container_id] = max(
                    acknowledged.get(line.container_id, 0), line.sequence
                )
        return rpb.ShipLogsResponse(acknowledged_sequences=acknowledged)

    async def ShipMetrics(self, request, context):  # type: ignore[no-untyped-def]
        return rpb.ShipMetricsResponse(accepted=len(request.samples))

    async def Heartbeat(self, request, context):  # type: ignore[no-untyped-def]
        for report in request.containers:
            self.statuses[report.container_id] = report
        return rpb.HeartbeatResponse()

    async def ReportContainerStatus(self, request, context):  # type: ignore[no-untyped-def]
        self.statuses[request.report.container_id] = request.report
        return empty_pb2.Empty()

    def texts(self, container_id: str) -> list[str]:
        return [line.line for line in self.lines if line.container_id == container_id]


@pytest.fixture(scope="module")
async def identity(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RunningIdentity]:
    async with running_identity(database_url, db_passwords) as running:
        yield running


@pytest.fixture
async def runtime() -> AsyncIterator[tuple[StandInRuntime, str]]:
    stand_in = StandInRuntime()
    server = grpc.aio.server()
    runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(stand_in, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield stand_in, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@dataclass
class Agents:
    """Agents one after the other on one state directory (as on a server)."""

    identity: RunningIdentity
    driver: str
    runtime_address: str
    token: str
    state_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="hangar-agent-"))
    current: RunningAgent | None = None
    extra: dict[str, str] = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)  # every app process seen: none may outlive

    def start(self) -> RunningAgent:
        env = {
            "HANGAR_AGENT_DRIVER": self.driver,
            "HANGAR_AGENT_SERVICE_SECRET": self.identity.settings.service_secrets["agent"],
            "HANGAR_RUNTIME_ADDR": self.runtime_address,
            "HANGAR_AGENT_SERVER": "adoption",
            "HANGAR_AGENT_HEARTBEAT_SECONDS": "0.5",
            "HANGAR_AGENT_START_TIMEOUT_SECONDS": "30",
            "HANGAR_AGENT_STOP_GRACE_SECONDS": "2",  # apps that ignore SIGTERM end sooner
            **self.extra,
        }
        self.current = start_agent_process(self.identity.address, env, state_dir=self.state_dir)
        return self.current

    async def kill(self) -> None:
        """SIGKILL: no clean-up of any kind (a crash, an OOM kill of the agent)."""
        agent = self.current
        assert agent is not None and agent.process is not None
        agent.process.kill()
        agent.state_dir = ""  # the next agent's
        await agent.close()
        self.current = None

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.token)

    async def run(self, container_id: str, command: str, **fields: object) -> pb.Container:
        agent = self.current
        assert agent is not None
        request = pb.StartContainerRequest(
            container_id=container_id,
            deployment_id=f"d-{container_id}",
            project_id="p-adoption",
            command=command,
            resources=resources_pb2.Resources(ram_mb=256, cpu_millis=1000),
            **fields,  # type: ignore[arg-type]
        )
        await agent.stub.StartContainer(request, metadata=self.auth)
        running = await agent.wait_for(
            container_id, (pb.CONTAINER_STATUS_RUNNING,), self.token, within=45
        )
        self.pids |= set(process_tree(running.pid))
        return running

    async def get(self, container_id: str) -> pb.Container:
        assert self.current is not None
        return await self.current.stub.GetContainer(
            pb.GetContainerRequest(container_id=container_id), metadata=self.auth
        )

    def home(self, container_id: str) -> Path:
        return Path(self.state_dir) / "apps" / container_id

    async def close(self) -> None:
        """SIGTERM to the agent there is, if any; and nothing of the apps may be left."""
        if self.current is not None:
            await self.current.close()
            self.current = None
        left = [pid for pid in self.pids if alive(pid)]
        for pid in left:  # a failed test must not leave apps for the next ones
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.driver == "container":
            await asyncio.to_thread(_remove_namespaces, netns_prefix(self.state_dir))
        shutil.rmtree(self.state_dir, ignore_errors=True)
        assert left == [], "app processes outlived the test"


def _slirp_of(state_dir: str, container_id: str) -> psutil.Process | None:
    """The slirp4netns giving the container's network namespace its egress."""
    netns = f"/run/netns/{netns_prefix(state_dir)}{container_id}"
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "slirp4netns" and netns in (proc.info["cmdline"] or []):
            return proc
    return None


def _remove_namespaces(prefix: str) -> None:
    for netns in Path("/run/netns").glob(f"{prefix}*"):
        subprocess.run(["ip", "netns", "delete", netns.name], capture_output=True, check=False)


@pytest.fixture(params=DRIVERS)
async def agents(
    request: pytest.FixtureRequest,
    identity: RunningIdentity,
    runtime: tuple[StandInRuntime, str],
) -> AsyncIterator[Agents]:
    driver = request.param
    if driver == "container" and unavailable_reason() is not None:
        pytest.skip(f"containers cannot run here: {unavailable_reason()}")
    found = Agents(identity, driver, runtime[1], await identity.service_token("runtime"))
    try:
        yield found
    finally:
        await found.close()


async def until(condition: Callable[[], object], what: str, within: float = 30.0) -> None:
    """Polls `condition` until it holds (a bounded wait, never a fixed sleep)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


def ticks(texts: list[str]) -> set[int]:
    return {int(m.group(1)) for text in texts if (m := re.fullmatch(r"tick (\d+)", text))}


async def get_status(address: str) -> int:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        return (await client.get(f"http://{address}/")).status_code


# ------------------------------------------------------------------------------ the tests


async def test_a_killed_agents_app_runs_on_and_the_next_agent_adopts_it(
    agents: Agents, runtime: tuple[StandInRuntime, str]
) -> None:
    stand_in = runtime[0]
    agents.start()
    started = await agents.run("c-ticker", TICKER)
    assert await get_status(started.address) == 200
    await until(lambda: len(ticks(stand_in.texts("c-ticker"))) >= 5, "ticks shipped")
    tree = process_tree(started.pid)
    output = agents.home("c-ticker") / "stdout"

    await agents.kill()
    if agents.driver == "container":  # its network's helper dies too: the next agent restarts it
        slirp = _slirp_of(agents.state_dir, "c-ticker")
        assert slirp is not None
        slirp.kill()
        slirp.wait(10)
    # The app goes on without an agent: its processes live and it keeps writing.
    size = output.stat().st_size
    await until(lambda: output.stat().st_size > size + 50, "output written without an agent")
    assert alive(started.pid)
    last_meanwhile = max(ticks(output.read_text().splitlines()))

    agents.start()
    adopted = await agents.get("c-ticker")
    assert adopted.status == pb.CONTAINER_STATUS_RUNNING
    assert (adopted.container_id, adopted.pid) == ("c-ticker", started.pid)
    assert adopted.address == started.address  # its public port, bound again
    assert await get_status(adopted.address) == 200
    if agents.driver == "container":
        assert _slirp_of(agents.state_dir, "c-ticker") is not None
    # Every tick is shipped, those written while no agent ran included; a sequence is
    # never taken by two different lines (runtime keeps the first it stored).
    await until(lambda: max(ticks(stand_in.texts("c-ticker"))) > last_meanwhile + 5, "ticks after")
    shipped = ticks(stand_in.texts("c-ticker"))
    assert set(range(1, max(shipped) + 1)) <= shipped
    by_sequence: dict[int, set[str]] = {}
    for line in stand_in.lines:
        if line.container_id == "c-ticker":
            by_sequence.setdefault(line.sequence, set()).add(line.line)
    assert all(len(texts) == 1 for texts in by_sequence.values())

    assert agents.current is not None
    stopped = await agents.current.stub.StopContainer(
        pb.StopContainerRequest(container_id="c-ticker"), metadata=agents.auth
    )
    assert stopped.status == pb.CONTAINER_STATUS_EXITED and stopped.reason == "stopped"
    assert [pid for pid in tree if alive(pid)] == []
    assert not agents.home("c-ticker").exists()
    if agents.driver == "container":
        prefix = netns_prefix(agents.state_dir)
        bundles = Path(agents.state_dir) / "bundles"
        await until(lambda: not list(bundles.iterdir()), "the bundle removed")
        await until(lambda: not list(Path("/run/netns").glob(f"{prefix}*")), "netns removed")


async def test_an_app_that_ended_while_no_agent_ran_is_reported_with_its_exit_code(
    agents: Agents, runtime: tuple[StandInRuntime, str]
) -> None:
    stand_in = runtime[0]
    agents.start()
    command = 'python3 -m http.server "$PORT" & sleep 8; echo bye; exit 7'
    started = await agents.run("c-leaver", command, restart_policy=pb.RESTART_POLICY_NEVER)
    assert started.status == pb.CONTAINER_STATUS_RUNNING
    await agents.kill()
    await until(lambda: (agents.home("c-leaver") / "exit.json").exists(), "the app ended")

    agents.start()
    ended = await agents.get("c-leaver")
    if ended.status not in ENDED:
        assert agents.current is not None
        ended = await agents.current.wait_for("c-leaver", ENDED, agents.token)
    assert ended.status == pb.CONTAINER_STATUS_EXITED
    assert (ended.exit_code, ended.reason) == (7, "exited with code 7")
    # Runtime hears of it, with its last words; nothing of it is left on the server.
    await until(
        lambda: (
            stand_in.statuses.get("c-leaver", rpb.ContainerStatusReport()).status
            == rpb.CONTAINER_STATUS_EXITED
        ),
        "the end reported",
    )
    await until(lambda: "bye" in stand_in.texts("c-leaver"), "its last line shipped")
    await until(lambda: not agents.home("c-leaver").exists(), "its files removed")
    assert [pid for pid in process_tree(started.pid) if alive(pid)] == []


async def test_a_sleeping_app_sleeps_on_and_the_next_request_wakes_it(agents: Agents) -> None:
    agents.start()
    started = await agents.run("c-sleeper", HTTP_SERVER)
    assert agents.current is not None
    asleep = await agents.current.stub.SleepContainer(
        pb.SleepContainerRequest(container_id="c-sleeper"), metadata=agents.auth
    )
    assert asleep.sleep_status == pb.SLEEP_STATUS_SLEEPING
    await agents.kill()

    agents.start()
    adopted = await agents.get("c-sleeper")
    assert adopted.status == pb.CONTAINER_STATUS_RUNNING
    assert adopted.sleep_status == pb.SLEEP_STATUS_SLEEPING
    assert await get_status(adopted.address) == 200  # the request wakes it
    awake = await agents.get("c-sleeper")
    assert awake.sleep_status == pb.SLEEP_STATUS_AWAKE
    if agents.driver == "container":  # it was frozen: the same processes, thawed
        assert awake.pid == started.pid
    agents.pids |= set(process_tree(awake.pid))


async def test_sigterm_stops_an_app_ignoring_it_within_the_stop_grace(agents: Agents) -> None:
    grace = 2.0
    agents.extra = {"HANGAR_AGENT_STOP_GRACE_SECONDS": f"{grace:g}"}
    agents.runtime_address = f"127.0.0.1:{free_port()}"  # runtime away: the slowest case
    agent = agents.start()
    started = await agents.run("c-stubborn", STUBBORN)
    tree = process_tree(started.pid)
    assert agent.process is not None

    began = time.monotonic()
    agent.process.terminate()
    code = await asyncio.to_thread(agent.process.proc.wait, grace + 15)
    took = time.monotonic() - began
    print(f"\nagent ({agents.driver} driver) stopped {took:.2f}s after SIGTERM, grace {grace:g}s")
    assert code == 0
    assert [pid for pid in tree if alive(pid)] == []
    assert list((Path(agents.state_dir) / "apps").iterdir()) == []
