"""The agent's ingress proxy: what measures an app's network bytes.

A process driver's apps share the host's network namespace and psutil has no per-process
network counters, so the agent stands in front of each app: the app listens on a private
port (its PORT), the agent listens on the container's public port (the one it advertises)
and copies each TCP connection both ways with asyncio streams, in chunks of up to
`chunk_bytes`, counting the bytes it received from clients (rx) and sent to them (tx).

Half-closes pass through (a client's EOF reaches the app as EOF, and the other way round);
the connection ends once both directions did, or at once when either side fails (the other
is aborted). `close()` closes the listener and aborts every live connection.

Sleep: the proxy knows when the app last had a client (`last_request_at`, and `open` while a
connection is live). `before_connect`, when set, runs before each connection reaches the
app: the driver uses it to start a sleeping app again and hold the client until it answers.
Requests through the edge are held and woken there (runtime's WakeRoute, the agent's
WakeContainer) before they reach this proxy; this wake is the fallback for a connection
that reaches a sleeping app directly. Either way this proxy is the one place an app's bytes
are metered.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from services.agent.domain import utcnow

log = logging.getLogger("hangar.agent.proxy")

CHUNK_BYTES = 64 * 1024


@dataclass
class ProxyCounters:
    """Cumulative bytes through one container's proxy since it started."""

    rx_bytes: int = 0  # received from clients (sent on to the app)
    tx_bytes: int = 0  # sent to clients (received from the app)
    connections: int = 0  # accepted, in all


class IngressProxy:
    """Forwards `host:public_port` to `127.0.0.1:private_port`, counting bytes."""

    def __init__(
        self,
        host: str = "",  # an IP address to listen on; empty: every IPv4 interface
        *,
        target_host: str = "127.0.0.1",
        chunk_bytes: int = CHUNK_BYTES,
        connect_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.target_host = target_host
        self.chunk_bytes = chunk_bytes
        self.connect_timeout = connect_timeout
        self.counters = ProxyCounters()
        self.port = 0
        self.private_port = 0
        self._server: asyncio.Server | None = None
        self._live: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}
        self._closed = False
        self.last_request_at: datetime | None = None  # a client connected or left
        # Runs before a connection reaches the app; an exception ends the connection.
        self.before_connect: Callable[[], Awaitable[None]] | None = None
        # Opens the connection to the app (a container's is inside its network namespace);
        # None: target_host:private_port.
        self.open_app: (
            Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] | None
        ) = None

    @property
    def open(self) -> int:
        """Client connections live now."""
        return len(self._live)

    async def start(self, public_port: int, private_port: int) -> ProxyCounters:
        """Listens on `public_port` (0: any free port, then read `port`); returns the counters."""
        if self._server is not None or self._closed:
            raise RuntimeError("an IngressProxy starts once")
        self.private_port = private_port
        # One address (IPv4 "" -> every interface): with host None asyncio would bind IPv4
        # and IPv6 sockets, on different ports when public_port is 0.
        # Listening from an empty context: connections (and a wake they start) must not
        # carry the request id, caller or token of the RPC that happened to start the proxy.
        listening = contextvars.Context().run(
            asyncio.ensure_future,
            asyncio.start_server(
                self._handle,
                self.host or "0.0.0.0",  # the public port: every interface, as apps bound it
                public_port,
                reuse_address=True,
                limit=self.chunk_bytes,
            ),
        )
        self._server = await listening
        ports = {int(sock.getsockname()[1]) for sock in self._server.sockets}
        if len(ports) != 1:
            await self.close()
            raise OSError(f"{self.host!r} is more than one address; give an IP address")
        self.port = ports.pop()
        return self.counters

    async def close(self) -> None:
        """Stops listening and ends every live connection (idempotent)."""
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task, writers in list(self._live.items()):
            for writer in writers:
                writer.transport.abort()
            task.cancel()
        if self._live:
            await asyncio.gather(*self._live, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    # ------------------------------------------------------------------ one connection

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        writers = [client_w]
        self._live[task] = writers
        try:
            if self._closed:
                client_w.transport.abort()
                return
            self.counters.connections += 1
            self.last_request_at = utcnow()
            if self.before_connect is not None:
                try:
                    await self.before_connect()
                except Exception as exc:  # the app could not be woken: the connection ends
                    log.warning("app not started for a connection", extra={"error": repr(exc)})
                    client_w.transport.abort()
                    return
            try:
                app_r, app_w = await asyncio.wait_for(self._open_app(), self.connect_timeout)
            except (OSError, TimeoutError):
                client_w.transport.abort()  # the app is not there: the connection ends
                return
            writers.append(app_w)
            await asyncio.gather(
                self._copy(client_r, app_w, client_w, rx=True),
                self._copy(app_r, client_w, app_w, rx=False),
            )
        except asyncio.CancelledError:
            pass  # close(): the transports are aborted already
        except Exception:
            log.exception("proxy connection failed")
        finally:
            for writer in writers:
                writer.close()
            self._live.pop(task, None)
            self.last_request_at = utcnow()

    async def _open_app(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.open_app is not None:
            return await self.open_app()
        return await asyncio.open_connection(
            self.target_host, self.private_port, limit=self.chunk_bytes
        )

    async def _copy(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        source_writer: asyncio.StreamWriter,
        *,
        rx: bool,
    ) -> None:
        """Copies `source` to `sink` until EOF, then half-closes `sink`. On an error either
        side is gone: both are aborted, which ends the other direction too."""
        counters = self.counters
        try:
            while chunk := await source.read(self.chunk_bytes):
                if rx:
                    counters.rx_bytes += len(chunk)
                else:
                    counters.tx_bytes += len(chunk)
                sink.write(chunk)
                await sink.drain()
            if not sink.is_closing() and sink.can_write_eof():
                sink.write_eof()
        except OSError:  # ConnectionResetError, BrokenPipeError, ...
            sink.transport.abort()
            source_writer.transport.abort()
        if source_writer.is_closing() or sink.is_closing():
            return
        with contextlib.suppress(OSError):
            await sink.drain()
