"""A small HTTP/1.1 server on a loopback port for Caddy's own questions (the on-demand TLS
`ask`, a failed wake's page): one request a connection, its head read within 5 s, one answer
written, the connection closed."""

from __future__ import annotations

import asyncio
import contextlib

HEAD_TIMEOUT_SECONDS = 5.0


class LoopbackHttp:
    """Subclasses say what a request's head (request line and headers) is answered with."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self.port = 0

    async def listen(self, host: str = "127.0.0.1") -> int:
        """Listens on a free port of `host`; the port."""
        self._server = await asyncio.start_server(self._answer, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def respond(self, head: bytes) -> bytes:
        raise NotImplementedError

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_SECONDS)
            writer.write(self.respond(head))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
