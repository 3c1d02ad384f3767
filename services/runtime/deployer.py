"""Deployments that really run: placed ones are handed to their server's agent, agents'
reports move them on, ended ones have their containers stopped.

Where the work happens, and why it is replica-safe:
- The request path (CreateDeployment, Rollback, Cancel, a report that supersedes) kicks a
  background task for what it just changed, in a fresh context (no caller, no deadline), so
  the gRPC call returns at once with the deployment in scheduling and clients poll.
- A sweep loop, under a session advisory lock (one replica at a time), retries what a kick
  missed: a crash, an unreachable agent, a deployment the queue loop placed.
- Agent calls are never made inside a database transaction. Starts are idempotent on the
  container id (the row is created under the deployment's row lock, before the call), and
  stops are idempotent on the agent, so two replicas doing the same step change nothing
  twice; every status change re-checks the deployment under its row lock.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from hangar.agent.v1 import agent_pb2
from services.runtime import store
from services.runtime.agents import Agents, is_transient
from services.runtime.domain import (
    ENDS,
    HOLDS_CAPACITY,
    SERVING,
    DeploymentState,
    Isolation,
    crash_loop_reason,
    with_log_lines,
)
from services.runtime.projects import Projects
from services.runtime.scheduler import Scheduler
from services.runtime.sleeper import sleep_status_of
from services.runtime.store.records import Container, Deployment, RestartState, Server
from shared.db import Database, Session
from shared.errors import FailedPrecondition, NotFound, Unavailable
from shared.loops import cancel_and_wait, run_every
from shared.tracing import carried_on

log = logging.getLogger(__name__)

MAX_PARALLEL_STARTS = 8  # agent starts one sweep runs at once

State = DeploymentState
SWEEP_LOCK = "runtime.deployer.sweep"
AGENT_CHECK_LOCK = "runtime.deployer.agents"

# Agent container status -> the containers table's status.
CONTAINER_STATUS = {
    agent_pb2.CONTAINER_STATUS_STARTING: "starting",
    agent_pb2.CONTAINER_STATUS_RUNNING: "running",
    agent_pb2.CONTAINER_STATUS_STOPPING: "stopping",
    agent_pb2.CONTAINER_STATUS_EXITED: "stopped",
    agent_pb2.CONTAINER_STATUS_FAILED: "failed",
}
ENDED = ("stopped", "failed")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _last_request(report: agent_pb2.Container) -> datetime | None:
    return report.last_request_at.ToDatetime(UTC) if report.HasField("last_request_at") else None


def _restarts_of(report: agent_pb2.Container) -> RestartState:
    return RestartState(report.restart_count, report.crash_loop, report.last_exit_reason)


def _ended_reason(report: agent_pb2.Container) -> str:
    if report.reason:
        return report.reason
    if report.HasField("exit_code"):
        return f"exited with code {report.exit_code}"
    return "the process ended"


class Deployer:
    def __init__(
        self,
        db: Database,
        scheduler: Scheduler,
        agents: Agents,
        projects: Projects,
        *,
        start_timeout_seconds: float = 120.0,
        sweep_seconds: float = 5.0,
        heartbeat_timeout_seconds: float = 30.0,
        drain_seconds: float = 0.0,
    ) -> None:
        self.db = db
        self.scheduler = scheduler
        self.agents = agents
        self.projects = projects
        self.start_timeout = timedelta(seconds=start_timeout_seconds)
        self.sweep_seconds = sweep_seconds
        self.heartbeat_timeout = heartbeat_timeout_seconds
        self.drain_seconds = drain_seconds
        self._busy: set[str] = set()  # deployment / container ids this process is working on
        self._tasks: set[asyncio.Task[None]] = set()
        self._retrying: dict[str, int] = {}  # why starts will be retried -> how many

    # ------------------------------------------------------------------------ kicks

    def _spawn(self, step: str, work: Coroutine[Any, Any, None]) -> None:
        # A fresh context: the work outlives the request and must not act as its caller;
        # only its trace goes on (shared.tracing.carried_on: runtime -> agent).
        task = asyncio.get_running_loop().create_task(
            carried_on(f"runtime.deployer.{step}", work), context=contextvars.Context()
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def launch_soon(self, deployment_id: str) -> None:
        self._spawn("launch", self._logged(self.launch, deployment_id))

    def stop_soon(self) -> None:
        self._spawn("stop", self._logged(self.stop_ended))

    def sweep_soon(self) -> None:
        self._spawn("sweep", self._logged(self.sweep))

    @staticmethod
    async def _logged(fn: Callable[..., Awaitable[object]], *args: str) -> None:
        try:
            await fn(*args)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deploy step failed", extra={"step": fn.__name__})

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)

    # ----------------------------------------------------------------------- launch

    async def launch(self, deployment_id: str) -> None:
        """Hand a placed (scheduling) deployment to its agent; idempotent."""
        if deployment_id in self._busy:
            return
        self._busy.add(deployment_id)
        try:
            await self._launch(deployment_id)
        finally:
            self._busy.discard(deployment_id)

    async def _launch(self, deployment_id: str) -> None:
        decided: tuple[str, str] | None = None
        async with self.db.session() as s:
            deployment = await store.get_deployment(s, deployment_id)
            if deployment.waits_for_first_replica:
                decided = await store.decided_in_set(s, deployment.replica_set_id)
                if decided is None:
                    return  # started once the first replica built or pulled (sweep_soon)
        if deployment.status is not State.SCHEDULING:
            return
        try:
            resolved = await self.projects.resolve_secrets(deployment.project_id)
        except NotFound:
            await self.fail(deployment_id, "the project no longer exists")
            return
        except Unavailable as exc:
            await self._fail_if_overdue(deployment, f"secrets unavailable: {exc.message}")
            return
        async with self.db.transaction() as tx:
            deployment = await store.lock_deployment(tx, deployment_id)
            if deployment.status is not State.SCHEDULING:
                return
            if decided is not None:
                slug, digest = decided
                deployment = await store.record_built(
                    tx, deployment, slug_sha256=slug, image_digest=digest
                )
            await store.set_env_version(tx, deployment.id, resolved.version_hash)
            # A source is built once, by its first process's container; the others start
            # from the slug it stores (launch_rest). A slug already built: all at once.
            shares = deployment.process_shares
            first = shares[:1] if deployment.needs_build else shares
            containers = [await self._container_for(tx, deployment, p.type) for p in first]
            server = await store.get_server(tx, deployment.server_id)
        if not await self._start_all(server, deployment, containers, resolved.env):
            return
        async with self.db.transaction() as tx:
            deployment = await store.lock_deployment(tx, deployment_id)
            if deployment.status is State.SCHEDULING:
                deployment = await self.scheduler.transition_in(
                    tx, deployment, State.BUILDING if deployment.needs_build else State.STARTING
                )
        if deployment.status in ENDS:  # cancelled (or deleted) while the agent was starting it
            self.stop_soon()

    @staticmethod
    async def _container_for(tx: Session, deployment: Deployment, process_type: str) -> Container:
        """The process's live container, or a new one (created under the deployment's row
        lock, before the agent is called: starts are idempotent on its id)."""
        container = await store.container_of(tx, deployment.id, process_type)
        if container is None or not container.live:
            container = await store.insert_container(tx, deployment, process_type)
        return container

    async def _start_all(
        self,
        server: Server,
        deployment: Deployment,
        containers: list[Container],
        env: Mapping[str, str],
    ) -> bool:
        """Start the containers on their agent, together; False (the deployment failed, or
        is retried later) when one could not be."""
        results = await asyncio.gather(
            *(self.agents.start(server.agent_address, c, deployment, env) for c in containers),
            return_exceptions=True,
        )
        for container, result in zip(containers, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                if is_transient(result):
                    reason = (
                        f"the agent of server {server.name} did not take it: {result.details()}"
                    )
                    await self._fail_if_overdue(deployment, reason)
                else:
                    await self.fail(
                        deployment.id,
                        f"the agent refused to start it: {result.details()}",
                        container.id,
                    )
                return False
            if isinstance(result, BaseException):
                raise result
        async with self.db.transaction() as tx:
            for container, started in zip(containers, results, strict=True):
                assert isinstance(started, agent_pb2.StartContainerResponse)
                await store.update_container(
                    tx,
                    container.id,
                    address=started.address,
                    pid=started.pid,
                    started_at=_utcnow(),
                )
        return True

    def launch_rest_soon(self, deployment_id: str) -> None:
        self._spawn("launch_rest", self._logged(self.launch_rest, deployment_id))

    async def launch_rest(self, deployment_id: str) -> None:
        """Start the processes of a built deployment that have no live container yet (all
        but the one that built it); idempotent."""
        key = f"rest:{deployment_id}"
        if key in self._busy:
            return
        self._busy.add(key)
        try:
            async with self.db.session() as s:
                deployment = await store.get_deployment(s, deployment_id)
                newest = await store.newest_containers(s, deployment_id)
            if deployment.status not in (State.BUILDING, State.STARTING) or (
                deployment.needs_build
            ):
                return
            missing = [
                p.type
                for p in deployment.process_shares
                if p.type not in newest or not newest[p.type].live
            ]
            if not missing:
                return
            try:
                resolved = await self.projects.resolve_secrets(deployment.project_id)
            except (NotFound, Unavailable):
                return  # retried by the sweep; a deleted project ends the deployment anyway
            async with self.db.transaction() as tx:
                deployment = await store.lock_deployment(tx, deployment_id)
                if deployment.status not in (State.BUILDING, State.STARTING):
                    return
                containers = [await self._container_for(tx, deployment, t) for t in missing]
                server = await store.get_server(tx, deployment.server_id)
            await self._start_all(server, deployment, containers, resolved.env)
        finally:
            self._busy.discard(key)

    async def _fail_if_overdue(self, deployment: Deployment, reason: str) -> None:
        if _utcnow() - deployment.updated_at < self.start_timeout:
            # Counted, and logged once per sweep: one line per deployment per pass floods logs.
            self._retrying[reason] = self._retrying.get(reason, 0) + 1
            return
        await self.fail(deployment.id, reason)

    async def fail(
        self,
        deployment_id: str,
        reason: str,
        container_id: str = "",
        exit_code: int | None = None,
    ) -> None:
        """End a deployment as failed (releasing its capacity) unless it already ended."""
        async with self.db.transaction() as tx:
            deployment = await store.lock_deployment(tx, deployment_id)
            if container_id:
                await store.update_container(tx, container_id, status="failed")
            if deployment.status in ENDS:
                return
            await self.scheduler.transition_in(
                tx, deployment, State.FAILED, reason=reason, exit_code=exit_code
            )
        self.stop_soon()

    # ------------------------------------------------------------------- reports

    async def heartbeat(
        self,
        server: str,
        reports: list[agent_pb2.Container],
        *,
        isolation: Isolation | None = None,
    ) -> Server:
        """A beat from a server's agent: it is alive, its driver isolates apps or not (None:
        the agent did not say), and its containers are as reported."""
        async with self.db.transaction() as tx:
            found = await store.record_heartbeat(tx, server, isolation)
        if found is None:
            raise NotFound(f"no server {server!r} is registered", reason="SERVER_NOT_FOUND")
        if reports:
            async with self.db.session() as s:
                # Requests and sleep as the agent sees them (the sleep controller's input).
                await store.record_activity(
                    s,
                    found.id,
                    [(r.container_id, _last_request(r), sleep_status_of(r)) for r in reports],
                )
                known = await store.container_statuses(s, [r.container_id for r in reports])
            for report in reports:
                recorded = known.get(report.container_id)
                if recorded is not None and recorded != (
                    CONTAINER_STATUS.get(report.status),
                    _restarts_of(report),
                ):
                    await self.apply_report(found, report)
        return found

    async def report(self, server: str, report: agent_pb2.Container) -> None:
        async with self.db.session() as s:
            found = await store.find_server(s, server)
        if found is None:
            raise NotFound(f"no server {server!r} is registered", reason="SERVER_NOT_FOUND")
        await self.apply_report(found, report)

    async def apply_report(self, server: Server, report: agent_pb2.Container) -> None:
        """Move a container, and the deployment it serves, to what its agent saw."""
        status = CONTAINER_STATUS.get(report.status)
        if status is None:
            return
        async with self.db.session() as s:
            container = await store.get_container(s, report.container_id)
            if container is None or container.server_id != server.id:
                return  # not ours (or not on this server): nothing to move
            deployment = await store.get_deployment(s, container.deployment_id)
        async with self.db.transaction() as tx:
            if status == "running" and deployment.status in (
                State.SCHEDULING,
                State.BUILDING,
                State.STARTING,
                State.CRASH_LOOP,
            ):
                await self.scheduler.lock_project(tx, deployment.project_id)
            deployment = await store.lock_deployment(tx, deployment.id)
            updated = await store.update_container(
                tx,
                container.id,
                status=status,
                address=report.address or None,
                pid=report.pid or None,
                exit_code=report.exit_code if report.HasField("exit_code") else None,
                last_request_at=_last_request(report),
                sleep_status=sleep_status_of(report) if status not in ENDED else None,
                restarts=_restarts_of(report),
            )
            if updated is None:
                return
            newest = await store.container_of(tx, deployment.id, updated.process_type)
            if newest is None or newest.id != updated.id:
                return  # an older container of the deployment: it drives nothing
            undecided = (deployment.slug_sha256, deployment.image_digest)
            slugless = deployment.needs_build
            deployment, superseding = await self._follow(tx, deployment, updated, report)
            stop = superseding or (
                deployment.status in ENDS
                and (updated.live or bool(deployment.processes) or deployment.replicas > 1)
            )
            built = slugless and not deployment.needs_build and len(deployment.process_shares) > 1
            decided = deployment.replicas > 1 and undecided != (
                deployment.slug_sha256,
                deployment.image_digest,
            )
        if stop:
            self.stop_soon()
        if superseding and deployment.rolling:  # what the rollout's next step placed
            self.sweep_soon()
        if built:  # its other processes start from the slug just stored
            self.launch_rest_soon(deployment.id)
        if decided:  # its sibling replicas waited for this slug or digest
            self.sweep_soon()

    async def _follow(
        self, tx: Session, deployment: Deployment, container: Container, report: agent_pb2.Container
    ) -> tuple[Deployment, bool]:
        """The deployment as its (newest) container now is; True when it superseded another.

        Running once its app answered its health check, and only then does it supersede the
        project's serving deployment. Crash-looping while its agent says so (capacity held,
        the agent still restarting it), running again once the app stays up. Failed when the
        app ended for good, or when it crash-loops before runtime ever saw it running: a
        release that never worked does not replace the one serving (the agent restarts only
        apps that answered once, so this is the rare case of reports lost meanwhile).
        """
        exit_code = report.exit_code if report.HasField("exit_code") else None
        built = bool(report.slug_sha256) and deployment.needs_build  # its build succeeded
        pulled = bool(report.image_digest) and deployment.image is not None
        if built or (pulled and not deployment.image_digest):  # what the release runs
            deployment = await store.record_built(
                tx, deployment, slug_sha256=report.slug_sha256, image_digest=report.image_digest
            )
        if container.status in ENDED:  # on its own, or a sleeping app that did not start again
            if deployment.status in HOLDS_CAPACITY:
                reason = with_log_lines(_ended_reason(report), report.last_log_lines)
                deployment = await self.scheduler.transition_in(
                    tx, deployment, State.FAILED, reason=reason, exit_code=exit_code
                )
            return deployment, False
        if container.crash_loop:
            reason = crash_loop_reason(
                container.last_exit_reason, container.restart_count, report.last_log_lines
            )
            if deployment.status is State.RUNNING:
                deployment = await self.scheduler.transition_in(
                    tx, deployment, State.CRASH_LOOP, reason=reason
                )
            elif deployment.status in (State.SCHEDULING, State.BUILDING, State.STARTING):
                deployment = await self.scheduler.transition_in(
                    tx,
                    deployment,
                    State.FAILED,
                    reason=f"crash-looping before it was ever seen running: {reason}",
                )
            return deployment, False
        if deployment.status is State.BUILDING and not report.building and report.slug_sha256:
            deployment = await self.scheduler.transition_in(tx, deployment, State.STARTING)
        if container.status != "running":
            return deployment, False
        if deployment.status in (State.SCHEDULING, State.BUILDING):
            deployment = await self.scheduler.transition_in(tx, deployment, State.STARTING)
        if deployment.status is State.STARTING:
            waiting = await self.scheduler.ready_set(tx, deployment)
            if waiting is None:
                return deployment, False  # running once every process of every replica runs
            deployment = await self.scheduler.transition_in(tx, deployment, State.RUNNING)
            for sibling in waiting:  # the set switches over together
                await self.scheduler.transition_in(tx, sibling, State.RUNNING)
            if deployment.rolling:  # the rollout's next step (the sweep starts what it placed)
                await self.scheduler.advance(tx, deployment.replica_set_id)
            return deployment, True  # the deployments it superseded, if any, stop now
        if deployment.status is State.CRASH_LOOP:  # it stayed up: recovered
            deployment = await self.scheduler.transition_in(
                tx, deployment, State.RUNNING, reason=""
            )
        return deployment, False

    # ----------------------------------------------------------------------- stops

    async def stop_ended(self) -> int:
        """Stop every live container whose deployment has ended; the count stopped."""
        async with self.db.session() as s:
            pending = await store.containers_to_stop(s, self.drain_seconds)
        results = await asyncio.gather(
            *(self._stop(container, address) for container, address in pending),
            return_exceptions=True,
        )
        return sum(1 for r in results if r is True)

    async def _stop(self, container: Container, address: str) -> bool:
        key = f"stop:{container.id}"
        if key in self._busy:
            return False
        self._busy.add(key)
        try:
            try:
                info = await self.agents.stop(address, container.id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.NOT_FOUND:
                    log.warning(
                        "stop will be retried",
                        extra={"container_id": container.id, "code": exc.code().name},
                    )
                    return False
                status, exit_code = "stopped", None  # the agent has no such process
            else:
                status = CONTAINER_STATUS.get(info.status, "stopped")
                status = status if status in ENDED else "stopped"
                exit_code = info.exit_code if info.HasField("exit_code") else None
            async with self.db.transaction() as tx:
                await store.update_container(tx, container.id, status=status, exit_code=exit_code)
            return True
        finally:
            self._busy.discard(key)

    # ----------------------------------------------------------------- the agents' view

    async def check_agents(self, settled_seconds: float = 2.0) -> int:
        """Each agent's containers against the deployments. Starting and running deployments
        their agent does not run end failed (released); reports the agent sent while runtime
        was away are applied; containers it runs that no deployment wants are stopped.

        An agent that does not answer fails nothing: it may be restarting, and its apps run
        on without it. One that answers has adopted what it runs (an agent adopts its
        earlier self's apps before it serves), so what it does not list is gone. The count
        failed."""
        async with self.db.session() as s:
            rows = await store.deployments_on_agents(
                s,
                (State.BUILDING, State.STARTING, State.RUNNING, State.CRASH_LOOP),
                settled_seconds,
            )
            # Agents that beat lately: only those are asked about containers nobody wants
            # (an address of a server long silent may be another agent's by now).
            heard = set(await store.agents_heard_from(s, self.heartbeat_timeout))
        by_agent: dict[tuple[str, str], list[tuple[str, str]]] = {agent: [] for agent in heard}
        for deployment_id, container_id, server_id, address in rows:
            by_agent.setdefault((server_id, address), []).append((deployment_id, container_id))
        failed = 0
        for (server_id, address), items in by_agent.items():
            try:
                listed = await self.agents.list(address)
            except grpc.aio.AioRpcError as exc:
                log.warning("agent unreachable", extra={"address": address, "code": exc.code()})
                continue
            seen = {c.container_id: c for c in listed}
            async with self.db.session() as s:
                server = await store.get_server(s, server_id)
            for deployment_id, container_id in items:
                report = seen.get(container_id)
                if report is None:
                    await self.fail(
                        deployment_id,
                        f"the agent of server {server.name} does not run it",
                        container_id,
                    )
                    failed += 1
                else:
                    await self.apply_report(server, report)
            if (server_id, address) in heard:
                await self.stop_unwanted(server, listed)
        return failed

    async def stop_unwanted(self, server: Server, listed: list[agent_pb2.Container]) -> int:
        """Stops what a server's agent runs that no deployment wants, so that nothing is
        left running unaccounted: a container runtime has no row for (its organization was
        deleted), one whose deployment ended (stopped or replaced while the agent was away),
        or an older container of a deployment. The agent removes an ended container's
        files. The count stopped."""
        live = [c.container_id for c in listed if CONTAINER_STATUS.get(c.status) not in ENDED]
        if not live:
            return 0
        async with self.db.session() as s:
            claims = await store.container_claims(s, live, self.drain_seconds)
        stops: list[Awaitable[bool]] = []
        for container_id in live:
            claim = claims.get(container_id)
            if claim is None:
                stops.append(self._stop_unknown(server.agent_address, container_id))
            elif claim.container.server_id != server.id:
                continue  # another server's, as runtime knows it: not this agent's to judge
            elif claim.draining and claim.newest:
                continue  # serves what is in flight until its drain time ends (stop_ended)
            elif claim.deployment_status in ENDS or not claim.newest:
                stops.append(self._stop(claim.container, server.agent_address))
        if not stops:
            return 0
        log.warning(
            "stopping containers no deployment wants",
            extra={"server_id": server.id, "count": len(stops)},
        )
        results = await asyncio.gather(*stops, return_exceptions=True)
        return sum(1 for r in results if r is True)

    async def _stop_unknown(self, address: str, container_id: str) -> bool:
        try:
            await self.agents.stop(address, container_id)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                log.warning(
                    "stop will be retried",
                    extra={"container_id": container_id, "code": exc.code().name},
                )
                return False
        return True

    # ------------------------------------------------------------------------ sweep

    async def sweep(self) -> bool:
        """One replica's catch-up pass; False when another replica holds the sweep."""
        async with self.db.advisory_lock(SWEEP_LOCK) as held:
            if held is None:
                return False
            async with self.db.transaction() as tx:
                down = await store.mark_silent_servers_down(tx, self.heartbeat_timeout)
            if down:
                log.warning("servers missed their heartbeats", extra={"server_ids": down})
            await self.fail_over()
            await self.scheduler.advance_rollouts()
            async with self.db.session() as s:
                placed = await store.deployment_ids(s, (State.SCHEDULING,))
                # Built deployments of several processes whose others a kick missed.
                building = await store.deployment_ids(s, (State.BUILDING, State.STARTING))
            # A bounded number at a time: a backlog (an agent away, a fleet restarting)
            # must not flood the agents, project and this process all at once.
            limit = asyncio.Semaphore(MAX_PARALLEL_STARTS)

            async def launch_one(deployment_id: str) -> None:
                async with limit:
                    await self.launch(deployment_id)

            await asyncio.gather(*(launch_one(d) for d in placed), return_exceptions=True)
            await asyncio.gather(*(self.launch_rest(d) for d in building), return_exceptions=True)
            retrying, self._retrying = self._retrying, {}
            for reason, count in retrying.items():
                log.warning(
                    "starts will be retried", extra={"deployments": count, "reason": reason}
                )
            await self.stop_ended()
        return True

    async def fail_over(self) -> int:
        """What was placed on servers marked down starts again elsewhere (Scheduler.fail_over),
        one deployment per transaction; every sweep looks, so a pass cut short is finished
        by the next one. The count moved."""
        async with self.db.session() as s:
            stranded = await store.deployments_on_down_servers(s, tuple(HOLDS_CAPACITY))
        moved = 0
        for deployment_id in stranded:
            try:
                async with self.db.transaction() as tx:
                    release = await self.scheduler.fail_over(tx, deployment_id)
            except Exception:  # one that cannot move must not hold the others (or the sweep)
                log.exception("failover failed", extra={"deployment_id": deployment_id})
                continue
            if release is not None:
                moved += 1
                log.warning(
                    "deployment moved off a silent server",
                    extra={"deployment_id": deployment_id, "release_id": release.id},
                )
        return moved

    async def reconcile(self) -> int | None:
        """check_agents under its own advisory lock; None when another replica has it."""
        async with self.db.advisory_lock(AGENT_CHECK_LOCK) as held:
            if held is None:
                return None
            return await self.check_agents()

    async def run(self) -> None:
        await run_every(self.sweep_seconds, self.sweep, "deploy sweep")

    # --------------------------------------------------------------- tenant clean-up

    async def end_project(self, tx: Session, project_id: str) -> int:
        """project.deleted: every deployment of the project ends, releasing its capacity;
        its containers are stopped after the transaction commits. Idempotent."""
        ended = 0
        live = tuple(s for s in State if s not in ENDS)
        for deployment_id in await store.deployment_ids(tx, live, project_id=project_id):
            deployment = await store.lock_deployment(tx, deployment_id)
            if deployment.status in ENDS:
                continue
            new = State.FAILED if deployment.status in SERVING else State.CANCELLED
            try:
                await self.scheduler.transition_in(
                    tx, deployment, new, reason="the project was deleted"
                )
            except FailedPrecondition:
                continue
            ended += 1
        return ended
