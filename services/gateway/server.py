"""Gateway process: uvicorn + uvloop serving the ASGI app on HANGAR_GATEWAY_ADDR."""

from __future__ import annotations

import uvicorn

from services.gateway.app import GatewayOptions, build_app
from shared.logging import configure_logging
from shared.settings import Settings
from shared.tracing import configure_tracing


def main() -> None:
    settings = Settings.from_env("gateway")
    configure_logging("gateway", settings.log_level)
    configure_tracing("gateway")
    host, _, port = settings.listen_address.rpartition(":")
    uvicorn.run(
        build_app(settings, GatewayOptions.from_env()),
        host=host,
        port=int(port),
        loop="uvloop",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.grace_seconds),
    )
