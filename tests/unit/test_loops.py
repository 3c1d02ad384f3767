"""Background loops: a pass that failed because a dependency is down is one warning line; any
other failure keeps its traceback; either way the next pass runs."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shared.errors import Unavailable
from shared.loops import run_every


async def test_failed_passes_are_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures: list[Exception] = [
        Unavailable("billing is unavailable: UNAVAILABLE", reason="BILLING_UNAVAILABLE"),
        KeyError("a bug"),
    ]
    done = asyncio.Event()

    async def step() -> None:
        if failures:
            raise failures.pop(0)
        done.set()

    caplog.set_level(logging.WARNING, logger="shared.loops")
    task = asyncio.create_task(run_every(0, step, "test pass"))
    await asyncio.wait_for(done.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    down, bug = caplog.records
    assert (down.levelname, down.getMessage(), down.exc_info) == (
        "WARNING",
        "test pass failed: billing is unavailable: UNAVAILABLE",
        None,
    )
    assert bug.levelname == "ERROR" and bug.exc_info is not None
