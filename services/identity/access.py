"""Access changes reach every service before the change's response returns.

Other services cache what identity tells them: Authorize decisions (shared.auth
RemoteAuthorizer) and verified access tokens (TokenVerifier). Each of their processes holds
one `WatchAccess` stream open to identity (shared.auth.AccessWatch), and identity's use cases
that change access call `AccessBroadcaster.announce` after they commit:

1. The stream opens with a snapshot: the sessions signed out whose access tokens may still
   be unexpired (tokens carry their session in the `sid` claim) and the lease. The watcher
   starts from empty caches.
2. `announce` numbers the change and sends every watcher an invalidation: decisions to drop
   ({user, organization}, either may be "all") and sessions to refuse from now on. The
   watcher drops them, bumps its generation (an Authorize answer fetched before the
   invalidation and arriving after it is used once but never cached) and acknowledges.
3. `announce` returns when every watcher acknowledged, or after `ack_timeout` (2 s): a
   watcher that did not is cut off, and `announce` waits out its lease before returning.
4. Leases: the watcher pings every lease/3 and uses its caches only until `lease` (3 s)
   after it *sent* the last ping identity answered (or opened the stream, for the snapshot).
   Identity sends nothing to a watcher after cutting it, so that watcher's lease ends at most
   `lease` after the last answer identity sent it; waiting that long (plus a little slack)
   after the cut makes correctness independent of how slow the watcher or the network is.
   Without a live lease, a watcher asks identity for every decision (Authorize) and every
   session (CheckSession).
5. A watcher that leaves with a goodbye has stopped using its caches: nothing to wait for.
   One that vanishes otherwise (connection lost) is waited out like a laggard by any change
   announced within its lease. So is every watcher of a previous identity process: changes
   announced in the first `lease` after start wait until then (`restart_grace`).

Identity's own handlers need none of this: its LocalAuthorizer and its session check read
the database, which the change has already committed to.

Several identity replicas: a watcher is connected to one replica, and a change is committed
by any. `announce` also hands the change to the replica's `Peers` (access_relay.AccessRelay,
whose docstring has the argument): the other replicas get it over PostgreSQL NOTIFY, pass it
to their own watchers through `deliver` (the path of a local change) and acknowledge; a
replica that does not is fenced and its watchers' leases waited out. A replica grants leases
(snapshots, answered pings) only while its relay says it hears every change (`serve_until`);
when it may have missed one it cuts every watcher (`fence`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from shared.errors import Unavailable

log = logging.getLogger(__name__)

LEASE_SECONDS = 3.0
ACK_TIMEOUT_SECONDS = 2.0
# Leases are measured on two monotonic clocks (the watcher's and identity's): a margin for
# their rates differing and for scheduling.
LEASE_SLACK_SECONDS = 0.25


@dataclass(frozen=True)
class Scope:
    """Decisions about `user_id` in `organization_id`; "" means every one."""

    user_id: str = ""
    organization_id: str = ""


@dataclass(frozen=True)
class RevokedSession:
    id: str
    forget_after: datetime  # every access token of the session has expired by then


@dataclass(frozen=True)
class AccessChange:
    scopes: tuple[Scope, ...] = ()
    revoked_sessions: tuple[RevokedSession, ...] = ()


# What identity sends a watcher (api.py maps each to a WatchAccessResponse) ...


@dataclass(frozen=True)
class Snapshot:
    revoked_sessions: tuple[RevokedSession, ...]
    lease_seconds: float


@dataclass(frozen=True)
class Invalidation:
    sequence: int
    change: AccessChange


@dataclass(frozen=True)
class Heartbeat:
    ping: int


Outgoing = Snapshot | Invalidation | Heartbeat


# ... and what a watcher sends identity (a WatchAccessRequest).


@dataclass(frozen=True)
class WatcherMessage:
    acked_sequence: int = 0
    ping: int = 0
    goodbye: bool = False


RevokedNow = Callable[[], Awaitable[Sequence[RevokedSession]]]


class Peers(Protocol):
    """The other identity replicas (access_relay.AccessRelay)."""

    async def relay(self, change: AccessChange) -> float:
        """Hand the committed change to every other replica's watchers; returns the
        monotonic time until which the change's answer must still wait (laggards' leases)."""
        ...


class _Watcher:
    """One open WatchAccess stream: what is queued for it and what it acknowledged."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.outbox: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        self.acked = 0
        self.granted_at = time.monotonic()  # when identity last sent it a lease
        self.cut = False
        self.left = False  # said goodbye: no longer uses its caches
        self._waiting: dict[int, asyncio.Future[None]] = {}

    def send(self, message: Outgoing) -> None:
        if not self.cut:
            if not isinstance(message, Invalidation):  # a lease, counted from now at most
                self.granted_at = time.monotonic()
            self.outbox.put_nowait(message)

    def delivered(self, sequence: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.acked >= sequence or self.cut:
            future.set_result(None)
        else:
            self._waiting[sequence] = future
        return future

    def ack(self, sequence: int) -> None:
        self.acked = max(self.acked, sequence)
        for waiting in [s for s in self._waiting if s <= sequence]:
            future = self._waiting.pop(waiting)
            if not future.done():
                future.set_result(None)

    def end(self) -> None:
        """Send nothing more; wake whoever waits for an acknowledgement (they see `cut`)."""
        self.cut = True
        self.outbox.put_nowait(None)
        for future in self._waiting.values():
            if not future.done():
                future.set_result(None)
        self._waiting.clear()


class AccessBroadcaster:
    """Identity's side of WatchAccess: the open streams, and `announce` for the use cases."""

    def __init__(
        self,
        *,
        lease_seconds: float = LEASE_SECONDS,
        ack_timeout_seconds: float = ACK_TIMEOUT_SECONDS,
        restart_grace: bool = True,
    ) -> None:
        self.lease = lease_seconds
        self.ack_timeout = ack_timeout_seconds
        self._watchers: set[_Watcher] = set()
        self._sequence = 0
        self._ending = False
        self._started = time.monotonic()
        self._restart_grace = restart_grace
        # Until then, a watcher may still trust a lease identity granted and can no longer
        # reach: one that vanished, or one of the process before this one.
        self._quiet_until = self._started + self._wait_out() if restart_grace else 0.0
        self.cut_off = 0  # watchers cut off for not acknowledging in time
        self._peers: Peers | None = None
        # Leases are granted (snapshots sent, pings answered) only before this monotonic
        # time: with peers, while this replica is sure to hear every change they announce.
        self._serving_until = math.inf

    def attach_peers(self, peers: Peers) -> None:
        """Several replicas: changes go to `peers` too, and no lease is granted until the
        first `serve_until`."""
        self._peers = peers
        self._serving_until = 0.0

    @property
    def serving(self) -> bool:
        return time.monotonic() < self._serving_until

    def serve_until(self, deadline: float) -> None:
        """Leases may be granted until `deadline` (monotonic)."""
        self._serving_until = deadline

    def fence(self) -> None:
        """This replica may have missed a change: grant no lease and cut every watcher (each
        reconnects and starts from empty caches); changes wait out their leases."""
        self._serving_until = 0.0
        for watcher in list(self._watchers):
            self._forget(watcher)

    def set_lease(self, seconds: float) -> None:
        """Change the lease; only before any watcher holds one."""
        if self._watchers:
            raise RuntimeError("the lease cannot change while watchers hold one")
        self.lease = seconds
        if self._restart_grace:
            self._quiet_until = self._started + self._wait_out()

    def _wait_out(self) -> float:
        return self.lease + LEASE_SLACK_SECONDS

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    @property
    def quiet_until(self) -> float:
        """Monotonic time until which every change waits (a vanished watcher's lease)."""
        return self._quiet_until

    async def announce(self, change: AccessChange) -> None:
        """After the change committed: returns once no watcher (of any replica) can answer
        from what the change made stale. Shielded: a caller that gives up does not leave a
        laggard uncut."""
        if self._peers is None and not self._watchers and time.monotonic() >= self._quiet_until:
            return
        await asyncio.shield(self._announce(change))

    async def _announce(self, change: AccessChange) -> None:
        if self._peers is None:
            until = await self.deliver(change)
        else:
            until = max(await asyncio.gather(self.deliver(change), self._peers.relay(change)))
        delay = until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def deliver(self, change: AccessChange) -> float:
        """Send the change to this replica's watchers; returns once each acknowledged or was
        cut off, with the monotonic time until which a laggard's lease must be waited out."""
        if not self._watchers:
            return self._quiet_until
        self._sequence += 1
        sequence = self._sequence
        message = Invalidation(sequence, change)
        watchers = list(self._watchers)
        waiting = [w.delivered(sequence) for w in watchers]
        for watcher in watchers:
            watcher.send(message)
        if waiting:
            await asyncio.wait(waiting, timeout=self.ack_timeout)
        for watcher in watchers:
            if watcher.acked < sequence and not watcher.left:
                if not watcher.cut:
                    self.cut_off += 1
                    log.warning(
                        "access watcher did not acknowledge in time: cut off",
                        extra={"service": watcher.service, "sequence": sequence},
                    )
                self._forget(watcher)
        return self._quiet_until

    def _forget(self, watcher: _Watcher) -> None:
        """No more messages to `watcher`; changes wait until its last lease has run out."""
        if not watcher.cut:
            watcher.end()
        self._watchers.discard(watcher)
        if not watcher.left:
            self._quiet_until = max(self._quiet_until, watcher.granted_at + self._wait_out())

    def end_watches(self) -> None:
        """The server is shutting down: every open stream ends now (UNAVAILABLE)."""
        self._ending = True
        for watcher in list(self._watchers):
            watcher.end()

    async def watch(
        self, service: str, requests: AsyncIterator[WatcherMessage], revoked_now: RevokedNow
    ) -> AsyncIterator[Outgoing]:
        """The body of WatchAccess for one watcher (a service process)."""
        if self._ending:
            raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
        if not self.serving:
            raise _not_listening()
        watcher = _Watcher(service)
        # Registered before the snapshot is read: a change committed meanwhile is queued
        # behind the snapshot, never lost between the two.
        self._watchers.add(watcher)
        reader = asyncio.create_task(self._read(watcher, requests))
        try:
            revoked = tuple(await revoked_now())
            if watcher.cut or not self.serving:  # fenced meanwhile: it may miss a change
                raise _not_listening()
            watcher.granted_at = time.monotonic()
            yield Snapshot(revoked, self.lease)
            while True:
                message = await watcher.outbox.get()
                if message is None or watcher.cut:
                    break
                yield message
            if not watcher.left:
                raise Unavailable("access watch ended; reconnect", reason="WATCH_ENDED")
        finally:
            reader.cancel()
            self._forget(watcher)

    async def _read(self, watcher: _Watcher, requests: AsyncIterator[WatcherMessage]) -> None:
        try:
            async for request in requests:
                if request.acked_sequence:
                    watcher.ack(request.acked_sequence)
                if request.goodbye:
                    watcher.left = True
                    break
                if request.ping and self.serving:  # else its lease runs out
                    watcher.send(Heartbeat(request.ping))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer went away mid-message: the stream ends
            log.debug("access watcher stream failed", extra={"error": repr(exc)})
        with contextlib.suppress(Exception):
            watcher.end()


def _not_listening() -> Unavailable:
    return Unavailable(
        "identity cannot vouch for access changes right now; reconnect", reason="NOT_LISTENING"
    )
