"""Background loops: a pass every interval, a failed pass logged and tried again next time.

What makes a loop safe with two replicas (an advisory lock, FOR UPDATE SKIP LOCKED) belongs to
the pass itself; this only keeps it going until the task is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

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
