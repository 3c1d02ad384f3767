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
import functools
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import IO, Protocol, TypeVar

import psutil

from services.agent.domain import (
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    LogBuffer,
    LogStream,
    ResourceSample,
    SleepState,
    describe_exit,
    exit_code_of,
    utcnow,
)
from services.agent.proxy import CHUNK_BYTES, IngressProxy
from shared.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from shared.loops import cancel_and_wait

log = logging.getLogger("hangar.agent")

ContainerListener = Callable[[ContainerInfo], None]
T = TypeVar("T")

# Only these of the agent's own variables reach apps: never its secrets or tokens.
INHERITED_ENV = ("PATH", "HOME", "LANG")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


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
    process: subprocess.Popen[bytes] | None = None
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


class ProcessDriver:
    """Runs each container as `/bin/sh -c COMMAND` in its own process group.

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
        self._containers: dict[str, _Container] = {}
        self._listeners: list[ContainerListener] = []
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

    async def _launch(self, record: _Container) -> subprocess.Popen[bytes]:
        """Starts the app's process with its output on pipes (OSError: it could not)."""
        spec = record.spec
        # A scratch working directory: never the agent's own (an app could serve it).
        # Kept across a sleep, as a container's filesystem is across a stop and start.
        if record.workdir is None:
            record.workdir = Path(
                tempfile.mkdtemp(prefix=f"hangar-{spec.container_id}-", dir=self.workdir_root)
            )
        return _popen(["/bin/sh", "-c", spec.command], env=self.app_env(record), cwd=record.workdir)

    async def _spawn(self, record: _Container) -> None:
        spec = record.spec
        try:
            process = await self._launch(record)
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
        record.process = process
        record.exited = asyncio.ensure_future(self._reap(record, process))
        self._set(record, pid=process.pid)
        log.info(
            "container started",
            extra={
                "container_id": spec.container_id,
                "pid": process.pid,
                "port": record.info.port,
                "private_port": record.private_port,
            },
        )
        assert process.stdout is not None and process.stderr is not None
        readers = [
            asyncio.create_task(self._read_lines(record, process.stdout, LogStream.STDOUT)),
            asyncio.create_task(self._read_lines(record, process.stderr, LogStream.STDERR)),
        ]
        record.supervisor = asyncio.create_task(self._supervise(record, readers))
        record.tasks = [*(t for t in record.tasks if not t.done()), *readers, record.supervisor]

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
        healthy = await self._wait_healthy(record, exited)
        if healthy and not exited.done() and not record.stop_requested:
            self._set(record, state=ContainerState.RUNNING, sleep=SleepState.AWAKE)
            record.up.set()
            log.info("container running", extra={"container_id": record.info.container_id})
            self._warn_if_exposed(record)
        elif healthy is False and not record.stop_requested:
            record.failure = f"not healthy within {self.start_timeout:g}s"
            await self._terminate(record, self.stop_grace)
        returncode = await asyncio.shield(exited)
        _, pending = await asyncio.wait(readers, timeout=2.0)
        for task in pending:  # a pipe held open by a process outside the group
            task.cancel()
        if record.dozing and not record.stop_requested and not record.failure:
            self._doze(record)
            return
        self._finish(record, returncode)

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

    async def _probe(self, record: _Container) -> bool:
        """The app accepts a connection on its port or, with a health check path, answers
        it with a 2xx or 3xx status."""
        path = record.spec.health_check_path
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
            os.killpg(record.process.pid, sig)  # start_new_session: pgid == pid

    async def _reap(self, record: _Container, process: subprocess.Popen[bytes]) -> int:
        record.reaped = await _wait_exit(process)
        return record.reaped.returncode

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
        (connections arriving meanwhile wait for the same start)."""
        if record.dozing and record.supervisor is not None:  # going to sleep: let it finish
            await asyncio.shield(record.supervisor)
        if record.info.sleep is SleepState.AWAKE:
            return
        if record.info.state.ended or record.stop_requested:
            raise Unavailable("the container has ended")
        if record.waking is None or record.waking.done():
            record.waking = asyncio.create_task(self._start_again(record))
        await asyncio.shield(record.waking)

    async def _start_again(self, record: _Container) -> None:
        log.info("waking container", extra={"container_id": record.info.container_id})
        self._set(record, sleep=SleepState.WAKING, run=record.info.run + 1, started_at=utcnow())
        await self._spawn(record)
        ended = asyncio.ensure_future(record.ended.wait())
        up = asyncio.ensure_future(record.up.wait())
        try:
            await asyncio.wait({ended, up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            up.cancel()
        if not record.up.is_set():
            raise Unavailable(f"the app did not start again: {record.info.reason}")

    def _finish(self, record: _Container, returncode: int) -> None:
        ending = record.kernel_reason or describe_exit(returncode)
        if record.failure:
            state, reason = ContainerState.FAILED, record.failure
        elif record.stop_requested:
            state, reason = ContainerState.STOPPED, "stopped"
        elif record.info.state is ContainerState.STARTING:
            state, reason = ContainerState.FAILED, f"{ending} during start-up"
        elif record.info.sleep is SleepState.WAKING:
            state, reason = ContainerState.FAILED, f"{ending} while waking from sleep"
        else:
            state, reason = ContainerState.EXITED, "" if returncode == 0 else ending
        ended_at = utcnow()
        if record.info.sleep is not SleepState.SLEEPING:  # asleep: that run's reading stands
            self._take_final(record, ended_at)
        self._set(
            record,
            state=state,
            exit_code=exit_code_of(returncode),
            reason=reason,
            ended_at=ended_at,
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

    async def _read_lines(self, record: _Container, pipe: IO[bytes], stream: LogStream) -> None:
        """Splits output into lines; a line longer than the limit is cut, its rest skipped."""
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            await self._split_lines(record, reader, stream)
        finally:
            # Closed here, which closes `pipe` too. uvloop leaves the transport open at EOF;
            # left to the garbage collector, the transport and the pipe's file object each
            # closed the descriptor, the second time after a new process (a wake) had been
            # given that number: its output pipe broke and the app died of SIGPIPE.
            transport.close()

    @staticmethod
    async def _split_lines(
        record: _Container, reader: asyncio.StreamReader, stream: LogStream
    ) -> None:
        limit = record.logs.max_line_chars
        pending = bytearray()
        skipping = False
        while chunk := await reader.read(64 * 1024):
            pending += chunk
            while (end := pending.find(b"\n")) >= 0:
                line = bytes(pending[:end])
                del pending[: end + 1]
                if skipping:
                    skipping = False
                    continue
                record.logs.append(stream, _decode(line))
            if len(pending) > limit:
                if not skipping:
                    record.logs.append(stream, _decode(bytes(pending[:limit])))
                    record.logs.trimmed += 1
                    skipping = True
                pending.clear()
        if pending and not skipping:
            record.logs.append(stream, _decode(bytes(pending)))

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

    def _forget_old_ended(self) -> None:
        ended = [cid for cid, c in self._containers.items() if c.info.state.ended]
        for cid in ended[: max(0, len(ended) - self.keep_ended)]:
            del self._containers[cid]


def _popen(
    args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Starts a process in its own session with its output on pipes.

    Popen, not the loop's subprocess API: CPython spawns with vfork, while uvloop forks and
    gRPC's fork handlers then crash the child now and then (SIGSEGV).
    """
    return subprocess.Popen(
        list(args),
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: signals reach the whole app
    )


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


def _reap(process: subprocess.Popen[bytes]) -> Reaped:
    """Reap an ended process with wait4, which also returns its resource usage."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # Popen sees it reaped
    return Reaped(process.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


async def _wait_exit(process: subprocess.Popen[bytes]) -> Reaped:
    """The returncode once the process ends, reaped by us (not by the loop's child watcher).

    Whatever is left in its process group (background children) is killed with it, before
    the reap: until then the exited leader holds its pid, so the group id cannot be reused.
    """
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): a thread blocks in waitpid
        return await _wait_in_thread(process)
    readable: asyncio.Future[None] = loop.create_future()
    loop.add_reader(pidfd, _resolve, readable, None)
    try:
        await readable
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    _kill_group(process.pid)
    return _reap(process)  # it has ended: reaps at once


async def _wait_in_thread(process: subprocess.Popen[bytes]) -> Reaped:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Reaped] = loop.create_future()

    def wait() -> None:
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped yet
        _kill_group(process.pid)
        reaped = _reap(process)
        loop.call_soon_threadsafe(_resolve, done, reaped)

    threading.Thread(target=wait, name=f"wait-{process.pid}", daemon=True).start()
    return await done


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _decode(raw: bytes) -> str:
    return raw.rstrip(b"\r").decode("utf-8", errors="replace")
