"""How the agent runs containers: the `Driver` interface, and `ProcessDriver`, which runs a
command line as a local process group on a free private port (its PORT) behind the agent's
ingress proxy (services/agent/proxy.py) on the container's public port, which counts the
app's network bytes.

A Docker driver implements the same interface later (`runs_images = True`); the servicer
only ever talks to a `Driver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import ipaddress
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import psutil

from services.agent import adoption, runs
from services.agent.domain import (
    AGENT_NOTICE,
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    LogBuffer,
    LogStream,
    ResourceSample,
    RestartPolicy,
    SleepState,
    describe_exit,
    exit_code_of,
    utcnow,
)
from services.agent.proxy import CHUNK_BYTES, IngressProxy
from services.agent.restarts import CrashCount, RestartRules, last_app_lines, restarts_after
from services.agent.runs import AppHome, AppRun, LogTail
from shared.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from shared.loops import cancel_and_wait

log = logging.getLogger("hangar.agent")

ContainerListener = Callable[[ContainerInfo], None]

# Only these of the agent's own variables reach apps: never its secrets or tokens.
INHERITED_ENV = ("PATH", "HOME", "LANG")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# How often a quiet app's output files are read (sooner after it wrote).
TAIL_POLL_SECONDS = 0.02
TAIL_IDLE_SECONDS = 0.25
# Output read per file at once: few enough lines that the sequences reserved ahead hold.
TAIL_READ_BYTES = 128 * 1024
LOST_RUN = "the app's shim was killed: its exit status is unknown and the app was stopped"


class Driver(Protocol):
    """Starts, stops and watches containers on this server."""

    runs_images: bool
    # "container" when apps run isolated (runc), "none" for plain processes (runtime refuses
    # to mix organizations on a server without isolation).
    isolation: str

    async def start(self, spec: ContainerSpec) -> ContainerInfo:
        """Starts `spec` (idempotent on container_id); returns once it is started, not healthy."""
        ...

    async def stop(self, container_id: str, grace: float | None = None) -> ContainerInfo:
        """Stops it (SIGTERM, SIGKILL after `grace`) and returns its final state. Idempotent."""
        ...

    async def sleep(
        self, container_id: str, idle_since: datetime | None = None, grace: float | None = None
    ) -> ContainerInfo:
        """Stop an idle running container's process, keeping it to be woken by a request."""
        ...

    def inspect(self, container_id: str) -> ContainerInfo | None: ...

    def list(self) -> list[ContainerInfo]: ...

    def logs(self, container_id: str) -> LogBuffer | None: ...

    def sample(self, container_id: str) -> ResourceSample | None: ...

    def final_reading(self, container_id: str) -> ResourceSample | None:
        """The last reading of the container's latest run that ended (a sleep or its end)."""
        ...

    def subscribe(self, listener: ContainerListener) -> None:
        """Calls `listener` with every state change (status reports to runtime)."""
        ...

    async def adopt(self) -> None:
        """Takes over the containers an earlier agent of the same state directory left
        running (once, before serving); ends and removes what cannot be adopted."""
        ...

    async def close(self) -> None:
        """Stops every container: nothing the driver started outlives it."""
        ...


def inherited_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The minimal environment apps start from (read once, when the driver is built)."""
    env = {name: environ[name] for name in INHERITED_ENV if environ.get(name)}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


@dataclass
class _Container:
    """The driver's own record of one container (mutable; `info` is the published view)."""

    spec: ContainerSpec
    info: ContainerInfo
    logs: LogBuffer
    process: AppRun | None = None  # the current run: its shim and app (runs.py)
    home: AppHome | None = None  # its files in the state directory: they outlive the agent
    tail: LogTail | None = None  # its output files, read into `logs`
    cpu_base: float = 0.0  # CPU seconds the current run used before this agent metered it
    exited: asyncio.Future[int] | None = None  # resolves to the returncode once reaped
    workdir: Path | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop_task: asyncio.Task[None] | None = None
    stop_requested: bool = False
    failure: str = ""  # set when the driver itself ends the container as failed
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    private_port: int = 0  # the app's PORT; info.port is the proxy's public port
    proxy: IngressProxy | None = None
    proxy_closed: asyncio.Task[None] | None = None
    reaped: Reaped | None = None  # the process's resource usage, read as it was reaped
    final: ResourceSample | None = None  # the last reading, taken as a run ended
    dozing: bool = False  # the process is being stopped to sleep, not to end
    supervisor: asyncio.Task[None] | None = None  # of the current run
    up: asyncio.Event = field(default_factory=asyncio.Event)  # the current run is healthy
    waking: asyncio.Task[None] | None = None
    kernel_reason: str = ""  # why the kernel ended the run (the container driver: OOM_KILLED)
    # Restarts (services/agent/restarts.py).
    ever_up: bool = False  # some run answered its health check: crashes are restarted
    healthy_at: float | None = None  # monotonic time the current run became healthy
    killed_for: str = ""  # why the agent killed the current run (liveness, start-up time)
    crashes: CrashCount = field(default_factory=CrashCount)
    restart: asyncio.Task[None] | None = None  # the back-off wait, then the next start
    restart_due: float | None = None  # monotonic time of the next start, during a back-off
    run_over: asyncio.Event = field(default_factory=asyncio.Event)  # set as the run ends
    log_mark: int = 0  # the last log sequence before the current run


class ProcessDriver:
    """Runs each container as `/bin/sh -c COMMAND` in its own process group, under a shim
    that owns the run (runs.py): apps outlive the agent, and the next agent of the same
    state directory adopts them (`adopt`).

    The app listens on its PORT, a free private port that health checks probe directly;
    clients reach it through the agent's ingress proxy on the public port that `start`
    returns (on `listen_host`: empty for every interface), which counts bytes both ways.
    """

    runs_images = False
    isolation = "none"

    def __init__(
        self,
        *,
        advertise_host: str = "127.0.0.1",
        start_timeout: float = 30.0,
        stop_grace: float = 10.0,
        log_lines: int = 5000,
        max_line_chars: int = 16 * 1024,
        keep_ended: int = 1000,
        probe_interval: float = 0.1,
        base_env: Mapping[str, str] | None = None,
        workdir_root: str | None = None,
        listen_host: str = "",
        state_dir: str | Path | None = None,
        restart_rules: RestartRules | None = None,
    ) -> None:
        self.advertise_host = advertise_host
        self.listen_host = listen_host
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.log_lines = log_lines
        self.max_line_chars = max_line_chars
        self.keep_ended = keep_ended
        self.probe_interval = probe_interval
        self.base_env = dict(base_env) if base_env is not None else inherited_env(os.environ)
        self.workdir_root = workdir_root
        # Each container's files (runs.py), which a later agent of the same directory
        # adopts; without one, a directory of the driver's own, removed at close.
        self._own_state_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="hangar-agent-")).resolve()
        self._apps = self.state_dir / runs.APPS_DIR
        for path in (self.state_dir, self._apps):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)
        self._state_lock = -1
        self._adopted = False
        self.restart_rules = restart_rules or RestartRules()
        self._containers: dict[str, _Container] = {}
        self._listeners: list[ContainerListener] = [self._save_on_change]
        self._lock = asyncio.Lock()
        self._closing = False

    # ------------------------------------------------------------------ Driver interface

    async def start(self, spec: ContainerSpec) -> ContainerInfo:
        spec.validate()
        if spec.image:
            raise FailedPrecondition("this agent has no image driver", reason="NO_IMAGE_DRIVER")
        async with self._lock:
            existing = self._containers.get(spec.container_id)
            if existing is not None:
                if not spec.same_container(existing.spec):
                    raise AlreadyExists(
                        "container id already used by another deployment",
                        reason="CONTAINER_ID_TAKEN",
                    )
                return existing.info
            if self._closing:
                raise Unavailable("the agent is shutting down", reason="AGENT_SHUTTING_DOWN")
            proxy, private_port = await self._listen()
            port = proxy.port
            record = _Container(
                spec=spec,
                info=ContainerInfo(
                    container_id=spec.container_id,
                    deployment_id=spec.deployment_id,
                    project_id=spec.project_id,
                    state=ContainerState.STARTING,
                    address=f"{self.advertise_host}:{port}",
                    port=port,
                    started_at=utcnow(),
                ),
                logs=LogBuffer(self.log_lines, self.max_line_chars),
                private_port=private_port,
                proxy=proxy,
            )
            self._containers[spec.container_id] = record
            proxy.before_connect = functools.partial(self._wake, record)
            proxy.open_app = functools.partial(self.open_app, record)
            await self._spawn(record)
            return record.info

    async def stop(self, container_id: str, grace: float | None = None) -> ContainerInfo:
        async with self._lock:  # a start of the same id in progress finishes spawning first
            record = self._containers.get(container_id)
        if record is None:
            raise NotFound("this agent runs no such container", reason="CONTAINER_NOT_FOUND")
        if record.info.state.ended:
            return record.info
        if record.stop_task is None:
            record.stop_task = asyncio.create_task(
                self._stop(record, self.stop_grace if grace is None else grace)
            )
        await asyncio.shield(record.stop_task)
        if record.proxy_closed is not None:  # its public port is closed once stop returns
            await asyncio.shield(record.proxy_closed)
        return record.info

    async def sleep(
        self, container_id: str, idle_since: datetime | None = None, grace: float | None = None
    ) -> ContainerInfo:
        """Stop a running container's process for idleness; its public port stays open and
        the next connection starts it again (`_wake`). Refused (NOT_IDLE) while a client is
        connected, or if one connected after `idle_since`."""
        record = self._containers.get(container_id)
        if record is None:
            raise NotFound("this agent runs no such container", reason="CONTAINER_NOT_FOUND")
        if record.info.state is not ContainerState.RUNNING or record.stop_requested:
            raise FailedPrecondition(
                f"only a running container can sleep; this one is {record.info.state}",
                reason="NOT_RUNNING",
            )
        if record.info.sleep is SleepState.SLEEPING and not record.dozing:
            return self._view(record)
        proxy = record.proxy
        if not record.dozing:
            last = proxy.last_request_at if proxy is not None else None
            busy = proxy is not None and proxy.open > 0
            if (
                busy
                or record.info.sleep is SleepState.WAKING
                or (idle_since is not None and last is not None and last > idle_since)
            ):
                raise FailedPrecondition(
                    "the app is serving, or served a request after idle_since",
                    reason="NOT_IDLE",
                )
            await self._rest(record, self.stop_grace if grace is None else grace)
        elif record.supervisor is not None:  # another call is putting it to sleep
            await asyncio.shield(record.supervisor)
        return self._view(record)

    async def _rest(self, record: _Container, grace: float) -> None:
        """Puts an idle app to sleep: its process stops (the next connection starts it)."""
        record.dozing = True
        log.info("container going to sleep", extra={"container_id": record.info.container_id})
        await self._terminate(record, grace)
        if record.supervisor is not None:  # it records the sleep (or the end) of the run
            await asyncio.shield(record.supervisor)

    def inspect(self, container_id: str) -> ContainerInfo | None:
        record = self._containers.get(container_id)
        return self._view(record) if record else None

    def list(self) -> list[ContainerInfo]:
        return [self._view(record) for record in self._containers.values()]

    @staticmethod
    def _view(record: _Container) -> ContainerInfo:
        last = record.proxy.last_request_at if record.proxy is not None else None
        return record.info if last is None else record.info.with_changes(last_request_at=last)

    def logs(self, container_id: str) -> LogBuffer | None:
        record = self._containers.get(container_id)
        return record.logs if record else None

    def final_reading(self, container_id: str) -> ResourceSample | None:
        record = self._containers.get(container_id)
        return record.final if record else None

    def sample(self, container_id: str) -> ResourceSample | None:
        """RSS and CPU time of the container's process tree, and the bytes its proxy
        carried since it started. Once it has ended: the reading taken as it ended (CPU
        time exact from the kernel's account of the reaped process, RSS its peak, sampled
        at its end), so the interval after the last periodic sample is not lost."""
        record = self._containers.get(container_id)
        if record is None:
            return None
        if record.info.state.ended or record.info.sleep is SleepState.SLEEPING:
            return record.final
        return self._read(record)

    def _read(self, record: _Container) -> ResourceSample | None:
        """A live reading of the app: psutil on its process tree."""
        container_id = record.info.container_id
        if not record.info.pid:
            return None
        try:
            root = psutil.Process(record.info.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        rss, cpu = 0, 0.0
        for proc in tree:
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    times = proc.cpu_times()
                    # children_*: children already reaped, whose own entries are gone.
                    cpu += times.user + times.system + times.children_user + times.children_system
            except psutil.Error:
                continue
        rx, tx = self._network_bytes(record)
        cpu = max(0.0, cpu - record.cpu_base)
        return ResourceSample(
            container_id, rss, cpu, utcnow(), rx_bytes=rx, tx_bytes=tx, run=record.info.run
        )

    def subscribe(self, listener: ContainerListener) -> None:
        self._listeners.append(listener)

    async def close(self) -> None:
        self._closing = True
        live = [c.info.container_id for c in self._containers.values() if not c.info.state.ended]
        if live:
            log.info("stopping containers", extra={"count": len(live)})
        await asyncio.gather(*(self.stop(cid) for cid in live), return_exceptions=True)
        await cancel_and_wait(t for c in self._containers.values() for t in c.tasks if not t.done())
        for record in self._containers.values():  # ended by now; a failed supervisor's too
            self._close_proxy(record)
        closing = [c.proxy_closed for c in self._containers.values() if c.proxy_closed]
        await asyncio.gather(*closing, return_exceptions=True)
        self._leave_state_dir()

    # ------------------------------------------------------------------ process lifecycle

    def app_env(self, record: _Container) -> dict[str, str]:
        """What the app's environment holds: the base, its secrets, PORT, facts about it."""
        spec = record.spec
        return {
            **self.base_env,
            **spec.env,
            "PORT": str(record.private_port),
            "HANGAR_CONTAINER_ID": spec.container_id,
            "HANGAR_DEPLOYMENT_ID": spec.deployment_id,
            "HANGAR_PROJECT_ID": spec.project_id,
            "HANGAR_RAM_MB": str(spec.ram_mb),
            "HANGAR_CPU_MILLIS": str(spec.cpu_millis),
        }

    async def _launch(self, record: _Container) -> AppRun:
        """Starts a run of the app under its shim (OSError: it could not be started)."""
        spec = record.spec
        # A scratch working directory: never the agent's own (an app could serve it).
        # Kept across a sleep, as a container's filesystem is across a stop and start.
        if record.workdir is None:
            record.workdir = Path(
                tempfile.mkdtemp(prefix=f"hangar-{spec.container_id}-", dir=self.workdir_root)
            )
        home = self._home_of(record)
        record.cpu_base = 0.0
        return await runs.launch(
            home, ["/bin/sh", "-c", spec.command], env=self.app_env(record), cwd=record.workdir
        )

    async def _spawn(self, record: _Container) -> None:
        spec = record.spec
        try:
            run = await self._launch(record)
        except OSError as exc:
            self._release(record)
            self._close_proxy(record)
            self._set(
                record,
                state=ContainerState.FAILED,
                reason=f"could not start: {exc.strerror or exc}",
                ended_at=utcnow(),
            )
            record.ended.set()
            self._forget_old_ended()
            return
        self._track(record, run)
        self._set(record, pid=run.pid)
        log.info(
            "container started",
            extra={
                "container_id": spec.container_id,
                "pid": run.pid,
                "port": record.info.port,
                "private_port": record.private_port,
            },
        )

    def _track(self, record: _Container, run: AppRun) -> None:
        """Watches a run: its end (`exited`), its output (tailed), its health (supervisor)."""
        record.process = run
        record.exited = asyncio.ensure_future(self._reap(record, run))
        tail = asyncio.create_task(self._tail(record, record.exited))
        record.supervisor = asyncio.create_task(self._supervision(record, [tail]))
        record.tasks = [*(t for t in record.tasks if not t.done()), tail, record.supervisor]

    def _supervision(
        self, record: _Container, readers: Sequence[asyncio.Task[None]]
    ) -> Coroutine[Any, Any, None]:
        return self._supervise(record, readers)

    async def _supervise(self, record: _Container, readers: Sequence[asyncio.Task[None]]) -> None:
        try:
            await self._watch(record, readers)
        except Exception:  # never leave a container neither running nor ended
            log.exception("container supervisor crashed")
            record.failure = record.failure or "the agent lost track of the process"
            await self._signal(record, signal.SIGKILL)
            if record.exited is not None:
                self._finish(record, await asyncio.shield(record.exited))

    async def _watch(self, record: _Container, readers: Sequence[asyncio.Task[None]]) -> None:
        exited = record.exited
        assert exited is not None
        record.healthy_at = None
        healthy = await self._wait_healthy(record, exited)
        if healthy:
            record.ever_up = True  # it answered once: from now on a crash is restarted
        if healthy and not exited.done() and not record.stop_requested:
            self._set(record, state=ContainerState.RUNNING, sleep=SleepState.AWAKE)
            record.up.set()
            log.info("container running", extra={"container_id": record.info.container_id})
            self._warn_if_exposed(record)
            await self._keep_alive(record, exited)
        elif healthy is False and not record.stop_requested:
            cause = f"not healthy within {self.start_timeout:g}s"
            if record.ever_up and record.spec.restart_policy is not RestartPolicy.NEVER:
                record.killed_for = cause  # a restarted run that never answers: a crash
            else:
                record.failure = cause
            await self._terminate(record, self.stop_grace)
        returncode = await asyncio.shield(exited)
        _, pending = await asyncio.wait(readers, timeout=2.0)
        for task in pending:  # a pipe held open by a process outside the group
            task.cancel()
        try:
            if record.dozing and not record.stop_requested and not record.failure:
                self._doze(record)
            elif self._restarts(record, returncode):
                self._crashed(record, returncode)
            else:
                self._finish(record, returncode)
        finally:
            self._run_over(record)

    def _warn_if_exposed(self, record: _Container) -> None:
        """Apps share the host's network here, so one listening beyond loopback can be reached
        without the ingress proxy, unrouted and uncounted. Nothing short of a network namespace
        (an image driver) prevents it; the agent tells the app's owner in its logs."""
        exposed = sorted(_exposed_listeners(record.info.pid))
        if not exposed:
            return
        where = ", ".join(exposed)
        record.logs.append(
            LogStream.STDERR,
            f"[hangar agent] this app listens on {where}, beyond 127.0.0.1: clients must use "
            f"its Hangar address ({record.info.address}); bind 127.0.0.1 on $PORT "
            "to keep the port private",
        )
        log.warning(
            "app listens beyond loopback",
            extra={"container_id": record.info.container_id, "listening": where},
        )

    async def _wait_healthy(self, record: _Container, exited: asyncio.Future[int]) -> bool | None:
        """True once healthy, False on timeout, None if the process ended or was stopped."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if exited.done() or record.stop_requested:
                return None
            if await self._probe(record):
                return True
            await asyncio.wait({exited}, timeout=self.probe_interval)
        return None if exited.done() else False

    async def open_app(
        self, record: _Container
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the app's own port (its proxy's and health checks' way in)."""
        return await asyncio.open_connection("127.0.0.1", record.private_port, limit=CHUNK_BYTES)

    async def _probe(self, record: _Container, path: str | None = None) -> bool:
        """The app accepts a connection on its port or, with a health check path (or the
        `path` given: its liveness check's), answers it with a 2xx or 3xx status."""
        path = record.spec.health_check_path if path is None else path
        try:
            reader, writer = await asyncio.wait_for(self.open_app(record), 1.0)
        except (OSError, TimeoutError):
            return False
        try:
            if not path:
                return True
            writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            status = await asyncio.wait_for(reader.readline(), 1.0)
            parts = status.split()
            return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
        except (OSError, TimeoutError, ValueError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _stop(self, record: _Container, grace: float) -> None:
        record.stop_requested = True
        self._set(record, state=ContainerState.STOPPING)
        await self._settle_restart(record)
        await self._terminate(record, grace)
        if record.supervisor is not None:
            await asyncio.shield(record.supervisor)
        if not record.info.state.ended:  # asleep: no process was left to end it
            self._finish(record, record.reaped.returncode if record.reaped else 0)
        await record.ended.wait()

    async def _terminate(self, record: _Container, grace: float) -> None:
        """SIGTERM to the process group; SIGKILL if the app is still there after `grace`."""
        exited = record.exited
        if exited is None or exited.done():
            return
        await self._signal(record, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout=grace)
        except TimeoutError:
            log.info(
                "container ignored SIGTERM; killing",
                extra={"container_id": record.info.container_id, "grace_seconds": grace},
            )
            await self._signal(record, signal.SIGKILL)
            await asyncio.shield(exited)

    async def _signal(self, record: _Container, sig: signal.Signals) -> None:
        """Sends `sig` to every process of the app."""
        if record.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.process.pgid, sig)  # the shim made it a group of its own

    async def _reap(self, record: _Container, run: AppRun) -> int:
        """The run's end as its shim recorded it (wait4's status and usage)."""
        assert record.home is not None
        end = await runs.wait_end(run, record.home)
        if not end.known:
            record.failure = record.failure or LOST_RUN
        cpu = max(0.0, end.cpu_seconds - record.cpu_base)
        record.reaped = Reaped(end.returncode, cpu, end.max_rss_bytes)
        return end.returncode

    def _take_final(self, record: _Container, at: datetime) -> None:
        """The run's last reading: the kernel's account of the reaped process, the proxy's
        byte counts now, stamped `at` (the shipper bills the time since its last sample)."""
        if record.reaped is None:
            return
        rx, tx = self._network_bytes(record)
        record.final = ResourceSample(
            record.info.container_id,
            record.reaped.max_rss_bytes,
            record.reaped.cpu_seconds,
            at,
            rx_bytes=rx,
            tx_bytes=tx,
            run=record.info.run,
        )

    def _network_bytes(self, record: _Container) -> tuple[int | None, int | None]:
        """Cumulative bytes received and sent since the container started (its proxy's)."""
        counters = record.proxy.counters if record.proxy is not None else None
        if counters is None:
            return None, None
        return counters.rx_bytes, counters.tx_bytes

    def _doze(self, record: _Container) -> None:
        """The process stopped for sleep ended: the container sleeps until a connection."""
        record.dozing = False
        record.up = asyncio.Event()
        self._take_final(record, utcnow())
        self._set(record, sleep=SleepState.SLEEPING, pid=0)
        log.info("container asleep", extra={"container_id": record.info.container_id})

    async def _wake(self, record: _Container) -> None:
        """The proxy's before_connect: start a sleeping app again and wait until it answers
        (connections arriving meanwhile wait for the same start). While a crashed app is
        restarting, a connection waits for its next start the same way (`_until_up`)."""
        if record.ever_up and record.info.state is ContainerState.STARTING:
            await self._until_up(record)
            return
        if record.dozing and record.supervisor is not None:  # going to sleep: let it finish
            await asyncio.shield(record.supervisor)
        if record.info.sleep is SleepState.AWAKE:
            return
        if record.info.state.ended or record.stop_requested:
            raise Unavailable("the container has ended")
        if record.waking is None or record.waking.done():
            record.waking = asyncio.create_task(self._start_again(record))
            # Its connections may all be gone (the proxy closed) before it fails.
            record.waking.add_done_callback(_retrieve)
        await asyncio.shield(record.waking)

    async def _start_again(self, record: _Container) -> None:
        log.info("waking container", extra={"container_id": record.info.container_id})
        self._set(record, sleep=SleepState.WAKING, run=record.info.run + 1, started_at=utcnow())
        await self._spawn(record)
        await self._until_up(record)

    # ------------------------------------------------------------------ restarts and liveness

    async def _keep_alive(self, record: _Container, exited: asyncio.Future[int]) -> None:
        """While a healthy run lasts: once it has stayed up `stable_seconds` its crashes are
        forgotten (a crash loop is over), and its liveness check runs every period; failing
        `failure_threshold` times in a row, the app is stopped (and restarted per policy)."""
        rules, check = self.restart_rules, record.spec.liveness
        record.healthy_at = time.monotonic()
        stable_at: float | None = record.healthy_at + rules.stable_seconds
        next_check = record.healthy_at + check.period_seconds if check else math.inf
        failures = 0
        while not exited.done():
            wake_at = min(next_check, stable_at if stable_at is not None else math.inf)
            if wake_at == math.inf:
                await asyncio.wait({exited})
                return
            await asyncio.wait({exited}, timeout=max(0.0, wake_at - time.monotonic()))
            if exited.done() or record.stop_requested:
                return
            now = time.monotonic()
            if stable_at is not None and now >= stable_at:
                stable_at = None
                self._became_stable(record)
            if check is None or now < next_check:
                continue
            next_check = now + check.period_seconds
            if record.dozing or record.info.sleep is not SleepState.AWAKE:
                failures = 0  # asleep (frozen, or stopping for sleep): nothing to answer
                continue
            if await self._probe(record, check.path):
                failures = 0
                continue
            if exited.done() or record.stop_requested or record.dozing:
                continue
            failures += 1
            if failures >= check.failure_threshold:
                await self._fail_liveness(record, failures)
                return

    async def _fail_liveness(self, record: _Container, failures: int) -> None:
        check = record.spec.liveness
        assert check is not None
        record.killed_for = (
            f"liveness check failed {failures} times in a row "
            f"(GET {check.path} every {check.period_seconds:g}s)"
        )
        then = (
            "it is not started again (restart policy never)"
            if record.spec.restart_policy is RestartPolicy.NEVER
            else "it will be started again"
        )
        record.logs.append(
            LogStream.STDERR, f"{AGENT_NOTICE} {record.killed_for}: stopping the app; {then}"
        )
        log.warning(
            "container failed its liveness check",
            extra={"container_id": record.info.container_id, "failures": failures},
        )
        await self._terminate(record, self.stop_grace)

    def _became_stable(self, record: _Container) -> None:
        record.crashes.stable()
        if record.info.crash_loop:
            log.info("container stable again", extra={"container_id": record.info.container_id})
            self._set(record, crash_loop=False)

    def _restarts(self, record: _Container, returncode: int) -> bool:
        """Whether the run that just ended is followed by another: per its policy, and only
        for an app that has answered once (see services/agent/restarts.py)."""
        if not record.ever_up or record.stop_requested or record.failure or self._closing:
            return False
        return restarts_after(
            record.spec.restart_policy, returncode, killed_by_agent=bool(record.killed_for)
        )

    def _crashed(self, record: _Container, returncode: int) -> None:
        """The run ended on its own (or was killed for failing its checks): count the crash,
        say so in the app's logs, and start it again after the back-off. Its public port,
        working directory (or sandbox) and capacity stay: only the process goes."""
        rules = self.restart_rules
        reason = record.killed_for or record.kernel_reason or describe_exit(returncode)
        ran = time.monotonic() - record.healthy_at if record.healthy_at is not None else 0.0
        quick = ran < rules.stable_seconds  # never healthy counts as 0 s
        delay = record.crashes.crashed(rules, quick=quick)
        crash_loop = record.crashes.crash_loop(rules)
        lines = self._run_lines(record)
        record.killed_for = record.kernel_reason = ""
        record.up = asyncio.Event()
        record.healthy_at = None
        self._take_final(record, utcnow())
        record.log_mark = record.logs.last_sequence
        notice = f"{AGENT_NOTICE} the app ended ({reason}); starting it again in {delay:g}s"
        if crash_loop:
            notice += f" (crash loop: {record.crashes.quick} quick crashes in a row)"
        record.logs.append(LogStream.STDERR, notice)
        record.restart_due = time.monotonic() + delay
        self._set(
            record,
            state=ContainerState.STARTING,
            sleep=SleepState.AWAKE,
            pid=0,
            restarts=record.info.restarts + 1,  # counted now: runtime sees a new life begin
            last_exit_reason=reason,
            last_log_lines=lines,
            crash_loop=crash_loop,
            restart_delay=delay,
            next_restart_at=utcnow() + timedelta(seconds=delay),
        )
        log.warning(
            "container crashed; restarting after a back-off",
            extra={
                "container_id": record.info.container_id,
                "reason": reason,
                "backoff_seconds": delay,
                "crash_loop": crash_loop,
            },
        )
        record.restart = asyncio.create_task(self._restart_after(record, delay))
        record.tasks.append(record.restart)

    async def _restart_after(self, record: _Container, delay: float) -> None:
        await asyncio.sleep(delay)
        record.restart_due = None
        if record.stop_requested or record.info.state.ended or self._closing:
            return
        log.info("restarting container", extra={"container_id": record.info.container_id})
        self._set(
            record,
            run=record.info.run + 1,
            started_at=utcnow(),
            restart_delay=0.0,
            next_restart_at=None,
        )
        await self._spawn(record)

    async def _settle_restart(self, record: _Container) -> None:
        """For a stop: a back-off ends at once (no start follows); a start under way
        finishes first, so that the stop ends the process it started."""
        task = record.restart
        if task is None or task.done() or task is asyncio.current_task():
            return
        if record.restart_due is not None:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _until_up(self, record: _Container) -> None:
        """Holds a connection until the app's current run (during a back-off: its next one)
        answers its health check. Unavailable when that run ends first, when the container
        ends, or at once when the next start is further off than `hold_seconds`."""
        if record.up.is_set():
            return
        due = record.restart_due
        if due is not None and due - time.monotonic() > self.restart_rules.hold_seconds:
            raise Unavailable(
                f"the app is restarting after it ended ({record.info.last_exit_reason}); "
                f"next start in {due - time.monotonic():.0f}s"
            )
        waits = [
            asyncio.ensure_future(event.wait())
            for event in (record.up, record.ended, record.run_over)
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if not record.up.is_set():
            why = record.info.last_exit_reason if not record.info.state.ended else ""
            raise Unavailable(f"the app did not start again: {why or record.info.reason}")

    @staticmethod
    def _run_over(record: _Container) -> None:
        """Wakes whoever waits on the run that just ended; the next run gets a fresh event."""
        over, record.run_over = record.run_over, asyncio.Event()
        over.set()

    @staticmethod
    def _run_lines(record: _Container) -> tuple[str, ...]:
        """The app's last lines of its current run."""
        start = max(record.log_mark, record.logs.last_sequence - 100)
        return last_app_lines(record.logs.since(start))

    def _finish(self, record: _Container, returncode: int) -> None:
        ending = record.killed_for or record.kernel_reason or describe_exit(returncode)
        if record.failure:
            state, reason = ContainerState.FAILED, record.failure
        elif record.stop_requested:
            state, reason = ContainerState.STOPPED, "stopped"
        elif record.info.state is ContainerState.STARTING:
            state, reason = ContainerState.FAILED, f"{ending} during start-up"
        elif record.info.sleep is SleepState.WAKING:
            state, reason = ContainerState.FAILED, f"{ending} while waking from sleep"
        else:
            failed = returncode != 0 or record.killed_for
            state, reason = ContainerState.EXITED, ending if failed else ""
        if record.restart is not None and record.restart is not asyncio.current_task():
            record.restart.cancel()  # a pending restart: nothing starts after the end
        ended_at = utcnow()
        if record.info.sleep is not SleepState.SLEEPING:  # asleep: that run's reading stands
            self._take_final(record, ended_at)
        self._set(
            record,
            state=state,
            exit_code=exit_code_of(returncode),
            reason=reason,
            ended_at=ended_at,
            restart_delay=0.0,
            next_restart_at=None,
            last_log_lines=self._run_lines(record) if reason != "stopped" else (),
        )
        log.info(
            "container ended",
            extra={"container_id": record.info.container_id, "state": state, "reason": reason},
        )
        self._release(record)
        self._close_proxy(record)
        record.spec = replace(record.spec, env={})  # its secrets need not outlive it
        record.ended.set()
        self._forget_old_ended()

    async def _tail(self, record: _Container, exited: asyncio.Future[int]) -> None:
        """Reads the run's output files into its log buffer as the app writes them (a line
        longer than the limit is cut, its rest skipped), until the run has ended and all it
        wrote is read; writes down how far the lines are settled as runtime takes them."""
        tail = record.tail
        assert tail is not None
        reader = tail.open()
        try:
            delay = TAIL_POLL_SECONDS
            while True:
                over = exited.done()
                wrote = False
                while tail.read(record.logs, TAIL_READ_BYTES):
                    wrote = True
                    self._settle_logs(record)
                    await asyncio.sleep(0)  # a chatty app must not hold the loop
                self._settle_logs(record)
                if over:
                    break
                delay = TAIL_POLL_SECONDS if wrote else min(delay * 2, TAIL_IDLE_SECONDS)
                await asyncio.wait({exited}, timeout=delay)
            tail.finish(record.logs)
            self._settle_logs(record, now=True)
        finally:
            tail.close(reader)

    def _settle_logs(self, record: _Container, *, now: bool = False) -> None:
        """Moves the container's output cursor past settled lines, and writes it down at
        most once a second (at once when sequences must be reserved ahead)."""
        tail = record.tail
        if tail is None:
            return
        if tail.settle(record.logs):
            tail.dirty = True
        if tail.reserve(record.logs) or (
            tail.dirty and (now or time.monotonic() - tail.saved_at >= 1.0)
        ):
            self._save(record)

    # ------------------------------------------------------------------ bookkeeping

    def _set(self, record: _Container, **changes: object) -> None:
        record.info = record.info.with_changes(**changes)
        for listener in self._listeners:
            try:
                listener(record.info)
            except Exception:  # a broken listener must not break the container
                log.exception("container listener failed")

    @staticmethod
    def _close_proxy(record: _Container) -> None:
        """Closes the container's public port and its live connections (in the background;
        `stop` and `close` wait for it). Its counters stay readable."""
        if record.proxy is not None and record.proxy_closed is None:
            record.proxy_closed = asyncio.ensure_future(record.proxy.close())

    async def _listen(self) -> tuple[IngressProxy, int]:
        """The container's proxy, listening on a public port, and its app's private port."""
        for _ in range(10):
            private_port = self._free_port()
            proxy = IngressProxy(self.listen_host)
            try:
                await proxy.start(0, private_port)
            except OSError as exc:
                raise Unavailable(
                    f"cannot listen for the container: {exc.strerror or exc}",
                    reason="NO_FREE_PORT",
                ) from exc
            if proxy.port != private_port:  # the probe's port was free again: not that one
                return proxy, private_port
            await proxy.close()
        raise Unavailable("no free port on this server", reason="NO_FREE_PORT")

    def _free_port(self) -> int:
        """A port nothing listens on now, and not promised to another live container."""
        taken = {
            port
            for c in self._containers.values()
            if not c.info.state.ended
            for port in (c.info.port, c.private_port)
        }
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("", 0))
                port = int(probe.getsockname()[1])
            if port not in taken:
                return port
        raise Unavailable("no free port on this server", reason="NO_FREE_PORT")

    def _release(self, record: _Container) -> None:
        """Frees what the container held on this server once it has ended."""
        if record.workdir is not None:
            shutil.rmtree(record.workdir, ignore_errors=True)
            record.workdir = None
        if record.tail is not None:
            record.tail.close()
        if record.home is not None:
            record.home.remove()
            record.home = None

    def _forget_old_ended(self) -> None:
        ended = [cid for cid, c in self._containers.items() if c.info.state.ended]
        for cid in ended[: max(0, len(ended) - self.keep_ended)]:
            del self._containers[cid]

    # ------------------------------------------------------------------ adoption (runs.py)

    def _home_of(self, record: _Container) -> AppHome:
        """The container's directory (made at its first run), its record written down:
        both exist before the shim that writes its run there."""
        if record.home is None:
            home = AppHome(self._apps / record.info.container_id)
            home.create()
            record.home, record.tail = home, LogTail(home)
            record.tail.reserve(record.logs)
        self._save(record)
        return record.home

    def _saved(self, record: _Container) -> dict[str, Any]:
        """What a later agent needs to adopt the container (the container driver adds its
        sandbox's)."""
        assert record.tail is not None
        return adoption.container_record(
            self.isolation,
            record.spec,
            self._view(record),
            private_port=record.private_port,
            workdir=str(record.workdir or ""),
            ever_up=record.ever_up,
            logs=record.tail.saved(),
        )

    def _save(self, record: _Container) -> None:
        """Writes the container's record down (not once it has ended: its files go)."""
        if record.home is None or record.tail is None or record.info.state.ended:
            return
        try:
            record.home.save(self._saved(record))
        except OSError as exc:
            log.warning(
                "cannot write the container's record",
                extra={"container_id": record.info.container_id, "error": str(exc)},
            )
            return
        record.tail.saved_at = time.monotonic()
        record.tail.dirty = False

    def _save_on_change(self, info: ContainerInfo) -> None:
        record = self._containers.get(info.container_id)
        if record is not None:
            self._save(record)

    async def adopt(self) -> None:
        """Takes over what an earlier agent of this state directory left (call once, before
        serving): a run still going is watched again where it was (logs from where they were
        settled, health, its public port if free), a run that ended meanwhile ends the
        container with its exit status (or restarts it, per its policy), a sleeping one
        sleeps on. What cannot be adopted is ended and removed."""
        if self._adopted:
            return
        self._adopted = True
        self._lock_state_dir()
        homes = [AppHome(d) for d in sorted(self._apps.iterdir()) if d.is_dir()]
        for home in homes:
            saved: dict[str, Any] = {}
            try:
                saved = home.load()
                spec, info = adoption.spec_and_info(saved, self.isolation)
                if info.state.ended or spec.container_id != home.container_id:
                    raise ValueError("not a live container of this directory")
                await self._adopt(home, saved, spec, info)
            except (OSError, ValueError, KeyError, TypeError, Unavailable) as exc:
                log.warning(
                    "cannot adopt a container an earlier agent left; ending it",
                    extra={"container_id": home.container_id, "error": str(exc)},
                )
                failed = self._containers.pop(home.container_id, None)
                if failed is not None and failed.proxy is not None:
                    await failed.proxy.close()
                self._discard(home, saved)
        await self._clear_leftovers()

    async def _adopt(
        self, home: AppHome, saved: dict[str, Any], spec: ContainerSpec, info: ContainerInfo
    ) -> None:
        tail = LogTail(home, saved.get("logs"))
        record = _Container(
            spec=spec,
            info=info,
            logs=LogBuffer(self.log_lines, self.max_line_chars),
            private_port=int(saved["private_port"]),
            workdir=Path(saved["workdir"]) if saved.get("workdir") else None,
            home=home,
            tail=tail,
            ever_up=bool(saved.get("ever_up")),
        )
        # Lines go on past every sequence the earlier agent could have issued.
        record.logs.resume_after(tail.issued_upto)
        tail.reserve(record.logs)
        tail.catch_up(record.logs)
        await self._restore_sandbox(record, saved)
        proxy = await self._relisten(record, info.port)
        proxy.last_request_at = info.last_request_at
        proxy.before_connect = functools.partial(self._wake, record)
        proxy.open_app = functools.partial(self.open_app, record)
        record.proxy = proxy
        self._containers[spec.container_id] = record
        changes: dict[str, Any] = {
            "port": proxy.port,
            "address": f"{self.advertise_host}:{proxy.port}",
        }
        spawn = False
        run = runs.find_run(home)
        if run is not None and run.shim_alive():  # still running: watched again
            record.info = record.info.with_changes(pid=run.pid)
            changes.update(pid=run.pid, started_at=utcnow())  # metered from here
            self._meter_from_now(record, live=True)
            self._track(record, run)
        elif run is not None and run.pid == info.pid:  # it ended while no agent watched
            self._meter_from_now(record, live=False)
            self._track(record, run)
        elif info.sleep is not SleepState.AWAKE:  # asleep: the next connection wakes it
            changes.update(sleep=SleepState.SLEEPING, pid=0)
        elif record.ever_up and info.next_restart_at is not None:  # in a restart's back-off
            delay = max(0.0, (info.next_restart_at - utcnow()).total_seconds())
            record.restart_due = time.monotonic() + delay
            record.restart = asyncio.create_task(self._restart_after(record, delay))
            record.tasks.append(record.restart)
        else:  # taken but never started (the earlier agent ended in between): start it
            spawn = True
        self._set(record, **changes)
        log.info(
            "container adopted",
            extra={"container_id": spec.container_id, "pid": record.info.pid, "port": proxy.port},
        )
        if spawn:
            await self._spawn(record)
        if info.state is ContainerState.STOPPING:  # the earlier agent was stopping it
            record.tasks.append(asyncio.create_task(self._stop_adopted(spec.container_id)))

    async def _stop_adopted(self, container_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.stop(container_id)

    async def _relisten(self, record: _Container, port: int) -> IngressProxy:
        """The container's proxy again: on its public port if that is free, else another."""
        proxy = IngressProxy(self.listen_host)
        try:
            await proxy.start(port, record.private_port)
            return proxy
        except OSError as exc:
            log.warning(
                "the container's public port is taken: it gets another",
                extra={"container_id": record.info.container_id, "port": port, "error": str(exc)},
            )
        proxy = IngressProxy(self.listen_host)
        try:
            await proxy.start(0, record.private_port)
        except OSError as exc:
            raise Unavailable(f"cannot listen for the container: {exc}") from exc
        return proxy

    def _meter_from_now(self, record: _Container, *, live: bool) -> None:
        """An adopted run is metered from now on (what it used while no agent watched is
        not): its CPU so far is the base of its readings."""
        reading = self._read(record) if live else None
        record.cpu_base = reading.cpu_seconds if reading is not None else math.inf

    async def _restore_sandbox(self, record: _Container, saved: dict[str, Any]) -> None:
        """What else an adopted container holds (the container driver's network, bundle)."""

    def _discard(self, home: AppHome, saved: dict[str, Any]) -> None:
        """Ends and removes a container that cannot be adopted: its run, its files."""
        run = runs.find_run(home)
        if run is not None:
            runs.kill_run(run)
        workdir = str(saved.get("workdir") or "")
        if Path(workdir).name.startswith("hangar-"):
            shutil.rmtree(workdir, ignore_errors=True)
        home.remove()

    async def _clear_leftovers(self) -> None:
        """After adoption: removes what an earlier agent left that no container holds (the
        container driver's runc containers, namespaces and bundles)."""

    def _lock_state_dir(self) -> None:
        """One agent per state directory: a second one would take the first one's apps."""
        fd = os.open(self.state_dir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another agent uses the state directory {self.state_dir}") from None
        self._state_lock = fd

    def _leave_state_dir(self) -> None:
        if self._state_lock >= 0:
            os.close(self._state_lock)
            self._state_lock = -1
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Marks a task's failure as seen (it was told to whoever still waited on it)."""
    if not task.cancelled():
        task.exception()


def _exposed_listeners(pid: int) -> set[str]:
    """The non-loopback addresses a process tree listens on (TCP), as "ip:port"."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return set()
    found = set()
    for proc in tree:
        try:
            connections = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for conn in connections:
            if conn.status != psutil.CONN_LISTEN or not conn.laddr:
                continue
            ip, port = conn.laddr.ip, conn.laddr.port
            if not ipaddress.ip_address(ip.split("%")[0]).is_loopback:
                found.add(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return found


@dataclass(frozen=True)
class Reaped:
    """How a container's process ended, and what it used (the kernel's account at reaping)."""

    returncode: int  # as Popen: negative for a signal
    cpu_seconds: float  # user + system of the process and every child it waited for
    max_rss_bytes: int  # the peak resident set of the process or of one such child
