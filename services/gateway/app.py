"""The gateway's ASGI app: HTTP/JSON in front of the gRPC services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.gateway.health import upstream_health
from shared.settings import SERVICES, Settings


def build_app(settings: Settings) -> Starlette:
    channels: dict[str, grpc.aio.Channel] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for name in SERVICES:
            channels[name] = grpc.aio.insecure_channel(settings.addresses[name])
        yield
        for channel in channels.values():
            await channel.close()

    async def healthz(request: Request) -> JSONResponse:
        statuses = await upstream_health(channels)
        healthy = all(status == "SERVING" for status in statuses.values())
        return JSONResponse(
            {"status": "ok" if healthy else "degraded", "upstreams": statuses},
            status_code=200 if healthy else 503,
        )

    return Starlette(routes=[Route("/healthz", healthz)], lifespan=lifespan)
