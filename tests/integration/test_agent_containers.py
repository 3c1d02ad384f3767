"""The container driver, as a hostile tenant would try it: real apps started through a real
agent (gRPC, runtime's token) in real runc containers.

Each app here is a probe: a Python script handed to the container in its environment
(the container sees nothing of the host's files), which tries something and prints what
happened, then serves HTTP so the container is healthy. The tests read its log.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import psutil
import pytest

from hangar.agent.v1 import agent_pb2 as pb
from hangar.type.v1 import resources_pb2
from services.agent.containers import ContainerDriver, unavailable_reason
from services.agent.domain import ContainerState, SleepState
from tests.support.agent import RunningAgent, caller_tokens, process_tree, running_agent
from tests.support.identity import RunningIdentity, bearer, running_identity

if os.geteuid() != 0:  # make test installs runc & co. when root; elsewhere: the process driver
    pytest.skip("containers need root", allow_module_level=True)

PIDS_LIMIT = 48
TMPFS_MB = 16
SERVE = 'exec python3 -m http.server "$PORT"'
# The probe prints one JSON line "PROBE {...}" and then serves, so the container is healthy.
PROBE = 'python3 -c "$PROBE_CODE"; ' + SERVE


@pytest.fixture(scope="module")
def require_containers() -> None:
    why_not = unavailable_reason()
    assert why_not is None, f"make test installs what containers need: {why_not}"


@pytest.fixture(scope="module")
async def identity(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RunningIdentity]:
    async with running_identity(database_url, db_passwords) as running:
        yield running


@pytest.fixture(scope="module")
async def tokens(identity: RunningIdentity) -> dict[str, str]:
    return await caller_tokens(identity)


@pytest.fixture
async def agent(require_containers: None, identity: RunningIdentity) -> AsyncIterator[RunningAgent]:
    driver = ContainerDriver(
        state_dir=tempfile.mkdtemp(prefix="hangar-agent-"),
        start_timeout=20,
        stop_grace=2,
        probe_interval=0.05,
        pids_limit=PIDS_LIMIT,
        tmpfs_mb=TMPFS_MB,
        freeze_seconds=600,
    )
    async with running_agent(identity.address, driver=driver) as running:
        yield running
    assert not list((driver.state_dir / "bundles").iterdir())  # nothing left behind


def driver_of(agent: RunningAgent) -> ContainerDriver:
    assert agent.app is not None and isinstance(agent.app.driver, ContainerDriver)
    return agent.app.driver


async def start(
    agent: RunningAgent,
    token: str,
    command: str,
    *,
    project: str,
    env: dict[str, str] | None = None,
    ram_mb: int = 128,
    cpu_millis: int = 1000,
    restart_policy: pb.RestartPolicy.ValueType = pb.RESTART_POLICY_UNSPECIFIED,
) -> pb.Container:
    request = pb.StartContainerRequest(
        container_id=f"c-{secrets.token_hex(4)}",
        deployment_id=f"d-{secrets.token_hex(4)}",
        project_id=project,
        command=command,
        env=env or {},
        resources=resources_pb2.Resources(ram_mb=ram_mb, cpu_millis=cpu_millis),
        restart_policy=restart_policy,
    )
    await agent.stub.StartContainer(request, metadata=bearer(token))
    return await agent.wait_for(
        request.container_id, (pb.CONTAINER_STATUS_RUNNING,), token, within=30
    )


ENDED = (pb.CONTAINER_STATUS_EXITED, pb.CONTAINER_STATUS_FAILED)


async def probe_result(agent: RunningAgent, container_id: str, within: float = 30) -> dict:
    """The JSON the probe printed."""
    deadline = time.monotonic() + within
    while True:
        logs = driver_of(agent).logs(container_id)
        assert logs is not None
        for line in logs.text().splitlines():
            if line.startswith("PROBE "):
                return json.loads(line.removeprefix("PROBE "))
        assert time.monotonic() < deadline, f"no probe result in: {logs.text()}"
        await asyncio.sleep(0.05)


def host_addresses() -> list[str]:
    """Every IPv4 address of this machine, loopback included."""
    return sorted(
        {
            address.address
            for addresses in psutil.net_if_addrs().values()
            for address in addresses
            if address.family == socket.AF_INET
        }
    )


TRESPASS = r"""
import json, os, socket
facts = json.loads(os.environ["FACTS"])
found = {}
secret = facts["secret"][::-1]  # handed over reversed: its own environment holds it so
# Other processes' environments and working directories.
pids = [p for p in os.listdir("/proc") if p.isdigit()]
found["processes"] = len(pids)
leaks = []
for pid in pids:
    for name in ("environ", "cmdline"):
        try:
            if secret.encode() in open(f"/proc/{pid}/{name}", "rb").read():
                leaks.append(f"{pid}/{name}")
        except OSError:
            pass
found["proc_leaks"] = leaks
# Every file the container can see (not /proc, /sys, /usr: the shared stack).
hits = []
for top in ("/", ):
    for root, dirs, files in os.walk(top):
        if root == "/":
            dirs[:] = [d for d in dirs if d not in ("proc", "sys", "usr", "dev")]
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as f:
                    if secret.encode() in f.read(1 << 20):
                        hits.append(os.path.join(root, name))
            except OSError:
                pass
found["file_hits"] = hits
found["visible_paths"] = [p for p in facts["paths"] if os.path.exists(p)]
reached = []
for host in facts["hosts"] + ["10.0.2.2", "127.0.0.1"]:
    for port in facts["ports"]:
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect((host, port))
            reached.append(f"{host}:{port}")
        except OSError:
            pass
        finally:
            s.close()
found["reached"] = reached
found["uid"] = os.getuid()
found["gid"] = os.getgid()
try:
    open("/written", "w")
    found["root_writable"] = True
except OSError:
    found["root_writable"] = False
print("PROBE " + json.dumps(found), flush=True)
"""


async def test_an_app_cannot_see_another_tenant_the_platform_or_the_host(
    agent: RunningAgent, tokens: dict[str, str], identity: RunningIdentity, database_url: str
) -> None:
    token = tokens["runtime"]
    secret = "tenant-b-" + secrets.token_hex(8)
    victim = await start(
        agent,
        token,
        f'echo "$B_SECRET" > "$HOME/secret.txt"; echo "$B_SECRET" > /tmp/secret.txt; {SERVE}',
        project="p-victim",
        env={"B_SECRET": secret},
    )
    # The platform's secrets and data, as the host has them.
    home = Path(tempfile.mkdtemp(prefix="hangar-home-"))
    credentials = home / "credentials.json"
    credentials.write_text(json.dumps({"master_key": secret}))
    database = urlsplit(database_url)
    socket_dir = parse_qs(database.query).get("host", [""])[0]
    paths = [str(credentials), str(home), str(Path(driver_of(agent).state_dir))]
    ports = [int(identity.address.rsplit(":", 1)[1]), int(agent.address.rsplit(":", 1)[1])]
    if socket_dir:
        paths += [socket_dir, f"{socket_dir}/.s.PGSQL.{database.port or 5432}"]
    if database.port:
        ports.append(database.port)
    facts = {"secret": secret[::-1], "paths": paths, "ports": ports, "hosts": host_addresses()}
    attacker = await start(
        agent,
        token,
        PROBE,
        project="p-attacker",
        env={"PROBE_CODE": TRESPASS, "FACTS": json.dumps(facts)},
    )
    found = await probe_result(agent, attacker.container_id)

    assert found["proc_leaks"] == [] and found["file_hits"] == []
    assert found["visible_paths"] == []
    assert found["reached"] == []  # not PostgreSQL, identity, the agent
    assert found["processes"] < 20
    assert found["uid"] != 0 and found["gid"] != 0
    assert found["root_writable"] is False
    # The victim's own files hold its secret: the probe looked in the right kind of place.
    victim_logs = driver_of(agent).logs(victim.container_id)
    assert victim_logs is not None and secret not in victim_logs.text()
    # Two projects, two uids; the same project keeps its uid.
    uids = driver_of(agent).uids
    assert uids.uid_of("p-victim") != uids.uid_of("p-attacker") == found["uid"]


async def test_an_app_port_is_reached_only_through_the_agent_proxy(
    agent: RunningAgent, tokens: dict[str, str]
) -> None:
    app = await start(agent, tokens["runtime"], SERVE, project="p-web")
    async with httpx.AsyncClient(trust_env=False) as client:
        reply = await client.get(f"http://{app.address}/")
    assert reply.status_code == 200
    # The app listens inside its own network namespace: nothing of its listens on the host.
    tree = set(process_tree(app.pid))
    listening = [
        c for c in psutil.net_connections(kind="tcp") if c.status == "LISTEN" and c.pid in tree
    ]
    assert listening == []
    # Another app cannot reach it but through its public address (the proxy, counted).
    facts = {
        "secret": "unused",
        "paths": [],
        "ports": [8080],
        "hosts": [h for h in host_addresses() if not h.startswith("127.")],
    }
    other = await start(
        agent,
        tokens["runtime"],
        PROBE,
        project="p-other",
        env={"PROBE_CODE": TRESPASS, "FACTS": json.dumps(facts)},
    )
    found = await probe_result(agent, other.container_id)
    assert found["reached"] == []


async def test_an_app_over_its_memory_is_oom_killed_and_told_so(
    agent: RunningAgent, tokens: dict[str, str]
) -> None:
    hog = (
        'exec python3 -c "import os, socket, time; s = socket.socket(); '
        "s.bind(('0.0.0.0', int(os.environ['PORT']))); s.listen(); time.sleep(1); "
        'b = bytearray(512 << 20); time.sleep(600)"'
    )
    # Policy never: the container ends with the kill (an OOM kill is restarted like any crash
    # under on-failure: test_agent_restart.py).
    app = await start(
        agent,
        tokens["runtime"],
        hog,
        project="p-hog",
        ram_mb=64,
        restart_policy=pb.RESTART_POLICY_NEVER,
    )
    ended = await agent.wait_for(app.container_id, ENDED, tokens["runtime"], within=60)
    assert ended.reason.startswith("OOM_KILLED") and "64 MiB" in ended.reason
    assert ended.exit_code == 137
    logs = driver_of(agent).logs(app.container_id)
    assert logs is not None and "OOM_KILLED" in logs.text()


FORK_BOMB = r"""
import errno, json, os, signal, time
children, error = [], None
while len(children) < 10000:
    try:
        pid = os.fork()
    except OSError as exc:
        error = errno.errorcode.get(exc.errno)
        break
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    children.append(pid)
print("PROBE " + json.dumps({"children": len(children), "error": error}), flush=True)
for pid in children:  # room again for the app to serve
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


async def test_a_fork_bomb_stops_at_the_pids_limit(
    agent: RunningAgent, tokens: dict[str, str]
) -> None:
    bomb = await start(
        agent, tokens["runtime"], PROBE, project="p-bomb", env={"PROBE_CODE": FORK_BOMB}
    )
    found = await probe_result(agent, bomb.container_id)
    assert found["error"] == "EAGAIN" and 0 < found["children"] < PIDS_LIMIT
    # The machine, and the agent on it, still serve: another app starts and answers.
    other = await start(agent, tokens["runtime"], SERVE, project="p-neighbour")
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"http://{other.address}/")).status_code == 200


BUSY = r"""
import json, time
wall = time.monotonic()
cpu = time.process_time()
while time.monotonic() - wall < 2.0:
    pass
print("PROBE " + json.dumps({"cpu": time.process_time() - cpu, "wall": time.monotonic() - wall}),
      flush=True)
"""


async def test_cpu_is_held_to_the_allocation(agent: RunningAgent, tokens: dict[str, str]) -> None:
    app = await start(
        agent, tokens["runtime"], PROBE, project="p-busy", env={"PROBE_CODE": BUSY}, cpu_millis=250
    )
    found = await probe_result(agent, app.container_id)
    assert found["cpu"] / found["wall"] <= 0.3  # 250 millicores, with the kernel's slack


WRITE = r"""
import errno, json, os
result = {}
for where in ("/tmp", os.environ["HOME"]):
    try:
        with open(os.path.join(where, "fill"), "wb") as f:
            for _ in range(64):
                f.write(b"x" * (1 << 20))
                f.flush()
        result[where] = "wrote 64 MiB"
    except OSError as exc:
        result[where] = errno.errorcode.get(exc.errno)
for where in ("/usr/local/x", "/etc/passwd"):
    try:
        open(where, "a").close()
        result[where] = "writable"
    except OSError as exc:
        result[where] = errno.errorcode.get(exc.errno)
print("PROBE " + json.dumps(result), flush=True)
"""


async def test_writes_past_the_tmpfs_cap_fail_and_the_root_is_read_only(
    agent: RunningAgent, tokens: dict[str, str]
) -> None:
    app = await start(
        agent, tokens["runtime"], PROBE, project="p-disk", env={"PROBE_CODE": WRITE}, ram_mb=256
    )
    found = await probe_result(agent, app.container_id)
    assert found == {
        "/tmp": "ENOSPC",
        "/home/app": "ENOSPC",
        "/usr/local/x": "EROFS",
        "/etc/passwd": "EACCES",  # root's, on a read-only root
    }


async def test_metrics_are_the_cgroups_and_egress_is_counted(
    agent: RunningAgent, tokens: dict[str, str]
) -> None:
    # A peer on this machine, reached the way the internet would be: through slirp4netns.
    received = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        if not received.done():
            received.set_result(len(data))
        writer.close()

    server = await asyncio.start_server(sink, "0.0.0.0", 0)
    port = server.sockets[0].getsockname()[1]
    host = next(h for h in host_addresses() if not h.startswith("127."))
    code = (
        "import socket; b = bytearray(40 << 20); "
        f"s = socket.create_connection(('{host}', {port})); s.sendall(b'x' * 300000); s.close()"
    )
    app = await start(
        agent,
        tokens["runtime"],
        f'python3 -c "{code}" & exec python3 -c "'
        "import os, socket, time; b = bytearray(40 << 20); s = socket.socket(); "
        "s.bind(('0.0.0.0', int(os.environ['PORT']))); s.listen(); time.sleep(600)\"",
        project="p-metered",
        ram_mb=256,
    )
    async with server:
        assert await asyncio.wait_for(received, 30) == 300000
    driver = driver_of(agent)
    deadline = time.monotonic() + 30
    while True:
        sample = driver.sample(app.container_id)
        assert sample is not None
        if (sample.tx_bytes or 0) >= 300000:
            break
        assert time.monotonic() < deadline, sample
        await asyncio.sleep(0.1)
    assert sample.rss_bytes >= 40 << 20  # the cgroup's memory, the 40 MiB the app holds
    assert sample.cpu_seconds > 0


async def test_sleep_freezes_and_a_request_thaws_at_once(
    agent: RunningAgent, tokens: dict[str, str]
) -> None:
    app = await start(agent, tokens["runtime"], SERVE, project="p-sleepy")
    driver = driver_of(agent)
    asleep = await driver.sleep(app.container_id)
    assert asleep.sleep is SleepState.SLEEPING and asleep.pid == app.pid  # frozen, not gone
    state = json.loads(driver._runc_sync("state", app.container_id))
    assert state["status"] == "paused"  # the cgroup freezer holds it
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"http://{app.address}/")).status_code == 200
    awake = driver.inspect(app.container_id)
    assert awake is not None and awake.sleep is SleepState.AWAKE and awake.run == 2
    assert awake.state is ContainerState.RUNNING and awake.pid == app.pid
