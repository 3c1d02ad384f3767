"""Background loops: a pass every interval, a failed pass logged and tried again next time.

What makes a loop safe with two replicas (an advisory lock, FOR UPDATE SKIP LOCKED) belongs to
the pass itself; this only keeps it going until the task is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)


async def run_every(seconds: float, step: Callable[[], Awaitable[object]], what: str) -> None:
    """Await `step` every `seconds` until cancelled; an exception is logged, not fatal."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", what, extra={"loop": what})
        await asyncio.sleep(seconds)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until every one has finished (whatever it raised)."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
