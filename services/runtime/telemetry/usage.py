"""Usage reporting: samples become billed usage.

A window is computed once (advisory lock, then a ledger row per window) into one report per
container, billing metric and window, whose idempotency key billing dedupes on; reports stay
in the ledger until billing accepted them, so an outage delays usage and a resend after a
crash is counted once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from services.runtime.telemetry.model import UsageReport, utcnow, window_start_of
from services.runtime.telemetry.store import (
    claim_unsent_reports,
    compute_usage,
    earliest_sample_since,
    mark_failed,
    mark_sent,
    record_window,
    try_lock,
    usage_cursor,
)
from shared.db import Database
from shared.loops import run_every

log = logging.getLogger(__name__)


UsageSender = Callable[[list[UsageReport]], Awaitable[None]]


class UsageReporter:
    """Turns samples into usage windows and sends them to billing until accepted.

    compute: under an advisory lock, each window that ended more than `lateness` ago is
    computed once into the ledger (runtime.usage_windows + usage_reports) in one
    transaction. send: unsent reports are claimed FOR UPDATE SKIP LOCKED, sent per
    organization with their idempotency keys, and marked sent; a failure schedules a retry
    with backoff. Billing counts a key once, so a crash between its accept and our mark
    re-sends a duplicate it ignores.
    """

    LOCK_KEY = "runtime.telemetry.usage"

    def __init__(
        self,
        db: Database,
        send: UsageSender,
        *,
        window: timedelta,
        lateness: timedelta,
        nominal_interval: timedelta,
        interval_seconds: float,
        retry: timedelta = timedelta(seconds=5),
        batch: int = 1000,
        max_windows_per_round: int = 100,
    ) -> None:
        self.db = db
        self.send = send
        self.window = window
        self.lateness = lateness
        self.nominal = nominal_interval
        self.max_gap = nominal_interval * 3
        self.interval = interval_seconds
        self.retry = retry
        self.batch = batch
        self.max_windows = max_windows_per_round

    async def compute_due(self, now: datetime | None = None) -> int:
        """Compute every window that is due; how many were computed (0 if locked out)."""
        now = now or utcnow()
        computed = 0
        async with self.db.transaction() as tx:
            if not await try_lock(tx, self.LOCK_KEY):
                return 0
            start = await usage_cursor(tx)
            if start is None:
                first = await earliest_sample_since(tx, now - timedelta(days=1))
                start = window_start_of(first or now, self.window)
            while computed < self.max_windows and start + self.window + self.lateness <= now:
                end = start + self.window
                reports = await compute_usage(tx, start, end, self.max_gap, self.nominal)
                await record_window(tx, start, end, reports)
                computed += 1
                start = end
        return computed

    async def send_due(self) -> int:
        """Send unsent reports; how many billing accepted (or had already)."""
        sent = 0
        while True:
            async with self.db.transaction() as tx:
                reports = await claim_unsent_reports(tx, self.batch)
                if not reports:
                    return sent
                by_org: dict[str, list[UsageReport]] = defaultdict(list)
                for r in reports:
                    by_org[r.organization_id].append(r)
                failures = 0
                outage = ""
                for org_reports in by_org.values():
                    keys = [r.idempotency_key for r in org_reports]
                    if outage:  # billing is unreachable: do not wait on it once per org
                        await mark_failed(tx, keys, outage, self.retry)
                        continue
                    try:
                        await self.send(org_reports)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # any failure: keep the reports, retry later
                        failures += 1
                        await mark_failed(tx, keys, _describe(exc), self.retry)
                        if _unreachable(exc):
                            outage = _describe(exc)
                            log.warning("billing unreachable; usage waits", extra={"error": outage})
                        continue
                    await mark_sent(tx, keys)
                    sent += len(keys)
            if failures or len(reports) < self.batch:
                return sent

    async def run_once(self) -> None:
        await self.compute_due()
        await self.send_due()

    async def run(self) -> None:
        await run_every(self.interval, self.run_once, "usage round")


def _unreachable(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    name = getattr(code(), "name", "") if callable(code) else ""
    return name in ("UNAVAILABLE", "DEADLINE_EXCEEDED") or isinstance(exc, OSError)


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code()}: {details()}"
    return f"{type(exc).__name__}: {exc}"
