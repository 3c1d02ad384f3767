"""Deployments and capacity: placement, the state machine applied to rows, supersede, release.

Every status change happens in one transaction with its capacity change, its
`deployment.status_changed` event and its audit entry. Replica-safe: deployment rows are
locked before they change, queued ones are claimed with SKIP LOCKED, and server counters
only move through store.reserve_capacity / store.release_capacity.

Tenancy: a server without isolation runs one organization's apps at a time (unless
`single_tenant`); the statement that reserves capacity also claims the server for the
organization, and the release of its last reservation frees it (see
store.placement._reserve_sql).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import asyncpg

from services.runtime import store
from services.runtime.domain import (
    ENDS,
    HOLDS_CAPACITY,
    SERVING,
    DeploymentState,
    ReleaseReason,
    Tenancy,
    can_transition,
    ensure_transition,
    reservable,
    unisolated_reason,
    without_log_lines,
)
from services.runtime.store import Deployment, DeploymentSpec
from shared.audit import AUDIT_PREFIX, current_actor, record_audit
from shared.db import Database, Session
from shared.errors import FailedPrecondition, InvalidArgument
from shared.loops import run_every
from shared.outbox import write_event
from shared.resources import Resources

log = logging.getLogger(__name__)

SCHEMA = "runtime"
STATUS_CHANGED = "deployment.status_changed"
SYSTEM_ACTOR = "service:runtime"
# The driver every agent registers with; what a deployment needs beyond it (builds and
# images: the container sandbox) is Tenancy.sandbox.
PROCESS_DRIVER = "process"
DEADLOCK_RETRIES = 3
T = TypeVar("T")

State = DeploymentState
# (transaction, region, driver, need, tenancy) -> the server now holding the reservation,
# or None.
Reserve = Callable[[Session, str, str, Resources, Tenancy], Awaitable[str | None]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def retry_deadlocks(attempt: Callable[[], Awaitable[T]]) -> T:
    """Run a whole transaction again when PostgreSQL broke a deadlock by aborting it.

    Placements hold no server row they did not reserve (CreateDeployment is one statement;
    a queued placement's misses roll back to a savepoint), but a transaction that ends
    several deployments, or the reconciler, locks rows in an order another transaction may
    not share. Whichever one PostgreSQL aborts changed nothing, so it is simply run again.
    """
    for tries in range(DEADLOCK_RETRIES):
        try:
            return await attempt()
        except asyncpg.DeadlockDetectedError:
            if tries == DEADLOCK_RETRIES - 1:
                raise
            log.info("transaction deadlocked; retrying")
            await asyncio.sleep(0.01 * (tries + 1))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class QueuePass:
    """What one pass over the queued deployments did."""

    placed: int = 0
    failed: int = 0
    waiting: int = 0


class Scheduler:
    def __init__(
        self,
        db: Database,
        *,
        schedule_timeout_seconds: float = 600.0,
        retry_seconds: float = 2.0,
        clock: Callable[[], datetime] = _utcnow,
        reserve: Reserve | None = None,
        on_placed: Callable[[], None] | None = None,
        single_tenant: bool = False,
    ) -> None:
        self.db = db
        # settings.single_tenant: any organizations' apps may share a server without isolation.
        self.single_tenant = single_tenant
        self.on_placed = on_placed  # the queue placed something: hand it to the agents
        # None: store.place_deployment, reservation and status change in one statement.
        # Swappable so bench/ can measure other designs side by side.
        self.reserve = reserve
        self.schedule_timeout = timedelta(seconds=schedule_timeout_seconds)
        self.retry_seconds = retry_seconds
        self.clock = clock

    # ------------------------------------------------------------------ create, place

    async def create(self, spec: DeploymentSpec) -> Deployment:
        """Queue a deployment and try to place it at once; with no room it stays queued.
        (Several replicas: the first of create_set's.)"""
        return (await self.create_set(spec))[0]

    async def create_set(self, spec: DeploymentSpec) -> list[Deployment]:
        """A release of `spec.replicas` replicas: every replica's row, placed where there is
        room (preferring servers that hold no other replica of it), in one transaction; the
        first replica first. One replica, switched at once, is one statement as shipped."""
        if [spec.image, spec.command, spec.source_sha256].count(None) != 2:
            raise InvalidArgument.field(
                "deployment.source", "exactly one of image, command or source_sha256"
            )
        reservable(spec.resources, "deployment.resources")
        deadline = self.clock() + self.schedule_timeout

        async def attempt() -> list[Deployment]:
            if spec.replicas == 1 and not spec.rolling and self.reserve is None:
                async with self.db.session() as s:  # no transaction around it
                    created = await store.create_deployment(
                        s,
                        spec,
                        deadline,
                        PROCESS_DRIVER,
                        share_unisolated=self.single_tenant,
                        waiting_reason=unisolated_reason(spec.region),
                        event_type=STATUS_CHANGED,
                        audit_type=AUDIT_PREFIX + STATUS_CHANGED,
                        actor_id=current_actor() or SYSTEM_ACTOR,
                    )
                return [created]
            async with self.db.transaction() as tx:
                return await self._insert_set(tx, spec, deadline)

        return await retry_deadlocks(attempt)

    async def _insert_set(
        self, tx: Session, spec: DeploymentSpec, deadline: datetime
    ) -> list[Deployment]:
        """A new replica set of `spec.replicas`, each replica inserted and placed in turn;
        a rolling one's are held and placed as the rollout makes room (advance)."""
        rolling = spec.rolling
        if rolling:
            await self.lock_project(tx, spec.project_id)
        first = await store.insert_deployment(tx, spec, deadline, held=rolling)
        rows = [first] + [
            await store.insert_deployment(tx, spec.replica(first.id, index), deadline, held=rolling)
            for index in range(1, spec.replicas)
        ]
        for row in rows:
            await self._changed(tx, None, row)
        if rolling:
            await self.advance(tx, first.replica_set_id)
            return [await store.get_deployment(tx, row.id) for row in rows]
        return [await self._place(tx, row) for row in rows]

    async def advance(self, tx: Session, replica_set_id: str) -> list[Deployment]:
        """One step of a rolling rollout, under the project's lock: end old replicas while
        at least replicas - max_unavailable serve (only to make room for held ones, or
        beyond the new set's size), then place held replicas while at most replicas +
        max_surge of both hold (or wait for) capacity. The replicas placed.

        A new replica that runs supersedes the old one of its index (transition_in); the
        next step runs then (Deployer), and every deploy sweep (advance_rollouts)."""
        members = await store.lock_replica_set(tx, replica_set_id)
        live = [m for m in members if m.status not in ENDS]
        if not live or not live[0].rolling:
            return []
        first = live[0]
        wanted, surge = first.replicas, first.max_surge
        floor = wanted - first.max_unavailable
        held = sorted((m for m in live if m.held), key=lambda m: m.replica_index)
        created = min(m.created_at for m in members)
        if await store.newer_set_exists(tx, first.project_id, replica_set_id, created):
            # A newer release took over: what was never placed of this one is not started.
            for replica in held:
                await self.transition_in(
                    tx,
                    replica,
                    State.CANCELLED,
                    reason="a newer release was deployed before this replica was placed",
                    whole_set=False,
                )
            return []
        old = await store.lock_serving_of_project(
            tx, first.project_id, excluding_set=replica_set_id, sets_before=created
        )
        serving = [m for m in live if m.status in SERVING]
        active = [m for m in live if not m.held]
        may_end = len(old) + len(serving) - floor
        over = len(old) + len(serving) - wanted
        room_needed = min(len(held), len(old) + len(active) + len(held) - (wanted + surge))
        ending = min(max(0, may_end), len(old), max(over, room_needed, 0))
        for replaced in sorted(old, key=lambda m: -m.replica_index)[:ending]:
            await self.transition_in(
                tx,
                replaced,
                State.SUPERSEDED,
                reason=f"replaced by the rollout of {replica_set_id}",
                whole_set=False,
            )
        room = wanted + surge - (len(old) - ending) - len(active)
        placed = []
        for replica in held[: max(0, room)]:
            placed.append(await self._place(tx, await store.unhold(tx, replica.id)))
        return placed

    async def advance_rollouts(self) -> int:
        """advance every rolling rollout with replicas still held (one transaction each); the
        count of replicas placed."""
        async with self.db.session() as s:
            rollouts = await store.rolling_sets_with_held(s)
        placed = 0
        for project_id, replica_set_id in rollouts:

            async def attempt(project: str = project_id, members: str = replica_set_id) -> int:
                async with self.db.transaction() as tx:
                    await self.lock_project(tx, project)
                    return len(await self.advance(tx, members))

            placed += await retry_deadlocks(attempt)
        return placed

    async def place(self, deployment_id: str) -> Deployment:
        async def attempt() -> Deployment:
            async with self.db.transaction() as tx:
                return await self._place(tx, await store.lock_deployment(tx, deployment_id))

        return await retry_deadlocks(attempt)

    async def place_queued(self) -> QueuePass:
        """One pass over the queue, oldest first, one transaction per deployment."""
        placed = failed = waiting = 0
        after: tuple[datetime, str] | None = None
        while True:
            async with self.db.transaction() as tx:
                claimed = await store.claim_queued(tx, after)
                if claimed is None:
                    break
                after = (claimed.created_at, claimed.id)
                result = await self._place(tx, claimed)
            if result.status is State.SCHEDULING:
                placed += 1
            elif result.status is State.FAILED:
                failed += 1
            else:
                waiting += 1
        if placed and self.on_placed is not None:
            self.on_placed()
        return QueuePass(placed, failed, waiting)

    async def run(self) -> None:
        """Retry queued deployments until they fit or their deadline passes."""

        async def queue_pass() -> None:
            result = await self.place_queued()
            if result.placed or result.failed:
                log.info("queue pass", extra=result.__dict__)

        await run_every(self.retry_seconds, queue_pass, "queue pass")

    async def _place(self, tx: Session, deployment: Deployment) -> Deployment:
        """Reserve on the best-fitting server that may take it and move to scheduling, or
        leave it queued (saying so when only other organizations' apps are in the way)."""
        ensure_transition(deployment.status, State.SCHEDULING)
        driver = PROCESS_DRIVER
        tenancy = Tenancy(
            deployment.organization_id, self.single_tenant, sandbox=deployment.needs_sandbox
        )
        tenants_in_the_way = False
        if self.reserve is None:
            placement = await store.place_deployment(
                tx,
                deployment,
                driver,
                tenancy,
                event_type=STATUS_CHANGED,
                audit_type=AUDIT_PREFIX + STATUS_CHANGED,
                actor_id=current_actor() or SYSTEM_ACTOR,
            )
            if placement.placed is not None:
                return placement.placed
            server_id, tenants_in_the_way = None, placement.tenants_in_the_way
        else:
            server_id = await self.reserve(
                tx, deployment.region, driver, deployment.resources, tenancy
            )
        if server_id is None:
            deadline = deployment.schedule_deadline
            if deadline is not None and self.clock() >= deadline:
                reason = (
                    f"{unisolated_reason(deployment.region)} (gave up at {deadline.isoformat()})"
                    if tenants_in_the_way
                    else f"no server in region {deployment.region!r} had room for "
                    f"{deployment.resources.ram_mb} MB RAM and "
                    f"{deployment.resources.cpu_millis} mCPU before {deadline.isoformat()}"
                )
                return await self.transition_in(tx, deployment, State.FAILED, reason=reason)
            waiting = unisolated_reason(deployment.region) if tenants_in_the_way else ""
            return await store.set_waiting_reason(tx, deployment, waiting)
        placed = await store.update_deployment(
            tx,
            deployment.id,
            State.SCHEDULING,
            reason="",
            server_id=server_id,
            capacity_reserved=True,
        )
        await self._changed(tx, deployment, placed)
        return placed

    # -------------------------------------------------------------------- lifecycle

    async def mark_starting(self, deployment_id: str) -> Deployment:
        return await self.transition(deployment_id, State.STARTING)

    async def mark_running(self, deployment_id: str) -> Deployment:
        return await self.transition(deployment_id, State.RUNNING)

    async def fail(
        self, deployment_id: str, reason: str, exit_code: int | None = None
    ) -> Deployment:
        return await self.transition(
            deployment_id, State.FAILED, reason=reason, exit_code=exit_code
        )

    async def cancel(self, deployment_id: str) -> Deployment:
        return await self.transition(
            deployment_id, State.CANCELLED, reason=f"cancelled by {current_actor() or 'system'}"
        )

    async def transition(
        self,
        deployment_id: str,
        new: DeploymentState,
        *,
        reason: str | None = None,
        exit_code: int | None = None,
    ) -> Deployment:

        async def attempt() -> Deployment:
            async with self.db.transaction() as tx:
                if new is State.RUNNING:
                    # One project reaches running at a time: the supersede below must see the
                    # project's current running deployment, not race another one to it.
                    project_id = (await store.get_deployment(tx, deployment_id)).project_id
                    await self.lock_project(tx, project_id)
                deployment = await store.lock_deployment(tx, deployment_id)
                return await self.transition_in(
                    tx, deployment, new, reason=reason, exit_code=exit_code
                )

        return await retry_deadlocks(attempt)

    async def roll_back(self, deployment_id: str) -> Deployment:
        """A new deployment from the last spec that ran before this one.

        This one keeps serving until the new one is running, then ends rolled_back (instead of
        superseded) and releases its capacity; if the new one fails, this one stays running.
        The earlier release runs with as many replicas as it had; the first is returned (the
        others are placed too, and the deploy sweep starts them).
        """
        async with self.db.transaction() as tx:
            # The project first (as every path that runs a release), then the row.
            await self.lock_project(tx, (await store.get_deployment(tx, deployment_id)).project_id)
            current = await store.lock_deployment(tx, deployment_id)
            ensure_transition(current.status, State.ROLLED_BACK)
            previous = await store.last_successful_before(tx, current)
            if previous is None:
                raise FailedPrecondition(
                    "no earlier deployment of this project ever ran",
                    reason="NOTHING_TO_ROLL_BACK_TO",
                )
            spec = DeploymentSpec.again(
                previous,
                release_reason=ReleaseReason.ROLLBACK,
                created_by=current_actor() or SYSTEM_ACTOR,
                rolled_back_from=current.id,
                # The project's settings now; the liveness check goes with the code, as its
                # health check path does.
                sleep_after_seconds=current.sleep_after_seconds,
                restart_policy=current.restart_policy,
            )
            placed = await self._insert_set(tx, spec, self.clock() + self.schedule_timeout)
            return placed[0]

    async def restart_with_new_config(
        self, tx: Session, project_id: str, actor: str
    ) -> Deployment | None:
        """A config change (project.config_changed, in its event's transaction): the
        project's serving release again as a new one, which starts with the secrets as they
        are now and supersedes it once running. Nothing when nothing serves."""
        await self.lock_project(tx, project_id)
        serving = await store.lock_serving_of_project(tx, project_id)
        if not serving:
            return None
        spec = DeploymentSpec.again(
            serving[0], release_reason=ReleaseReason.CONFIG_CHANGE, created_by=actor
        )
        placed = await self._insert_set(tx, spec, self.clock() + self.schedule_timeout)
        return placed[0]

    async def fail_over(self, tx: Session, deployment_id: str) -> Deployment | None:
        """A deployment placed on a server marked down (its agent fell silent): it fails,
        releasing its capacity there (counted once: the server's books lose it now, not
        again when the server returns), and the same release is created again and placed
        on another server (release reason failover), as the same replica of the same set:
        its sibling replicas go on (and it is placed away from them when a server fits).
        Its containers on the silent server are stopped if it ever answers again
        (Deployer.stop_unwanted). None when it has ended meanwhile or its server is up
        again."""
        first = await store.get_deployment(tx, deployment_id)
        await self.lock_project(tx, first.project_id)
        deployment = await store.lock_deployment(tx, deployment_id)
        if deployment.status in ENDS or deployment.server_id is None:
            return None
        server = await store.get_server(tx, deployment.server_id)
        if server.status != "down":
            return None
        await self.transition_in(
            tx,
            deployment,
            State.FAILED,
            reason=f"server {server.name} stopped answering: started again on another server",
            whole_set=False,
        )
        spec = DeploymentSpec.again(deployment, release_reason=ReleaseReason.FAILOVER).replica(
            deployment.replica_set_id, deployment.replica_index
        )
        release = await store.insert_deployment(tx, spec, self.clock() + self.schedule_timeout)
        await self._changed(tx, None, release)
        return await self._place(tx, release)

    async def ready_set(self, tx: Session, deployment: Deployment) -> list[Deployment] | None:
        """Whether a starting deployment may run now: every process of it runs, and it joins
        a set that already serves (a replacement) or completes one (every other replica is
        starting with every process running). The siblings that go running with it (locked),
        or None to wait."""
        if deployment.processes and not await self.all_running(tx, deployment):
            return None  # one process: the container that reported running
        if deployment.replicas == 1 or deployment.rolling:
            return []
        members = await store.lock_replica_set(tx, deployment.replica_set_id)
        others = [m for m in members if m.id != deployment.id and m.status not in ENDS]
        if any(m.status in SERVING for m in others):
            return []
        if len(others) != deployment.replicas - 1:
            return None
        for other in others:
            if other.status is not State.STARTING or not await self.all_running(tx, other):
                return None
        return others

    @staticmethod
    async def all_running(tx: Session, deployment: Deployment) -> bool:
        newest = await store.newest_containers(tx, deployment.id)
        return all(
            p.type in newest and newest[p.type].status == "running"
            for p in deployment.process_shares
        )

    @staticmethod
    async def lock_project(tx: Session, project_id: str) -> None:
        await store.advisory_xact_lock(tx, f"runtime.project:{project_id}")

    async def transition_in(
        self,
        tx: Session,
        deployment: Deployment,
        new: DeploymentState,
        *,
        reason: str | None = None,
        exit_code: int | None = None,
        whole_set: bool = True,
    ) -> Deployment:
        """`transition` inside the caller's transaction, on a row the caller locked (and, for
        RUNNING, after the caller took `lock_project`).

        Running supersedes every serving replica of the project's other sets. A replica
        that fails or is cancelled before its set ever served takes its siblings with it
        (`whole_set`): a release runs whole or not at all, and the one serving goes on."""
        ensure_transition(deployment.status, new)
        if new is State.RUNNING:
            await self._supersede_for(tx, deployment)
        if new not in HOLDS_CAPACITY:
            await store.release_capacity(tx, deployment.id)
        changed = await store.update_deployment(
            tx, deployment.id, new, reason=reason, exit_code=exit_code
        )
        await self._changed(tx, deployment, changed)
        if whole_set and deployment.replicas > 1 and new in (State.FAILED, State.CANCELLED):
            await self._end_unserved_set(tx, changed, reason or new.value)
        return changed

    async def _supersede_for(self, tx: Session, deployment: Deployment) -> None:
        """End what served before `deployment`'s set: rolled back when the user rolled back
        from it, else superseded."""
        previous = await store.lock_serving_of_project(
            tx, deployment.project_id, excluding_set=deployment.replica_set_id
        )
        if deployment.rolling:  # replica by replica: the old one of its index
            previous = [p for p in previous if p.replica_index == deployment.replica_index]
        rolled_back_set = ""
        if previous and deployment.rolled_back_from:
            origin = await store.get_deployment(tx, deployment.rolled_back_from)
            rolled_back_set = origin.replica_set_id
        for old in previous:
            rolled_back = old.replica_set_id == rolled_back_set
            await self.transition_in(
                tx,
                old,
                State.ROLLED_BACK if rolled_back else State.SUPERSEDED,
                reason=f"{'rolled back' if rolled_back else 'superseded'} by {deployment.id}",
                whole_set=False,
            )

    async def _end_unserved_set(self, tx: Session, ended: Deployment, reason: str) -> None:
        """`ended`'s siblings end as it did, unless one of them serves (then the set goes on
        without it)."""
        members = await store.lock_replica_set(tx, ended.replica_set_id)
        live = [m for m in members if m.status not in ENDS]
        if any(m.status in SERVING for m in live):
            return
        for member in live:
            if can_transition(member.status, ended.status):
                await self.transition_in(
                    tx,
                    member,
                    ended.status,
                    reason=f"replica {ended.replica_index} of this release "
                    f"{ended.status.value}: {reason}",
                    whole_set=False,
                )

    async def _changed(self, tx: Session, before: Deployment | None, after: Deployment) -> None:
        """The event and the audit entry of one status change, in its transaction."""
        payload: dict[str, object] = {
            "deployment_id": after.id,
            "project_id": after.project_id,
            "from": before.status.value if before else "",
            "to": after.status.value,
            "server_id": after.server_id,
            "capacity_reserved": after.capacity_reserved,
            "reason": without_log_lines(after.status_reason),
        }
        if after.exit_code is not None:
            payload["exit_code"] = after.exit_code
        await write_event(
            tx,
            SCHEMA,
            STATUS_CHANGED,
            organization_id=after.organization_id,
            aggregate_id=after.id,
            payload=payload,
        )
        await record_audit(
            tx,
            SCHEMA,
            organization_id=after.organization_id,
            action=STATUS_CHANGED,
            target_type="deployment",
            target_id=after.id,
            metadata={k: v for k, v in payload.items() if k != "deployment_id"},
            actor_id=current_actor() or SYSTEM_ACTOR,
        )
