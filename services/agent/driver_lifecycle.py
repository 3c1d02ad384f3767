"""`ProcessDriver`'s process lifecycle: a run's launch under its shim, its supervision
(health, output, end), its stop (SIGTERM, then SIGKILL) and the container's end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from services.agent import runs
from services.agent.domain import (
    ContainerState,
    ResourceSample,
    RestartPolicy,
    SleepState,
    describe_exit,
    exit_code_of,
    utcnow,
)
from services.agent.driver_base import LOST_RUN, DriverBase, Reaped, _Container
from services.agent.runs import AppRun

log = logging.getLogger("hangar.agent")

# How often a quiet app's output files are read (sooner after it wrote).
TAIL_POLL_SECONDS = 0.02
TAIL_IDLE_SECONDS = 0.25
# Output read per file at once: few enough lines that the sequences reserved ahead hold.
TAIL_READ_BYTES = 128 * 1024


class LifecycleMixin(DriverBase):
    """Starts, watches, signals and stops a container's runs; ends the container."""

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
            "HANGAR_RAM_MB": str(spec.resources.ram_mb),
            "HANGAR_CPU_MILLIS": str(spec.resources.cpu_millis),
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

    async def _wait_healthy(self, record: _Container, exited: asyncio.Future[int]) -> bool | None:
        """True once healthy, False on timeout, None if the process ended or was stopped.
        A worker (no HTTP) is healthy once it runs."""
        if not record.spec.serves_http:
            return None if exited.done() or record.stop_requested else True
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if exited.done() or record.stop_requested:
                return None
            if await self._probe(record):
                return True
            await asyncio.wait({exited}, timeout=self.probe_interval)
        return None if exited.done() else False

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
