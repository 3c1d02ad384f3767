"""The edge's RouteSource: runtime's route table over gRPC.

`fetch` is `RuntimeService.ListRoutes` (the whole table, with a deadline; idempotent, so
retried on UNAVAILABLE by the channel); `wake` is `WakeRoute` (wake.py), with the wake's
deadline. `changes` follows runtime's `WatchEvents` (the one
call without a deadline) and yields on every event and on every (re)connect; the edge
re-reads the whole table then, so an event's content never matters and a missed one costs
nothing. Both calls carry the edge's service token: runtime serves them to "edge" only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from hangar.events.v1 import events_pb2
from hangar.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from services.edge.caddy import Route
from services.edge.controller import raise_if_cancelling
from shared.auth import ServiceTokenSource
from shared.clients import Clients
from shared.metrics import Metrics
from shared.settings import Settings

log = logging.getLogger("hangar.edge")

RUNTIME_SERVICE = runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
# What can change a route: a deployment starting or stopping to serve, names coming or going
# (not audit entries, the rest of the feed). What else moves is caught by the periodic read.
ROUTE_EVENTS = ("deployment.status_changed", "route.changed")


class RuntimeRoutes:
    def __init__(
        self,
        settings: Settings,
        *,
        retry_seconds: float = 0.5,
        max_retry_seconds: float = 10.0,
        metrics: Metrics | None = None,
        wake_timeout: float = 25.0,
    ) -> None:
        self.timeout = settings.call_timeout_seconds
        self.wake_timeout = wake_timeout  # WakeRoute's deadline: a wake takes an app's start
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        # With `metrics`, every call is counted (grpc_client_*), the token's too.
        self.token_source = ServiceTokenSource(settings, metrics=metrics)
        self.clients = Clients(
            settings.addresses,
            default_timeout=settings.call_timeout_seconds,
            token_provider=self.token_source,
            metrics=metrics,
        )
        # Where the feed was: a reconnect resumes there instead of replaying the history.
        self.cursor = ""

    def _stub(self) -> runtime_pb2_grpc.RuntimeServiceStub:
        return self.clients.stub("runtime", runtime_pb2_grpc.RuntimeServiceStub, RUNTIME_SERVICE)

    async def fetch(self) -> list[Route]:
        reply = await self._stub().ListRoutes(runtime_pb2.ListRoutesRequest(), timeout=self.timeout)
        return list(reply.routes)

    async def wake(self, project_id: str) -> None:
        """Runtime's WakeRoute: wakes the project's sleeping containers (within the hold)."""
        await self._stub().WakeRoute(
            runtime_pb2.WakeRouteRequest(project_id=project_id), timeout=self.wake_timeout
        )

    async def changes(self) -> AsyncIterator[None]:
        """Forever: one yield per (re)connect and per event; back-off between attempts."""
        delay = self.retry_seconds
        while True:
            try:
                yield None  # (re)connected, or about to: re-read the table
                request = events_pb2.WatchEventsRequest(
                    after_cursor=self.cursor, types=list(ROUTE_EVENTS)
                )
                async for event in self._stub().WatchEvents(request):
                    self.cursor = event.cursor
                    delay = self.retry_seconds
                    yield None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelling(exc)
                log.warning(
                    "runtime's event feed interrupted; reconnecting",
                    extra={"error": repr(exc), "retry_seconds": delay},
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_retry_seconds)

    async def close(self) -> None:
        await self.clients.close()
        await self.token_source.close()
