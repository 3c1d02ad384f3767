"""`ProcessDriver`'s restarts and liveness: the driver's side of the rules in
services/agent/restarts.py (back-off waits, liveness checks, connections held meanwhile)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import timedelta

from services.agent.domain import (
    AGENT_NOTICE,
    ContainerState,
    LogStream,
    RestartPolicy,
    SleepState,
    describe_exit,
    utcnow,
)
from services.agent.driver_base import DriverBase, _Container
from services.agent.restarts import last_app_lines, restarts_after
from shared.errors import Unavailable

log = logging.getLogger("hangar.agent")


class RestartMixin(DriverBase):
    """Restarts crashed apps after a back-off; checks a running app's liveness."""

    async def _keep_alive(self, record: _Container, exited: asyncio.Future[int]) -> None:
        """While a healthy run lasts: once it has stayed up `stable_seconds` its crashes are
        forgotten (a crash loop is over), and its liveness check runs every period; failing
        `failure_threshold` times in a row, the app is stopped (and restarted per policy)."""
        # A worker serves no HTTP: nothing to check its liveness with but that it runs.
        rules = self.restart_rules
        check = record.spec.liveness if record.spec.serves_http else None
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
