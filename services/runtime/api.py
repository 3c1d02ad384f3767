"""RuntimeService servicer: proto in -> domain call -> proto out.

RPCs not overridden here answer UNIMPLEMENTED (the generated base class) until built.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from hangar.events.v1 import events_pb2
from hangar.runtime.v1 import runtime_pb2_grpc
from shared.app import ServiceApp


class RuntimeApi(runtime_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, app: ServiceApp) -> None:
        self.app = app

    async def WatchEvents(
        self, request: events_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.Event]:
        async for event in self.app.feed.watch(request, context):
            yield event
