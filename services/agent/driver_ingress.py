"""`ProcessDriver`'s ports: the app's private port and the ingress proxy on its public port
(services/agent/proxy.py), health probes through it, and what the app listens on."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket

import psutil

from services.agent.domain import LogStream
from services.agent.driver_base import DriverBase, _Container
from services.agent.proxy import CHUNK_BYTES, IngressProxy
from shared.errors import Unavailable

log = logging.getLogger("hangar.agent")


class IngressMixin(DriverBase):
    """A container's ports, its proxy and the probes of its app."""

    async def open_app(
        self, record: _Container
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the app's own port (its proxy's and health checks' way in)."""
        return await asyncio.open_connection("127.0.0.1", record.private_port, limit=CHUNK_BYTES)

    async def _probe(self, record: _Container, path: str | None = None) -> bool:
        """The app accepts a connection on its port or, with a health check path (or the
        `path` given: its liveness check's), answers it with a 2xx or 3xx status."""
        path = record.spec.health_check_path if path is None else path
        try:
            reader, writer = await asyncio.wait_for(self.open_app(record), 1.0)
        except (OSError, TimeoutError):
            return False
        try:
            if not path:
                return True
            writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            status = await asyncio.wait_for(reader.readline(), 1.0)
            parts = status.split()
            return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
        except (OSError, TimeoutError, ValueError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _listen(self) -> tuple[IngressProxy, int]:
        """The container's proxy, listening on a public port, and its app's private port."""
        for _ in range(10):
            private_port = self._free_port()
            proxy = IngressProxy(self.listen_host)
            try:
                await proxy.start(0, private_port)
            except OSError as exc:
                raise Unavailable(
                    f"cannot listen for the container: {exc.strerror or exc}",
                    reason="NO_FREE_PORT",
                ) from exc
            if proxy.port != private_port:  # the probe's port was free again: not that one
                return proxy, private_port
            await proxy.close()
        raise Unavailable("no free port on this server", reason="NO_FREE_PORT")

    def _free_port(self) -> int:
        """A port nothing listens on now, and not promised to another live container."""
        taken = {
            port
            for c in self._containers.values()
            if not c.info.state.ended
            for port in (c.info.port, c.private_port)
        }
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("", 0))
                port = int(probe.getsockname()[1])
            if port not in taken:
                return port
        raise Unavailable("no free port on this server", reason="NO_FREE_PORT")

    async def _relisten(self, record: _Container, port: int) -> IngressProxy:
        """The container's proxy again: on its public port if that is free, else another."""
        proxy = IngressProxy(self.listen_host)
        try:
            await proxy.start(port, record.private_port)
            return proxy
        except OSError as exc:
            log.warning(
                "the container's public port is taken: it gets another",
                extra={"container_id": record.info.container_id, "port": port, "error": str(exc)},
            )
        proxy = IngressProxy(self.listen_host)
        try:
            await proxy.start(0, record.private_port)
        except OSError as exc:
            raise Unavailable(f"cannot listen for the container: {exc}") from exc
        return proxy

    @staticmethod
    def _close_proxy(record: _Container) -> None:
        """Closes the container's public port and its live connections (in the background;
        `stop` and `close` wait for it). Its counters stay readable."""
        if record.proxy is not None and record.proxy_closed is None:
            record.proxy_closed = asyncio.ensure_future(record.proxy.close())

    def _network_bytes(self, record: _Container) -> tuple[int | None, int | None]:
        """Cumulative bytes received and sent since the container started (its proxy's)."""
        counters = record.proxy.counters if record.proxy is not None else None
        if counters is None:
            return None, None
        return counters.rx_bytes, counters.tx_bytes

    def _warn_if_exposed(self, record: _Container) -> None:
        """Apps share the host's network here, so one listening beyond loopback can be reached
        without the ingress proxy, unrouted and uncounted. Nothing short of a network namespace
        (an image driver) prevents it; the agent tells the app's owner in its logs."""
        exposed = sorted(_exposed_listeners(record.info.pid))
        if not exposed:
            return
        where = ", ".join(exposed)
        record.logs.append(
            LogStream.STDERR,
            f"[hangar agent] this app listens on {where}, beyond 127.0.0.1: clients must use "
            f"its Hangar address ({record.info.address}); bind 127.0.0.1 on $PORT "
            "to keep the port private",
        )
        log.warning(
            "app listens beyond loopback",
            extra={"container_id": record.info.container_id, "listening": where},
        )


def _exposed_listeners(pid: int) -> set[str]:
    """The non-loopback addresses a process tree listens on (TCP), as "ip:port"."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return set()
    found = set()
    for proc in tree:
        try:
            connections = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for conn in connections:
            if conn.status != psutil.CONN_LISTEN or not conn.laddr:
                continue
            ip, port = conn.laddr.ip, conn.laddr.port
            if not ipaddress.ip_address(ip.split("%")[0]).is_loopback:
                found.add(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return found
