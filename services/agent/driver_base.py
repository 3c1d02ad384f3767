"""The parts of the agent's drivers that every other part uses: the `Driver` interface, the
driver's record of one container (`_Container`), and `DriverBase`, which the mixins that
make up `ProcessDriver` (services/agent/drivers.py) build on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from services.agent.domain import ContainerInfo, ContainerSpec, LogBuffer, ResourceSample
from services.agent.proxy import IngressProxy
from services.agent.restarts import CrashCount, RestartRules
from services.agent.runs import AppHome, AppRun, LogTail

log = logging.getLogger("hangar.agent")

ContainerListener = Callable[[ContainerInfo], None]

# Only these of the agent's own variables reach apps: never its secrets or tokens.
INHERITED_ENV = ("PATH", "HOME", "LANG")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
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

    async def wake(self, container_id: str) -> ContainerInfo:
        """Wake a sleeping container (a no-op when awake); returns once its app answers."""
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
    build: asyncio.Task[None] | None = None  # its build (then first run), while under way


@dataclass(frozen=True)
class Reaped:
    """How a container's process ended, and what it used (the kernel's account at reaping)."""

    returncode: int  # as Popen: negative for a signal
    cpu_seconds: float  # user + system of the process and every child it waited for
    max_rss_bytes: int  # the peak resident set of the process or of one such child


class DriverBase:
    """What the driver's parts (the mixins below ProcessDriver) share: its settings and
    containers, the bookkeeping every part uses, and, for type checking only, the methods
    one part calls on another (each defined once, in the module named above it)."""

    runs_images: bool
    isolation: str
    advertise_host: str
    listen_host: str
    start_timeout: float
    stop_grace: float
    log_lines: int
    max_line_chars: int
    keep_ended: int
    probe_interval: float
    base_env: dict[str, str]
    workdir_root: str | None
    state_dir: Path
    restart_rules: RestartRules
    _own_state_dir: bool
    _apps: Path
    _state_lock: int
    _adopted: bool
    _containers: dict[str, _Container]
    _listeners: list[ContainerListener]
    _lock: asyncio.Lock
    _closing: bool

    @staticmethod
    def _view(record: _Container) -> ContainerInfo:
        last = record.proxy.last_request_at if record.proxy is not None else None
        return record.info if last is None else record.info.with_changes(last_request_at=last)

    def _set(self, record: _Container, **changes: object) -> None:
        record.info = record.info.with_changes(**changes)
        for listener in self._listeners:
            try:
                listener(record.info)
            except Exception:  # a broken listener must not break the container
                log.exception("container listener failed")

    def _forget_old_ended(self) -> None:
        ended = [cid for cid, c in self._containers.items() if c.info.state.ended]
        for cid in ended[: max(0, len(ended) - self.keep_ended)]:
            del self._containers[cid]

    if TYPE_CHECKING:
        # drivers.py (ProcessDriver): the Driver interface
        async def stop(self, container_id: str, grace: float | None = None) -> ContainerInfo: ...
        def _read(self, record: _Container) -> ResourceSample | None: ...
        # driver_lifecycle.py: a run's launch, supervision, stop and end
        async def _spawn(self, record: _Container) -> None: ...
        def _track(self, record: _Container, run: AppRun) -> None: ...
        async def _stop(self, record: _Container, grace: float) -> None: ...
        async def _terminate(self, record: _Container, grace: float) -> None: ...
        def _take_final(self, record: _Container, at: datetime) -> None: ...
        # driver_ingress.py: ports, the ingress proxy, health probes
        async def open_app(
            self, record: _Container
        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...
        async def _probe(self, record: _Container, path: str | None = None) -> bool: ...
        async def _listen(self) -> tuple[IngressProxy, int]: ...
        async def _relisten(self, record: _Container, port: int) -> IngressProxy: ...
        @staticmethod
        def _close_proxy(record: _Container) -> None: ...
        def _network_bytes(self, record: _Container) -> tuple[int | None, int | None]: ...
        def _warn_if_exposed(self, record: _Container) -> None: ...
        # driver_sleep.py: sleep and wake
        async def _rest(self, record: _Container, grace: float) -> None: ...
        def _doze(self, record: _Container) -> None: ...
        async def _wake(self, record: _Container) -> None: ...
        # driver_restarts.py: restarts and liveness
        async def _keep_alive(self, record: _Container, exited: asyncio.Future[int]) -> None: ...
        def _restarts(self, record: _Container, returncode: int) -> bool: ...
        def _crashed(self, record: _Container, returncode: int) -> None: ...
        async def _restart_after(self, record: _Container, delay: float) -> None: ...
        async def _settle_restart(self, record: _Container) -> None: ...
        async def _until_up(self, record: _Container) -> None: ...
        @staticmethod
        def _run_over(record: _Container) -> None: ...
        @staticmethod
        def _run_lines(record: _Container) -> tuple[str, ...]: ...
        # driver_adoption.py: records and adoption
        def _home_of(self, record: _Container) -> AppHome: ...
        def _save(self, record: _Container) -> None: ...
        def _save_on_change(self, info: ContainerInfo) -> None: ...
        def _leave_state_dir(self) -> None: ...
