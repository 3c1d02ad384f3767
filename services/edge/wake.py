"""Waking a sleeping app at the edge.

A request for a project whose containers are all asleep is held by Caddy (the DNS answers
the HOLD target, dns.py; the route's try_duration is the wake hold, caddy.py) while the
`RouteWaker` asks runtime's `WakeRoute` to wake them: once per project however many
requests wait (no call while one is in flight, nor after one succeeded until the table is
read again), with a deadline shorter than the hold. Runtime wakes every sleeping container
of the project through their agents and writes `route.changed`; the waker also has the
controller re-read the table at once, so the DNS lists the containers and Caddy's held
requests go through.

A wake that fails holds its reason for `failed_seconds`: meanwhile the DNS points the
project at `WakePages`, a loopback HTTP server answering 503 with that reason, so held
requests end with Hangar's page at once instead of waiting out the hold. The next request
after that tries again. Two edges each ask on their own; runtime's wake is idempotent.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from services.edge.caddy import page_html
from services.edge.loopback import LoopbackHttp

log = logging.getLogger("hangar.edge")

# A successful wake is not asked again before the table is read again (which lists the
# containers awake), nor for this long if no read comes.
QUIET_SECONDS = 2.0
# A failed wake's page answers the project's requests this long, then a request tries again.
FAILED_SECONDS = 5.0


class RouteWaker:
    """Asks runtime to wake sleeping projects, one call per project at a time."""

    def __init__(
        self,
        wake: Callable[[str], Awaitable[object]],
        *,
        on_done: Callable[[], None] | None = None,
        quiet_seconds: float = QUIET_SECONDS,
        failed_seconds: float = FAILED_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wake = wake
        self.on_done = on_done  # the controller's re-read, after every call
        self.quiet_seconds = quiet_seconds
        self.failed_seconds = failed_seconds
        self.clock = clock
        self._calls: dict[str, asyncio.Task[None]] = {}
        self._woken_at: dict[str, float] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # project -> (reason, until)
        self.wanted_calls = 0  # lookups of sleeping projects (requests waiting, in bursts)
        self.asked = 0  # WakeRoute calls made (metrics, tests)
        self.failed = 0

    def wanted(self, project_id: str) -> None:
        """A request waits for this project: wake it unless that is under way or just done."""
        self.wanted_calls += 1
        now = self.clock()
        if project_id in self._calls or self.failure(project_id) is not None:
            return
        if now - self._woken_at.get(project_id, -self.quiet_seconds) < self.quiet_seconds:
            return
        self.asked += 1
        # From a fresh context: the call must not carry whatever context the DNS ran in.
        task = contextvars.Context().run(asyncio.ensure_future, self._call(project_id))
        self._calls[project_id] = task

    def table_applied(self) -> None:
        """A table read after the last wakes is applied: it lists what they woke, so a project
        still asleep in it is asleep again (or was not woken) and may be asked for again."""
        self._woken_at.clear()

    def failure(self, project_id: str) -> str | None:
        failed = self._failed.get(project_id)
        if failed is None:
            return None
        reason, until = failed
        if self.clock() >= until:
            del self._failed[project_id]
            return None
        return reason

    async def _call(self, project_id: str) -> None:
        started = time.perf_counter()
        try:
            await self.wake(project_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed += 1
            reason = _reason(exc)
            self._failed[project_id] = (reason, self.clock() + self.failed_seconds)
            log.warning("wake failed", extra={"project_id": project_id, "reason": reason})
        else:
            self._woken_at[project_id] = self.clock()
            log.info(
                "project woken",
                extra={
                    "project_id": project_id,
                    "wake_ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )
        finally:
            self._calls.pop(project_id, None)
        if self.on_done is not None:
            self.on_done()

    async def close(self) -> None:
        calls = list(self._calls.values())
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


def _reason(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
            return "it did not wake in time"
        if exc.code() is grpc.StatusCode.UNAVAILABLE and not exc.details():
            return "the platform could not be asked to wake it"
        details: str = exc.details() or exc.code().name
        return details
    return str(exc) or type(exc).__name__


class WakePages(LoopbackHttp):
    """The page a failed wake's requests get (503, with the reason), on a loopback port
    Caddy proxies them to. `reason_for(host)` is the failure the project of that name has."""

    def __init__(self, reason_for: Callable[[str], str | None] | None = None) -> None:
        super().__init__()
        self.reason_for = reason_for

    async def start(self, host: str = "127.0.0.1") -> int:
        return await self.listen(host)

    def page(self, hostname: str) -> bytes:
        reason = self.reason_for(hostname) if self.reason_for is not None else None
        body = page_html(
            503, f"This app was asleep and could not be woken ({reason or 'unknown reason'})."
        ).encode()
        return (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )

    def respond(self, head: bytes) -> bytes:
        host = ""
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "host":
                host = value.strip().rpartition(":")[0] if ":" in value else value.strip()
        return self.page(host)
