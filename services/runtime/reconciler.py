"""The capacity reconciler: each server's reserved counters must equal the sum over its
deployments with capacity_reserved, and never exceed its capacity; its tenant must be the
organization of those deployments (none, one, or several). It repairs drift left by crashes
or by hand edits.

Replica-safe: a transaction-level advisory lock lets one replica check at a time (the other
skips the round). Inside, every server row is locked in id order before the sums are read;
placements and releases change a server's counter and its deployments' flags in one
transaction that holds that server's row lock, so the sums read afterwards are exactly the
ones the locked counters should show.

With a deployer, each round also asks the agents what they run: a deployment starting or
running on an agent that does not run it ends failed and releases its capacity (crashes of
runtime, or an agent's state lost, leave such deployments behind), and a container an agent
runs that no deployment wants is stopped. An agent that does not answer fails nothing: a
restarting agent adopts its apps before it answers (services/agent/runs.py), so its silence
says nothing of them, and counters stay as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.runtime import store
from services.runtime.domain import Drift, TenantDrift, find_drift, find_tenant_drift
from services.runtime.scheduler import retry_deadlocks
from shared.db import Database
from shared.loops import run_every

log = logging.getLogger(__name__)

LOCK_KEY = "runtime.reconciler"


@dataclass(frozen=True)
class ReconcileReport:
    servers: int = 0
    repaired: list[Drift] = field(default_factory=list)
    unrepairable: list[Drift] = field(default_factory=list)
    # Tenants that were wrong (not counting those narrowed from several to one).
    retenanted: list[TenantDrift] = field(default_factory=list)


class Reconciler:
    def __init__(
        self,
        db: Database,
        *,
        interval_seconds: float = 30.0,
        check_agents: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.db = db
        self.interval = interval_seconds
        self.check_agents = check_agents

    async def reconcile_once(self) -> ReconcileReport | None:
        """Check and repair every server; None when another replica is doing it right now."""
        return await retry_deadlocks(self._reconcile)

    async def _reconcile(self) -> ReconcileReport | None:
        async with self.db.transaction() as tx:
            if not await store.try_advisory_xact_lock(tx, LOCK_KEY):
                return None
            servers = await store.lock_servers(tx)
            held = await store.reservations(tx)
            drift = find_drift(((s.id, s.capacity, s.reserved) for s in servers), held.sums)
            repaired, unrepairable = [], []
            for d in drift:
                if d.repairable:
                    await store.set_reserved(tx, d.server_id, d.actual)
                    repaired.append(d)
                else:
                    unrepairable.append(d)
            tenant_drift = find_tenant_drift(
                ((s.id, s.tenant_organization_id) for s in servers), held.organizations
            )
            for t in tenant_drift:
                await store.set_tenant(tx, t.server_id, t.actual)
            retenanted = [t for t in tenant_drift if not t.narrowing]
        for d in repaired:
            log.warning(
                "reserved counters repaired",
                extra={
                    "server_id": d.server_id,
                    "recorded": (d.recorded.ram_mb, d.recorded.cpu_millis),
                    "actual": (d.actual.ram_mb, d.actual.cpu_millis),
                },
            )
        for d in unrepairable:
            log.error(
                "deployments reserve more than a server's capacity",
                extra={"server_id": d.server_id, "actual": (d.actual.ram_mb, d.actual.cpu_millis)},
            )
        for t in retenanted:
            log.warning(
                "server tenant repaired",
                extra={"server_id": t.server_id, "recorded": t.recorded, "actual": t.actual},
            )
        return ReconcileReport(len(servers), repaired, unrepairable, retenanted)

    async def run(self) -> None:

        async def round_() -> None:
            await self.reconcile_once()
            if self.check_agents is not None:
                await self.check_agents()

        await run_every(self.interval, round_, "reconcile round")
