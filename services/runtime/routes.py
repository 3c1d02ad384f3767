"""The edge's routes: which hostnames name which project, and where its app answers.

Project owns the names (a project's hostname is `<project slug>-<org slug>.<apps domain>`);
runtime keeps them from project's events, in the feed's order, and knows what serves each
project: the web containers of its serving release, each behind its agent's proxy (which
meters the bytes), the sleeping ones apart. The edge reads the whole table with `ListRoutes`
and reads it again after any event in runtime's feed: a change of names, a container going
to sleep or woken writes `route.changed`; a deployment that starts serving or stops writes
its status change. A request for a sleeping project is held at the edge, which asks
`WakeRoute` (the sleep controller's `wake`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from hangar.events.v1 import events_pb2
from services.runtime import store
from shared.db import Database, Session
from shared.errors import InvalidArgument
from shared.outbox import write_event

# Wakes a project's sleeping containers within a number of seconds; how many woke (the
# sleep controller's `wake`, which imports this module for ROUTE_CHANGED).
Wake = Callable[[str, float], Awaitable[int]]

ROUTE_CHANGED = "route.changed"  # also written by the sleep controller (sleeper.py)
EDGE = "edge"  # the service whose token may read the routes
WAKE_TIMEOUT = 25.0  # a wake asked without a deadline waits this long for the agents


class Routes:
    def __init__(self, db: Database, wake: Wake | None = None) -> None:
        self.db = db
        self._wake = wake

    async def wake(self, project_id: str, within: float) -> int:
        """The edge holds a request for this sleeping project: wake its containers."""
        if not project_id:
            raise InvalidArgument.field("project_id", "required")
        if self._wake is None:
            return 0
        return await self._wake(project_id, within)

    async def set_hostname(self, tx: Session, event: events_pb2.Event, hostname: str) -> None:
        """A project's name, from its project.created / project.updated event."""
        hostnames = [hostname] if hostname else []
        if await store.set_hostnames(tx, event.aggregate_id, hostnames):
            await self._changed(tx, event, hostnames)

    async def set_domains(self, tx: Session, event: events_pb2.Event) -> None:
        """A project's custom domains, from its project.domains_changed event."""
        payload = event.payload
        domains = [str(d) for d in payload["domains"]] if "domains" in payload else []
        challenges = [
            {"hostname": str(c["hostname"]), "token": str(c["token"])}
            for c in (payload["challenges"] if "challenges" in payload else [])
        ]
        await store.set_domains(tx, event.aggregate_id, domains, challenges)
        await self._changed(tx, event, domains)

    async def forget(self, tx: Session, event: events_pb2.Event) -> None:
        """The project is gone: the edge stops answering for it."""
        await store.delete_routes(tx, event.aggregate_id)
        await self._changed(tx, event, [])

    async def _changed(self, tx: Session, event: events_pb2.Event, hostnames: list[str]) -> None:
        await write_event(
            tx,
            "runtime",
            ROUTE_CHANGED,
            organization_id=event.organization_id,
            aggregate_id=event.aggregate_id,
            payload={"hostnames": hostnames},
        )

    async def list_routes(self) -> list[store.RouteRow]:
        async with self.db.session() as s:
            return await store.list_routes(s)
