"""`ProcessDriver`'s sleep and wake: an idle app's process stops, its public port stays open,
and it starts again when runtime asks (`wake`, for a request the edge holds) or, as a
fallback for a connection that reaches the public port directly, on that connection."""

from __future__ import annotations

import asyncio
import logging

from services.agent.domain import ContainerInfo, ContainerState, SleepState, utcnow
from services.agent.driver_base import DriverBase, _Container
from shared.errors import FailedPrecondition, NotFound, Unavailable

log = logging.getLogger("hangar.agent")


class SleepMixin(DriverBase):
    """Puts idle apps to sleep and wakes them on a connection."""

    async def _rest(self, record: _Container, grace: float) -> None:
        """Puts an idle app to sleep: its process stops (the next connection starts it)."""
        record.dozing = True
        log.info("container going to sleep", extra={"container_id": record.info.container_id})
        await self._terminate(record, grace)
        if record.supervisor is not None:  # it records the sleep (or the end) of the run
            await asyncio.shield(record.supervisor)

    def _doze(self, record: _Container) -> None:
        """The process stopped for sleep ended: the container sleeps until a connection."""
        record.dozing = False
        record.up = asyncio.Event()
        self._take_final(record, utcnow())
        self._set(record, sleep=SleepState.SLEEPING, pid=0)
        log.info("container asleep", extra={"container_id": record.info.container_id})

    async def wake(self, container_id: str) -> ContainerInfo:
        """Wakes a sleeping container as a connection would, for a request the edge holds
        (it counts as one: the sleep controller must not put it back to sleep before the
        request arrives); returns once its app answers. A no-op when it is awake."""
        record = self._containers.get(container_id)
        if record is None:
            raise NotFound("this agent runs no such container", reason="CONTAINER_NOT_FOUND")
        if record.info.state.ended or record.stop_requested:
            raise FailedPrecondition("the container has ended", reason="NOT_RUNNING")
        if record.proxy is not None:
            record.proxy.last_request_at = utcnow()
        await self._wake(record)
        return self._view(record)

    async def _wake(self, record: _Container) -> None:
        """The proxy's before_connect: start a sleeping app again and wait until it answers
        (connections arriving meanwhile wait for the same start). While a crashed app is
        restarting, a connection waits for its next start the same way (`_until_up`)."""
        if record.ever_up and record.info.state is ContainerState.STARTING:
            await self._until_up(record)
            return
        if record.dozing and record.supervisor is not None:  # going to sleep: let it finish
            await asyncio.shield(record.supervisor)
        if record.info.sleep is SleepState.AWAKE:
            return
        if record.info.state.ended or record.stop_requested:
            raise Unavailable("the container has ended")
        if record.waking is None or record.waking.done():
            record.waking = asyncio.create_task(self._start_again(record))
            # Its connections may all be gone (the proxy closed) before it fails.
            record.waking.add_done_callback(_retrieve)
        await asyncio.shield(record.waking)

    async def _start_again(self, record: _Container) -> None:
        log.info("waking container", extra={"container_id": record.info.container_id})
        self._set(record, sleep=SleepState.WAKING, run=record.info.run + 1, started_at=utcnow())
        await self._spawn(record)
        await self._until_up(record)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Marks a task's failure as seen (it was told to whoever still waited on it)."""
    if not task.cancelled():
        task.exception()
