"""The sleep controller (docs/architecture.md, main flow 5): containers of projects with
sleep on that served no request for the project's sleep_after_seconds are put to sleep by their
agent, and woken again for a request the edge holds (`wake`, runtime's WakeRoute).

One replica runs a pass at a time (a session advisory lock; no row stays locked while agents
are called), and a pass asks each idle container's agent, with a deadline, to stop its
process while keeping its public port open; the agent starts the app again on the next
request and reports it awake. The agent refuses (NOT_IDLE) when it saw a request after the
one runtime knows of, and runtime then records that request instead. Capacity stays
reserved throughout: a sleeping deployment is still running.

A container going to sleep or woken writes `route.changed`: the edge's routes list sleeping
containers apart (it holds their requests and asks for a wake), so it re-reads them then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from hangar.agent.v1 import agent_pb2
from services.runtime import store
from services.runtime.agents import Agents
from services.runtime.routes import ROUTE_CHANGED
from shared.db import Database, Session
from shared.errors import Unavailable
from shared.loops import run_every
from shared.outbox import write_event

log = logging.getLogger(__name__)

LOCK_KEY = "runtime.sleep-controller"

_SLEEP_STATUS = {
    agent_pb2.SLEEP_STATUS_AWAKE: "awake",
    agent_pb2.SLEEP_STATUS_SLEEPING: "sleeping",
    agent_pb2.SLEEP_STATUS_WAKING: "waking",
}


def sleep_status_of(container: agent_pb2.Container) -> str | None:
    """The runtime name of an agent's sleep status; None when the agent did not say."""
    return _SLEEP_STATUS.get(container.sleep_status)


@dataclass(frozen=True)
class SleepPass:
    slept: int = 0
    busy: int = 0  # the agent saw a newer request
    failed: int = 0  # the agent could not be asked (it stays awake; the next pass retries)


class SleepController:
    def __init__(
        self,
        db: Database,
        agents: Agents,
        *,
        interval_seconds: float = 10.0,
        batch: int = 50,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db = db
        self.agents = agents
        self.interval = interval_seconds
        self.batch = batch
        self.clock = clock

    async def run(self) -> None:
        async def sleep_pass() -> None:
            result = await self.sleep_idle()
            if result.slept or result.failed:
                log.info("sleep pass", extra=result.__dict__)

        await run_every(self.interval, sleep_pass, "sleep pass")

    async def sleep_idle(self, now: datetime | None = None) -> SleepPass:
        """One pass: the idle containers (up to `batch`) are asked to sleep; an empty pass
        if another replica is running one."""
        async with self.db.advisory_lock(LOCK_KEY) as s:
            if s is None:
                return SleepPass()
            idle = await store.idle_containers(s, now or self.clock(), self.batch)
            outcomes = await asyncio.gather(*(self._sleep(one) for one in idle))
            # Recorded before the lock goes: the next pass must not find them awake.
            for one, (status, last_request_at) in zip(idle, outcomes, strict=True):
                if status is not None or last_request_at is not None:
                    async with self.db.transaction() as tx:
                        await store.update_container(
                            tx,
                            one.container.id,
                            sleep_status=status,
                            last_request_at=last_request_at,
                        )
                        if status == "sleeping":
                            await _route_changed(
                                tx, one.container.project_id, "asleep", one.organization_id
                            )
        return SleepPass(
            slept=sum(1 for status, _ in outcomes if status == "sleeping"),
            busy=sum(1 for status, last in outcomes if status != "sleeping" and last),
            failed=sum(1 for status, last in outcomes if status is None and last is None),
        )

    async def wake(self, project_id: str, within: float) -> int:
        """Wakes every sleeping web container of the project's serving release at once, each
        through its agent (for `within` seconds at most); how many woke. Safe to run twice at
        once (two edges, two replicas): the agent's wake is idempotent. UNAVAILABLE when some
        were asleep and none woke."""
        async with self.db.session() as s:
            asleep = await store.sleeping_containers(s, project_id)
        if not asleep:
            return 0
        outcomes = await asyncio.gather(
            *(self.agents.wake(one.agent_address, one.container.id, within) for one in asleep),
            return_exceptions=True,
        )
        woken = [
            (one, reply)
            for one, reply in zip(asleep, outcomes, strict=True)
            if isinstance(reply, agent_pb2.Container)
        ]
        if woken:
            async with self.db.transaction() as tx:  # rows locked in id order (asleep's)
                for one, reply in woken:
                    await store.update_container(
                        tx,
                        one.container.id,
                        sleep_status=sleep_status_of(reply),
                        last_request_at=_last_request(reply),
                    )
                await _route_changed(tx, project_id, "awake", asleep[0].organization_id)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for failure in failures:
            if not isinstance(failure, grpc.aio.AioRpcError):
                raise failure
            log.warning(
                "agent did not wake the container",
                extra={"project_id": project_id, "error": failure.code().name},
            )
        if not woken:
            first = failures[0]
            detail = first.details() if isinstance(first, grpc.aio.AioRpcError) else ""
            raise Unavailable(
                f"the app could not be woken: {detail or 'its server did not answer'}",
                reason="WAKE_FAILED",
            )
        return len(woken)

    async def _sleep(self, idle: store.IdleContainer) -> tuple[str | None, datetime | None]:
        """(sleep status, last request) as the agent answered; (None, None) if it did not."""
        container = idle.container
        try:
            reply = await self.agents.sleep(idle.agent_address, container.id, idle.idle_since)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
                try:  # NOT_IDLE: what the agent knows now (its heartbeat will say it too)
                    seen = await self.agents.get(idle.agent_address, container.id)
                except grpc.aio.AioRpcError:
                    return None, None
                return sleep_status_of(seen), _last_request(seen)
            log.warning(
                "agent did not put the container to sleep",
                extra={"container_id": container.id, "error": f"{exc.code().name}"},
            )
            return None, None
        return sleep_status_of(reply), _last_request(reply)


def _last_request(container: agent_pb2.Container) -> datetime | None:
    if not container.HasField("last_request_at"):
        return None
    at: datetime = container.last_request_at.ToDatetime(UTC)
    return at


async def _route_changed(tx: Session, project_id: str, now: str, organization_id: str = "") -> None:
    await write_event(
        tx,
        "runtime",
        ROUTE_CHANGED,
        organization_id=organization_id,
        aggregate_id=project_id,
        payload={"sleep": now},
    )
