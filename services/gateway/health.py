"""Upstream health: the gateway asks each service's grpc.health.v1 and reports all of them."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


async def upstream_health(
    channels: dict[str, grpc.aio.Channel], per_call_seconds: float = 1.0
) -> dict[str, str]:
    async def check(channel: grpc.aio.Channel) -> str:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=per_call_seconds
            )
        except grpc.aio.AioRpcError as exc:
            code: str = exc.code().name
            return code
        status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return status

    names = list(channels)
    results = await asyncio.gather(*(check(channels[n]) for n in names))
    return dict(zip(names, results, strict=True))
