"""How the agent runs containers: the `Driver` interface, and `ProcessDriver`, which runs a
command line as a local process group on a free private port (its PORT) behind the agent's
ingress proxy (services/agent/proxy.py) on the container's public port, which counts the
app's network bytes.

A Docker driver implements the same interface later (`runs_images = True`); the servicer
only ever talks to a `Driver`.

`ProcessDriver` is the `Driver` interface over mixins, one per concern, which the container
driver (containers.py) overrides hooks of: driver_lifecycle.py (launch, supervision, stop,
end), driver_sleep.py, driver_restarts.py (restarts and liveness), driver_adoption.py
(records and adoption), driver_ingress.py (ports, proxy, probes); driver_base.py holds the
interface, the container record and what the mixins share.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import psutil

from services.agent import runs
from services.agent.domain import (
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    LogBuffer,
    ResourceSample,
    SleepState,
    utcnow,
)
from services.agent.driver_adoption import AdoptionMixin
from services.agent.driver_base import (
    DEFAULT_PATH,
    INHERITED_ENV,
    LOST_RUN,
    ContainerListener,
    Driver,
    Reaped,
    _Container,
    inherited_env,
)
from services.agent.driver_ingress import IngressMixin
from services.agent.driver_lifecycle import (
    TAIL_IDLE_SECONDS,
    TAIL_POLL_SECONDS,
    TAIL_READ_BYTES,
    LifecycleMixin,
)
from services.agent.driver_restarts import RestartMixin
from services.agent.driver_sleep import SleepMixin
from services.agent.restarts import RestartRules
from shared.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from shared.loops import cancel_and_wait

log = logging.getLogger("hangar.agent")

__all__ = [
    "DEFAULT_PATH",
    "INHERITED_ENV",
    "LOST_RUN",
    "TAIL_IDLE_SECONDS",
    "TAIL_POLL_SECONDS",
    "TAIL_READ_BYTES",
    "ContainerListener",
    "Driver",
    "ProcessDriver",
    "Reaped",
    "inherited_env",
]


class ProcessDriver(LifecycleMixin, SleepMixin, RestartMixin, AdoptionMixin, IngressMixin):
    """Runs each container as `/bin/sh -c COMMAND` in its own process group, under a shim
    that owns the run (runs.py): apps outlive the agent, and the next agent of the same
    state directory adopts them (`adopt`).

    The app listens on its PORT, a free private port that health checks probe directly;
    clients reach it through the agent's ingress proxy on the public port that `start`
    returns (on `listen_host`: empty for every interface), which counts bytes both ways.
    """

    runs_images = False
    isolation = "none"
    builds = False  # builds (tenant code) run only in the container sandbox

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

    async def start(self, spec: ContainerSpec) -> ContainerInfo:
        spec.validate()
        if spec.image and not self.runs_images:
            raise FailedPrecondition("this agent has no image driver", reason="NO_IMAGE_DRIVER")
        if (spec.source_sha256 or spec.slug_sha256) and not self.builds:
            raise FailedPrecondition(
                "this agent runs no container sandbox, which builds and slugs need",
                reason="NO_BUILD_SANDBOX",
            )
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

    def inspect(self, container_id: str) -> ContainerInfo | None:
        record = self._containers.get(container_id)
        return self._view(record) if record else None

    def list(self) -> list[ContainerInfo]:
        return [self._view(record) for record in self._containers.values()]

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
