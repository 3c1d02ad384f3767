"""What every service process has: its database pool on its own role, its outbox feed,
channels to the services it calls, and background loops started and stopped with it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import grpc

from hangar.billing.v1 import billing_pb2, billing_pb2_grpc
from hangar.events.v1 import events_pb2
from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from hangar.project.v1 import project_pb2, project_pb2_grpc
from hangar.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from shared.auth import AccessWatch, IdentityJwks, ServiceTokenSource, TokenVerifier
from shared.clients import Clients
from shared.db import Database
from shared.interceptors import Authenticator
from shared.loops import cancel_and_wait
from shared.metrics import Metrics, current_metrics, watch_outbox
from shared.outbox import OutboxFeed
from shared.settings import Settings

log = logging.getLogger(__name__)

EventFeed = Callable[[events_pb2.WatchEventsRequest], AsyncIterator[events_pb2.Event]]

# Whose WatchEvents feed can be consumed: the stub and service descriptor of each source.
_FEEDS: dict[str, tuple[Callable[[grpc.aio.Channel], Any], Any]] = {
    "identity": (
        identity_pb2_grpc.IdentityServiceStub,
        identity_pb2.DESCRIPTOR.services_by_name["IdentityService"],
    ),
    "project": (
        project_pb2_grpc.ProjectServiceStub,
        project_pb2.DESCRIPTOR.services_by_name["ProjectService"],
    ),
    "runtime": (
        runtime_pb2_grpc.RuntimeServiceStub,
        runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"],
    ),
    "billing": (
        billing_pb2_grpc.BillingServiceStub,
        billing_pb2.DESCRIPTOR.services_by_name["BillingService"],
    ),
}


class ServiceApp:
    """Base of each service's app object; `shared.server` serves it."""

    name: str = ""
    service_names: Sequence[str] = ()
    watches_access = True  # holds identity's WatchAccess open (see shared.auth.AccessWatch)

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.feed = OutboxFeed(db, self.name)
        # Prometheus metrics, only with a metrics address (shared.server serves them).
        self.metrics = Metrics() if settings.metrics_address else None
        if self.metrics is not None:
            self.metrics.watch_pool(db.pool)
            watch_outbox(self.metrics, db, self.name)
        # Calls to other services carry this service's token (when it has credentials).
        self.token_source = (
            ServiceTokenSource(settings, metrics=self.metrics)
            if settings.service_secrets.get(self.name)
            else None
        )
        self.clients = Clients(
            settings.addresses,
            default_timeout=settings.call_timeout_seconds,
            token_provider=self.token_source,
            metrics=self.metrics,
        )
        # What keeps this process's token and Authorize caches true (RemoteAuthorizer's watch).
        self.access_watch = AccessWatch(self.clients) if self.watches_access else None
        self.authenticator: Authenticator = self.build_authenticator()
        self._loops: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        if self.access_watch is not None:
            self.add_loop(self.access_watch.run)

    @classmethod
    async def create(cls, settings: Settings) -> ServiceApp:
        db = await Database.connect(settings.service_database_url(cls.name))
        return cls(settings, db)

    def build_authenticator(self) -> Authenticator:
        """Verifies bearer tokens locally against identity's published keys."""
        self._jwks = IdentityJwks(self.settings, metrics=self.metrics)
        return TokenVerifier.for_settings(self.settings, self._jwks, sessions=self.access_watch)

    def watch_events(self, source: str) -> EventFeed:
        """Another service's WatchEvents feed, called with this service's token (for
        shared.outbox.EventConsumer)."""
        stub_class, service = _FEEDS[source]

        def watch(request: events_pb2.WatchEventsRequest) -> AsyncIterator[events_pb2.Event]:
            stub = self.clients.stub(source, stub_class, service)
            return stub.WatchEvents(request)  # type: ignore[no-any-return]

        return watch

    def add_loop(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """A background loop that runs while the server does (must be replica-safe)."""
        self._loops.append(loop)

    def register(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        await self.feed.start()
        # The loops' tasks copy this context: shared.loops counts their passes here.
        reset = current_metrics.set(self.metrics)
        try:
            self._tasks = [asyncio.create_task(loop()) for loop in self._loops]
        finally:
            current_metrics.reset(reset)

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        await self.clients.close()
        if self.token_source is not None:
            await self.token_source.close()
        jwks = getattr(self, "_jwks", None)
        if jwks is not None:
            await jwks.close()
        await self.feed.close()
        await self.db.close(grace_seconds=self.settings.grace_seconds)
