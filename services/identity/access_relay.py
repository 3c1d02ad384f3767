"""Access changes reach the watchers of every identity replica (access.py has one replica's side).

A watcher holds its WatchAccess stream on one replica; a change is committed by any. Each
replica runs an `AccessRelay`:

1. Listening. The relay holds one connection of its own (from the pool) that LISTENs on
   `identity_access` (changes) and `identity_access_ack` (acknowledgements). Once LISTEN has
   taken effect it inserts its *listener row* in `identity.access_listeners`: a fresh
   `incarnation` id, the replica id, the backend's pid, `lease_until` (the database's clock
   + `lease`) and its watchers' lease. It renews the row every lease/3, through that same
   connection, and only while the row is neither revoked nor expired (so an expired or
   revoked row never comes back); a renewal never moves `lease_until` back.
2. Fencing. The replica grants watchers leases (snapshots, answered pings) only until the
   time it *sent* its last successful renewal + `lease` (`AccessBroadcaster.serve_until`); on
   the database's clock that is no later than the row's `lease_until`. When the connection is
   lost, a renewal fails, times out or finds its row revoked or expired, the replica may have
   missed a change: it cuts every watcher at once (`AccessBroadcaster.fence`; they reconnect,
   to any replica, and start from empty caches and a fresh snapshot) and refuses new ones
   until it listens again, under a new incarnation. So whatever happens to a replica, no
   watcher of an incarnation holds a lease past that incarnation's `lease_until` + the
   watcher lease: the bound the announcer waits out.
3. Announcing. After the commit, `relay` reads the other replicas' listener rows whose
   watchers may still hold a lease (`lease_until` later than now - watcher lease - slack). A
   row is *live* when it is neither revoked nor expired and its backend still exists
   (pg_stat_activity): that incarnation listened before this read, so it will hear a NOTIFY
   sent after it. With no live row, nothing is sent (the single-replica path: one query). Else
   the change goes out as NOTIFY (split into several if it would pass NOTIFY's 8000 bytes)
   and the relay waits, up to the acknowledgement timeout + a margin, for each live
   incarnation's acknowledgement. A replica that started listening after the read needs no
   NOTIFY: its watchers' snapshots are read after the change committed.
4. Relaying. A replica that hears a change passes it to its own watchers through
   `AccessBroadcaster.deliver` (the path of its own changes) and acknowledges with a NOTIFY on
   `identity_access_ack` saying how long its own laggards' leases still run; the announcer
   waits that long too.
5. Laggards. A live incarnation that does not acknowledge in time is revoked (an UPDATE that
   also returns its `lease_until`, serialised with its renewals by the row lock); a row that
   is not live is not waited for at all. Either way the announcer waits until `lease_until` +
   the watcher lease + slack: by 2., no watcher of that incarnation is using its caches then.
   An announcer that is not listening itself cannot hear acknowledgements: it revokes every
   live peer at once (correct, and rare: its own connection is down).

If the database cannot be reached between the commit and the NOTIFY, the change's call fails
(UNAVAILABLE: committed, not confirmed to every replica): without reading the rows nobody can
say whom to wait for.

Durations cross replicas only as "seconds from now" measured on the database's clock
(`lease_until - clock_timestamp()`), never as timestamps of two machines; a little slack
covers the rates of the clocks differing. A replica's graceful stop marks its row revoked
with `lease_until` = now (its watchers were cut already), so changes after it wait only the
watcher lease, not an acknowledgement timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.identity.access import (
    LEASE_SLACK_SECONDS,
    AccessBroadcaster,
    AccessChange,
    RevokedSession,
    Scope,
)
from shared.db import Database

log = logging.getLogger(__name__)

CHANGES = "identity_access"
ACKS = "identity_access_ack"
# NOTIFY refuses payloads of 8000 bytes or more; a change is split below this.
PAYLOAD_LIMIT = 7000
# Beyond the acknowledgement timeout a peer's own watchers have, for the relay's hops.
PEER_MARGIN_SECONDS = 1.0
# Listener rows no lease can depend on any more are deleted after this.
FORGET_LISTENERS_SECONDS = 600.0

_REGISTER = """INSERT INTO identity.access_listeners
        (incarnation, replica, pid, lease_until, watcher_lease_seconds)
    VALUES ($1, $2, pg_backend_pid(), clock_timestamp() + make_interval(secs => $3), $3)"""
_FORGET_OLD = """DELETE FROM identity.access_listeners
    WHERE lease_until < clock_timestamp() - make_interval(secs => $1)"""
_RENEW = """UPDATE identity.access_listeners
    SET lease_until = greatest(lease_until, clock_timestamp() + make_interval(secs => $2)),
        watcher_lease_seconds = greatest(watcher_lease_seconds, $2)
    WHERE incarnation = $1 AND pid = pg_backend_pid() AND NOT revoked
      AND lease_until > clock_timestamp()
    RETURNING true"""
_STOP = """UPDATE identity.access_listeners
    SET revoked = true, lease_until = least(lease_until, clock_timestamp())
    WHERE incarnation = $1"""
_PEERS = """SELECT incarnation,
        NOT revoked AND lease_until > clock_timestamp()
            AND pid IN (SELECT pid FROM pg_stat_activity) AS live,
        extract(epoch FROM lease_until - clock_timestamp())::float8
            + watcher_lease_seconds + $2 AS remaining
    FROM identity.access_listeners
    WHERE replica <> $1
      AND lease_until + make_interval(secs => watcher_lease_seconds + $2) > clock_timestamp()"""
_REVOKE = """UPDATE identity.access_listeners SET revoked = true
    WHERE incarnation = ANY($1::text[])
    RETURNING extract(epoch FROM lease_until - clock_timestamp())::float8
        + watcher_lease_seconds + $2 AS remaining"""
_NOTIFY = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"


@dataclass(frozen=True)
class _Peer:
    incarnation: str
    live: bool
    # Seconds until none of its watchers can hold a lease (its lease_until + theirs + slack),
    # on the database's clock.
    remaining: float


class AccessRelay:
    """One identity replica's link to the others (the module docstring has the argument)."""

    def __init__(
        self,
        db: Database,
        access: AccessBroadcaster,
        *,
        retry_seconds: float = 0.1,
        max_retry_seconds: float = 2.0,
    ) -> None:
        self.db = db
        self.access = access
        self.replica = f"idr_{secrets.token_hex(8)}"
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.incarnation = ""  # of the listener now up ("" while not listening)
        self.listener_pid = 0  # its backend
        self._listening = asyncio.Event()
        self._number = 0
        self._acks: dict[tuple[int, str], asyncio.Future[float]] = {}
        self._relaying: set[asyncio.Task[None]] = set()
        self.incarnations = 0  # listeners opened (reconnections + 1)
        self.relayed = 0  # peers' changes passed to this replica's watchers
        self.laggards = 0  # peers revoked for not acknowledging in time
        access.attach_peers(self)

    @property
    def lease(self) -> float:
        return self.access.lease

    async def wait_listening(self) -> None:
        await self._listening.wait()

    # ----------------------------------------------------------------- listening

    async def run(self) -> None:
        """Listen until cancelled, reconnecting (under a new incarnation) after any gap."""
        delay, warned = self.retry_seconds, False
        while True:
            opened = self.incarnations
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.incarnations > opened or not warned:  # once per outage
                    log.warning(
                        "access relay is not listening; watchers cut", extra={"error": repr(exc)}
                    )
                    warned = True
            if self.incarnations > opened:  # it was up: retry at once
                delay = self.retry_seconds
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_retry_seconds)

    async def _listen(self) -> None:
        conn: asyncpg.Connection = await self.db.pool.acquire()
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        incarnation = f"{self.replica}.{secrets.token_hex(4)}"
        try:
            await conn.add_listener(CHANGES, self._on_change)
            await conn.add_listener(ACKS, self._on_ack)
            await conn.execute(_FORGET_OLD, FORGET_LISTENERS_SECONDS)
            sent = time.monotonic()
            await conn.execute(_REGISTER, incarnation, self.replica, self.lease)
            self.incarnation, self.listener_pid = incarnation, conn.get_server_pid()
            self.incarnations += 1
            serving_until = sent + self.lease
            self.access.serve_until(serving_until)
            self._listening.set()
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), self.lease / 3)
                if lost.is_set() or conn.is_closed():
                    raise ConnectionError("the LISTEN connection was lost")
                sent = time.monotonic()
                # A renewal answered after the lease ran out would find the row expired.
                renewed = await asyncio.wait_for(
                    conn.fetchval(_RENEW, incarnation, self.lease), max(0.0, serving_until - sent)
                )
                if not renewed:
                    log.warning("access relay's lease was revoked or ran out; watchers cut")
                    return
                serving_until = sent + self.lease
                self.access.serve_until(serving_until)
        finally:
            # First of all: nothing this replica hears from now on can be trusted complete.
            self.access.fence()
            self._listening.clear()
            self.incarnation, self.listener_pid = "", 0
            await self._release(conn, incarnation, lost.is_set())

    async def _release(self, conn: asyncpg.Connection, incarnation: str, lost: bool) -> None:
        if not lost and not conn.is_closed():
            try:
                async with asyncio.timeout(self.lease / 3):
                    await conn.remove_listener(CHANGES, self._on_change)
                    await conn.remove_listener(ACKS, self._on_ack)
                    # Its watchers are cut: changes from now on wait out only their leases.
                    await conn.execute(_STOP, incarnation)
            except (TimeoutError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
                conn.terminate()
        else:
            conn.terminate()
        with contextlib.suppress(Exception):
            await self.db.pool.release(conn, timeout=self.lease / 3)

    # ----------------------------------------------------------------- announcing

    async def relay(self, change: AccessChange) -> float:
        """Hand `change` to the other replicas' watchers (access.Peers)."""
        async with self.db.session() as s:
            rows = await s.fetch(_PEERS, self.replica, LEASE_SLACK_SECONDS)
        read = time.monotonic()  # "remaining" was measured before: waiting from now is safe
        peers = [_Peer(r["incarnation"], r["live"], r["remaining"]) for r in rows]
        until = max([read, *(read + p.remaining for p in peers if not p.live)])
        live = [p.incarnation for p in peers if p.live]
        if not live:
            return until
        numbered = []
        for part in _parts(change):
            self._number += 1
            numbered.append((self._number, part))
        acks = {
            (n, i): asyncio.get_running_loop().create_future() for n, _ in numbered for i in live
        }
        self._acks.update(acks)
        try:
            payloads = [json.dumps({"o": self.replica, "n": n, **p}) for n, p in numbered]
            async with self.db.session() as s:
                await s.execute(_NOTIFY, CHANGES, payloads)
            if self.incarnation:  # else no acknowledgement can be heard: all are laggards
                await asyncio.wait(
                    acks.values(), timeout=self.access.ack_timeout + PEER_MARGIN_SECONDS
                )
        finally:
            for key in acks:
                self._acks.pop(key, None)
        late = sorted({i for (_, i), f in acks.items() if not f.done()})
        for future in acks.values():
            if future.done():
                until = max(until, future.result())
        if late:
            self.laggards += len(late)
            log.warning(
                "identity replicas did not acknowledge an access change: revoked",
                extra={"incarnations": late},
            )
            async with self.db.session() as s:
                revoked = await s.fetch(_REVOKE, late, LEASE_SLACK_SECONDS)
            now = time.monotonic()
            for row in revoked:
                until = max(until, now + row["remaining"])
        return until

    def _on_ack(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        ack = json.loads(payload)
        if ack.get("o") != self.replica:
            return
        future = self._acks.get((int(ack["n"]), str(ack["i"])))
        if future is not None and not future.done():
            future.set_result(time.monotonic() + float(ack["w"]))

    # ----------------------------------------------------------------- relaying

    def _on_change(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        message = json.loads(payload)
        if message.get("o") == self.replica:
            return
        task = asyncio.get_running_loop().create_task(self._pass_on(message, self.incarnation))
        self._relaying.add(task)
        task.add_done_callback(self._relaying.discard)

    async def _pass_on(self, message: dict[str, Any], incarnation: str) -> None:
        try:
            until = await self.access.deliver(_change_from(message))
            self.relayed += 1
            ack = {
                "o": message["o"],
                "n": message["n"],
                "i": incarnation,
                "w": max(0.0, until - time.monotonic()),
            }
            async with self.db.session() as s:
                await s.execute("SELECT pg_notify($1, $2)", ACKS, json.dumps(ack))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no acknowledgement: the announcer waits this replica out
            log.warning("could not relay an access change", extra={"error": repr(exc)})

    async def close(self) -> None:
        tasks = list(self._relaying)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _parts(change: AccessChange) -> list[dict[str, Any]]:
    """The change as NOTIFY payloads of PAYLOAD_LIMIT bytes at most (most are one)."""
    items: list[tuple[str, list[Any]]] = [
        ("s", [s.user_id, s.organization_id]) for s in change.scopes
    ] + [("r", [r.id, r.forget_after.timestamp()]) for r in change.revoked_sessions]
    parts: list[dict[str, Any]] = []
    current: dict[str, list[Any]] = {"s": [], "r": []}
    size = 100  # the envelope: origin, number, keys
    for key, item in items:
        item_size = len(json.dumps(item)) + 2
        if size + item_size > PAYLOAD_LIMIT and (current["s"] or current["r"]):
            parts.append(current)
            current, size = {"s": [], "r": []}, 100
        current[key].append(item)
        size += item_size
    if current["s"] or current["r"] or not parts:
        parts.append(current)
    return parts


def _change_from(message: dict[str, Any]) -> AccessChange:
    return AccessChange(
        tuple(Scope(str(u), str(o)) for u, o in message.get("s", ())),
        tuple(
            RevokedSession(str(i), datetime.fromtimestamp(float(t), UTC))
            for i, t in message.get("r", ())
        ),
    )
