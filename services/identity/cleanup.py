"""Identity's housekeeping: refresh-token families that can no longer be used and login
throttle rows that no longer count are deleted, in batches, by one replica at a time (a
transaction-level advisory lock; a replica that does not get it skips the round)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.identity import domain, store
from shared.db import Database
from shared.loops import run_every

log = logging.getLogger(__name__)

LOCK_KEY = "identity.cleanup"


@dataclass(frozen=True)
class Cleaned:
    refresh_tokens: int = 0
    login_throttle: int = 0


class Cleanup:
    def __init__(self, db: Database, *, interval_seconds: float = 3600.0, batch: int = 1000):
        self.db = db
        self.interval = interval_seconds
        self.batch = batch

    async def run(self) -> None:
        async def round_() -> None:
            cleaned = await self.clean()
            if cleaned.refresh_tokens or cleaned.login_throttle:
                log.info("cleaned up", extra=cleaned.__dict__)

        await run_every(self.interval, round_, "identity clean-up")

    async def clean(self) -> Cleaned:
        """Everything due, a batch per transaction; nothing if another replica is at it."""
        tokens = throttle = 0
        while True:
            async with self.db.transaction() as tx:
                if not await tx.fetchval(
                    "SELECT pg_try_advisory_xact_lock(hashtext($1))", LOCK_KEY
                ):
                    break
                gone_tokens = await store.delete_dead_refresh_families(tx, self.batch)
                gone_throttle = await store.delete_stale_login_throttle(
                    tx, domain.FAILURE_MEMORY, self.batch
                )
            tokens += gone_tokens
            throttle += gone_throttle
            if gone_tokens < self.batch and gone_throttle < self.batch:
                break
        return Cleaned(tokens, throttle)
