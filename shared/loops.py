"""Background loops: a pass every interval, a failed pass logged and tried again next time.

A pass that failed because something it calls is down or slow (another service restarting,
UNAVAILABLE / DEADLINE_EXCEEDED) is a warning of one line; anything else is logged with its
traceback, as a bug.

What makes a loop safe with two replicas (an advisory lock, FOR UPDATE SKIP LOCKED) belongs to
the pass itself; this only keeps it going until the task is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from shared.errors import DomainError
from shared.metrics import current_metrics

log = logging.getLogger(__name__)

_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _transient(exc: Exception) -> bool:
    """A dependency down or too slow: the next pass will likely succeed."""
    if isinstance(exc, DomainError):
        return exc.code in _TRANSIENT
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _TRANSIENT


async def run_every(seconds: float, step: Callable[[], Awaitable[object]], what: str) -> None:
    """Await `step` every `seconds` until cancelled; an exception is logged, not fatal.

    With the process's metrics on (shared.metrics.current_metrics), each pass counts in
    loop_runs_total{loop=what} and each failed one in loop_failures_total."""
    metrics = current_metrics.get()
    runs = metrics.loop_runs.labels(what) if metrics is not None else None
    failures = metrics.loop_failures.labels(what) if metrics is not None else None
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if failures is not None:
                failures.inc()
            if _transient(exc):
                log.warning("%s failed: %s", what, exc, extra={"loop": what})
            else:
                log.exception("%s failed", what, extra={"loop": what})
        if runs is not None:
            runs.inc()
        await asyncio.sleep(seconds)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until every one has finished (whatever it raised)."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
