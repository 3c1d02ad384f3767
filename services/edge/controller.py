"""The edge's control loop: keeps Caddy's config equal to runtime's route table.

A `RouteSource` gives the whole table (`fetch`) and says when it may have changed
(`changes`). The controller re-reads the whole table after a change, debounced so a burst
of events costs one read, and also every `resync_seconds` as a safety net; it applies the
result to Caddy only when the config differs, logs how long each apply took, and counts
applies (`applied_version`, `wait_applied`) so a test can wait for one without sleeping.
Upstreams are not in Caddy's config: the table goes to the edge's DNS first (dns.py).
It also answers Caddy's on-demand TLS question (`AskServer`): a certificate only for a name
in the current table. With a `CertificateSource`, each read of the table also reads the
uploaded certificates (certificates.py); when that read fails, the routes still apply with
the last certificates read, and both are read again after the usual back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import UTC, datetime
from typing import Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

from services.edge.caddy import Caddy, CaddyError, EdgeConfig, Route, caddy_config, normal_name
from services.edge.certificates import CertificateSource, ExpiryWarnings, UploadedCertificate
from services.edge.dns import UpstreamDns
from services.edge.loopback import LoopbackHttp
from shared.loops import cancel_and_wait

log = logging.getLogger("hangar.edge")

# A failed re-read is tried again after 1 s, doubling up to 10 s while it keeps failing.
RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 10.0
T = TypeVar("T")


class RouteSource(Protocol):
    async def fetch(self) -> list[Route]:
        """The whole current route table."""
        ...

    def changes(self) -> AsyncIterator[None]:
        """Yields whenever the table may have changed (and on every (re)connect)."""
        ...


class ApplyMetrics(Protocol):
    """What the controller counts (metrics.EdgeMetrics)."""

    def applied(self, seconds: float, reloaded: bool) -> None: ...

    def apply_failed(self) -> None: ...

    def read_failed(self, source: str) -> None: ...


class StaticRoutes:
    """A RouteSource over a table held in this process (tests, benchmarks)."""

    def __init__(self, routes: Sequence[Route] = ()) -> None:
        self.routes = list(routes)
        self._changed = asyncio.Event()
        self.received_at = 0.0  # perf_counter() of the last `set`

    def set(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)
        self.received_at = time.perf_counter()
        self._changed.set()

    async def fetch(self) -> list[Route]:
        return list(self.routes)

    async def changes(self) -> AsyncIterator[None]:
        while True:
            await self._changed.wait()
            self._changed.clear()
            yield None


class EdgeController:
    def __init__(
        self,
        source: RouteSource,
        caddy: Caddy,
        edge: EdgeConfig,
        dns: UpstreamDns,
        *,
        debounce_seconds: float = 0.03,
        resync_seconds: float = 30.0,
        first_fetch_timeout: float = 5.0,
        certificates: CertificateSource | None = None,
        metrics: ApplyMetrics | None = None,
    ) -> None:
        self.source = source
        self.certificate_source = certificates
        self.certificates: list[UploadedCertificate] = []  # the last read
        self.loaded_certificates: list[UploadedCertificate] = []  # in Caddy's config now
        self.metrics = metrics
        self.expiry = ExpiryWarnings()
        self.caddy = caddy
        self.edge = edge
        self.dns = dns
        self.debounce_seconds = debounce_seconds
        self.resync_seconds = resync_seconds
        self.first_fetch_timeout = first_fetch_timeout
        self.routes: list[Route] = []
        self.hostnames: frozenset[str] = frozenset()
        self._project_of: dict[str, str] = {}  # hostname -> project id
        self.applied_version = 0
        self.last_apply_seconds = 0.0
        self._applied = asyncio.Condition()
        self._dirty = asyncio.Event()
        self._urgent = False  # the next re-read skips the debounce (refresh)
        self._tasks: list[asyncio.Task[None]] = []

    def knows(self, hostname: str) -> bool:
        """Whether Caddy may get a certificate for this name (the `ask` answer)."""
        return normal_name(hostname) in self.hostnames

    def project_of(self, hostname: str) -> str | None:
        """The project this name routes to, in the current table."""
        return self._project_of.get(normal_name(hostname))

    def refresh(self) -> None:
        """Re-read the table now, without the debounce (after a wake: requests are held
        until the woken containers are listed)."""
        self._urgent = True
        self._dirty.set()

    async def start(self) -> None:
        """Starts Caddy with the first table (empty if the source does not answer yet),
        then follows the source in the background."""
        try:
            routes = await self._read(
                "routes", asyncio.wait_for(self.source.fetch(), self.first_fetch_timeout)
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("no route table yet; starting empty", extra={"error": repr(exc)})
            routes = []
            self._dirty.set()  # keep trying
        try:
            await self._read(
                "certificates",
                asyncio.wait_for(self._read_certificates(), self.first_fetch_timeout),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("no uploaded certificates yet", extra={"error": repr(exc)})
            self._dirty.set()  # keep trying
        started = time.perf_counter()
        await self._remember(routes)
        # Without uploads first: one Caddy refuses never keeps the edge from starting.
        await self.caddy.start(caddy_config(routes, self.edge))
        reloaded = await self._load(routes)
        await self._applied_now(started, len(routes), reloaded)
        self._tasks = [
            asyncio.create_task(self._follow_changes()),
            asyncio.create_task(self._sync_loop()),
        ]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []

    async def wait_applied(self, after: int) -> int:
        """Waits until an apply newer than `after` happened; the new version."""
        async with self._applied:
            await self._applied.wait_for(lambda: self.applied_version > after)
            return self.applied_version

    async def apply(self, routes: Sequence[Route]) -> bool:
        """Applies this table: the DNS's upstreams at once, then Caddy's config if it
        changed (a name added or removed, a project served or not); whether it did."""
        started = time.perf_counter()
        try:
            await self._remember(routes)
            changed = await self._load(routes)
        except Exception:
            if self.metrics is not None:
                self.metrics.apply_failed()
            raise
        await self._applied_now(started, len(routes), changed)
        return changed

    async def _load(self, routes: Sequence[Route]) -> bool:
        """Loads the table with the usable uploads; if Caddy refuses them (a certificate
        project accepted and Go does not), without them: routes go on, those names get
        on-demand certificates meanwhile, and the error says which names."""
        usable = self.expiry.usable(self.certificates, self.hostnames, datetime.now(UTC))
        try:
            loaded = await self.caddy.load(caddy_config(routes, self.edge, usable))
        except CaddyError:
            if not usable:
                raise
        else:
            self.loaded_certificates = usable
            return loaded
        log.error(  # never Caddy's text: it might quote what it refused
            "caddy refused the uploaded certificates; loading the routes without them",
            extra={"hostnames": [c.hostname for c in usable]},
        )
        loaded = await self.caddy.load(caddy_config(routes, self.edge))
        self.loaded_certificates = []
        return loaded

    async def _read(self, source: str, read: Awaitable[T]) -> T:
        """`read`, counting its failure (metrics' `source`: "routes" or "certificates")."""
        try:
            return await read
        except Exception as exc:
            raise_if_cancelling(exc)
            if self.metrics is not None:
                self.metrics.read_failed(source)
            raise

    async def _read_certificates(self) -> None:
        if self.certificate_source is not None:
            self.certificates = await self.certificate_source.fetch()

    async def _remember(self, routes: Sequence[Route]) -> None:
        # Before Caddy sees the new names, so its on-demand `ask` and its lookups find them.
        await self.dns.set_routes(routes)
        self.routes = list(routes)
        project_of: dict[str, str] = {}
        for r in routes:
            for h in r.hostnames:
                if name := normal_name(h):
                    project_of.setdefault(name, r.project_id)  # a name claimed twice: first
        self._project_of = project_of
        self.hostnames = frozenset(project_of)

    async def _applied_now(self, started: float, count: int, reloaded: bool) -> None:
        self.last_apply_seconds = time.perf_counter() - started
        log.info(
            "routes applied",
            extra={"routes": count, "apply_ms": round(self.last_apply_seconds * 1000, 1)},
        )
        if self.metrics is not None:
            self.metrics.applied(self.last_apply_seconds, reloaded)
        async with self._applied:
            self.applied_version += 1
            self._applied.notify_all()

    async def _follow_changes(self) -> None:
        async for _ in self.source.changes():
            self._dirty.set()

    async def _sync_loop(self) -> None:
        retry = RETRY_SECONDS
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.resync_seconds)
            if not self._urgent:
                await asyncio.sleep(self.debounce_seconds)  # let a burst of events settle
            self._dirty.clear()
            self._urgent = False
            try:
                routes = await self._read("routes", self.source.fetch())
                unread: Exception | None = None
                try:
                    await self._read("certificates", self._read_certificates())
                except Exception as exc:  # the last ones stay; the routes apply anyway
                    raise_if_cancelling(exc)
                    unread = exc
                await self.apply(routes)
                if unread is not None:
                    raise unread
                retry = RETRY_SECONDS
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelling(exc)
                log.warning("route sync failed", extra={"error": repr(exc), "retry_seconds": retry})
                await asyncio.sleep(retry)
                retry = min(retry * 2, MAX_RETRY_SECONDS)
                self._dirty.set()


def raise_if_cancelling(exc: BaseException) -> None:
    """grpc.aio turns a cancelled call into AioRpcError(CANCELLED): a task cancelled in a
    call would then retry forever instead of ending. Re-raise the cancellation."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


class AskServer(LoopbackHttp):
    """Caddy's on-demand TLS guard on loopback: `GET /ask?domain=NAME` answers 200 only
    for a name in the controller's table (so nobody can make the edge fetch certificates
    for names it does not serve)."""

    def __init__(self, controller: EdgeController | None = None) -> None:
        super().__init__()
        self.controller = controller
        self.answers = {"allowed": 0, "refused": 0}  # questions answered (metrics)

    async def start(self, host: str = "127.0.0.1") -> str:
        """Listens on a free loopback port; the URL for Caddy's `ask`."""
        return f"http://{host}:{await self.listen(host)}/ask"

    def allows(self, target: str) -> bool:
        url = urlsplit(target)
        domain = parse_qs(url.query).get("domain", [""])[0]
        controller = self.controller
        return url.path == "/ask" and controller is not None and controller.knows(domain)

    def respond(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        ok = len(parts) == 3 and parts[0] == "GET" and self.allows(parts[1])
        self.answers["allowed" if ok else "refused"] += 1
        status = b"200 OK" if ok else b"403 Forbidden"
        return b"HTTP/1.1 %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status
