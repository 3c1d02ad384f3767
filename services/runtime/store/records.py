"""Runtime's rows as Python records."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg

from services.runtime.domain import (
    Candidate,
    DeploymentState,
    Isolation,
    ProcessShare,
    ReleaseReason,
    ServerState,
    pinned_image,
)
from shared.db import from_row
from shared.resources import Resources

S = "runtime"


def processes_to_json(processes: tuple[ProcessShare, ...]) -> list[dict[str, object]]:
    return [
        {"type": p.type, "ram_mb": p.resources.ram_mb, "cpu_millis": p.resources.cpu_millis}
        for p in processes
    ]


def processes_from_json(value: object) -> tuple[ProcessShare, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(
        ProcessShare(str(p["type"]), Resources(int(p["ram_mb"]), int(p["cpu_millis"])))
        for p in value
    )


def rolling(replicas: int, max_surge: int, max_unavailable: int) -> bool:
    """A replica set that replaces the serving one a few replicas at a time
    (Scheduler.advance); otherwise every replica starts, then the whole set switches."""
    return max_surge < replicas or max_unavailable > 0


@dataclass(frozen=True)
class Server:
    id: str
    name: str
    region: str
    agent_address: str
    drivers: tuple[str, ...]
    capacity: Resources
    reserved: Resources
    status: ServerState
    last_heartbeat_at: datetime | None
    created_at: datetime
    isolation: Isolation
    # The organization holding capacity here; SEVERAL_TENANTS for several, None for none.
    tenant_organization_id: str | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Server:
        return from_row(
            cls,
            row,
            drivers=tuple(row["drivers"]),
            capacity=Resources.from_row(row),
            reserved=Resources.from_row(row, suffix="_reserved"),
            status=ServerState(row["status"]),
            isolation=Isolation(row["isolation"]),
        )

    def candidate(self) -> Candidate:
        return Candidate(self.id, self.capacity, self.reserved)


@dataclass(frozen=True)
class Deployment:
    id: str
    project_id: str
    organization_id: str
    server_id: str
    status: DeploymentState
    capacity_reserved: bool
    image: str | None
    command: str | None
    resources: Resources
    region: str
    health_check_path: str
    env_version: str
    exit_code: int | None
    status_reason: str
    rolled_back_from: str
    schedule_deadline: datetime | None
    sleep_after_seconds: int | None  # None: never put to sleep
    created_at: datetime
    updated_at: datetime
    restart_policy: str = "on-failure"  # what its agent does when the app ends on its own
    liveness_check_path: str = ""  # empty: no liveness check
    liveness_period_seconds: int = 10
    liveness_failure_threshold: int = 3
    source_sha256: str = ""  # the uploaded source it builds (empty: a command or an image)
    slug_sha256: str = ""  # the built app it runs, once built
    process_type: str = "web"
    release_reason: ReleaseReason = ReleaseReason.DEPLOY
    created_by: str = ""
    processes: tuple[ProcessShare, ...] = ()  # several process types; empty: process_type
    image_command: str = ""  # with an image: what replaces its Cmd
    image_digest: str = ""  # the digest its image's tag resolved to, once pulled
    # One replica of a release: the set's id (the first replica's id), which of how many.
    replica_set_id: str = ""
    replica_index: int = 0
    replicas: int = 1
    # How its set replaces the serving one (Kubernetes' rolling update); held: a replica
    # waiting for the rollout's room (the queue pass leaves it alone).
    max_surge: int = 1
    max_unavailable: int = 0
    held: bool = False

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Deployment:
        return from_row(
            cls,
            row,
            status=DeploymentState(row["status"]),
            resources=Resources.from_row(row),
            release_reason=ReleaseReason(row["release_reason"]),
            processes=processes_from_json(row["processes"]),
        )

    @property
    def process_shares(self) -> tuple[ProcessShare, ...]:
        """Every process it runs with its share: its `processes`, else its one process
        type with all of its resources."""
        if self.processes:
            return self.processes
        return (ProcessShare(self.process_type, self.resources),)

    def share_of(self, process_type: str) -> ProcessShare:
        for share in self.process_shares:
            if share.type == process_type:
                return share
        return self.process_shares[0]

    @property
    def needs_build(self) -> bool:
        return bool(self.source_sha256) and not self.slug_sha256

    @property
    def rolling(self) -> bool:
        return rolling(self.replicas, self.max_surge, self.max_unavailable)

    @property
    def waits_for_first_replica(self) -> bool:
        """A later replica of a release whose slug or image digest is not decided yet: it
        runs what the set's first replica built or pulled, never a build or a tag of its
        own."""
        unpinned = self.image is not None and not self.image_digest and "@" not in self.image
        return self.replica_index > 0 and (self.needs_build or unpinned)

    @property
    def needs_sandbox(self) -> bool:
        """Tenant code is built from it, or an image: only the container sandbox runs it."""
        return bool(self.source_sha256) or self.image is not None

    @property
    def image_to_run(self) -> str:
        """Its image, pinned to the digest it resolved to once it has (never the tag again)."""
        assert self.image is not None
        return pinned_image(self.image, self.image_digest) if self.image_digest else self.image


@dataclass(frozen=True)
class DeploymentSpec:
    """What a new deployment runs and needs, copied from the project at creation."""

    project_id: str
    organization_id: str
    resources: Resources
    region: str
    image: str | None = None
    command: str | None = None
    health_check_path: str = ""
    rolled_back_from: str = ""
    sleep_after_seconds: int | None = None  # the project's, when it sleeps idle apps
    restart_policy: str = "on-failure"  # the project's restart and liveness settings
    liveness_check_path: str = ""
    liveness_period_seconds: int = 10
    liveness_failure_threshold: int = 3
    source_sha256: str | None = None  # an uploaded source, built before it runs
    slug_sha256: str = ""  # a slug already built from it (a rollback, a config change)
    process_type: str = "web"
    release_reason: ReleaseReason = ReleaseReason.DEPLOY
    created_by: str = ""
    processes: tuple[ProcessShare, ...] = ()
    image_command: str = ""
    replicas: int = 1  # a new replica set of this many, each with `resources`
    max_surge: int | None = None  # None: replicas (start them all, then switch at once)
    max_unavailable: int = 0
    # A replacement within an existing set (failover): that set and the replaced index.
    replica_set_id: str = ""
    replica_index: int = 0

    @classmethod
    def again(cls, deployment: Deployment, **changes: Any) -> DeploymentSpec:
        """What `deployment` ran, as a new deployment's spec (a rollback, a config change:
        the same command, image or slug, nothing built again), with `changes`."""
        spec = cls(
            project_id=deployment.project_id,
            organization_id=deployment.organization_id,
            resources=deployment.resources,
            region=deployment.region,
            # The image as it ran: pinned to its digest.
            image=deployment.image_to_run if deployment.image is not None else None,
            image_command=deployment.image_command,
            command=deployment.command,
            source_sha256=deployment.source_sha256 or None,
            slug_sha256=deployment.slug_sha256,
            process_type=deployment.process_type,
            processes=deployment.processes,
            health_check_path=deployment.health_check_path,
            sleep_after_seconds=deployment.sleep_after_seconds,
            restart_policy=deployment.restart_policy,
            liveness_check_path=deployment.liveness_check_path,
            liveness_period_seconds=deployment.liveness_period_seconds,
            liveness_failure_threshold=deployment.liveness_failure_threshold,
            replicas=deployment.replicas,
            max_surge=deployment.max_surge,
            max_unavailable=deployment.max_unavailable,
        )
        return replace(spec, **changes)

    @property
    def rolling(self) -> bool:
        surge = self.replicas if self.max_surge is None else self.max_surge
        return rolling(self.replicas, surge, self.max_unavailable)

    def replica(self, replica_set_id: str, index: int) -> DeploymentSpec:
        """This spec as replica `index` of the set `replica_set_id`."""
        return replace(self, replica_set_id=replica_set_id, replica_index=index)

    @property
    def processes_json(self) -> list[dict[str, object]]:
        return processes_to_json(self.processes)

    @property
    def needs_sandbox(self) -> bool:
        """Tenant code is built from it, or an image: only a server with the container
        sandbox takes it."""
        return self.source_sha256 is not None or self.image is not None


@dataclass(frozen=True)
class Source:
    """An uploaded source archive of a project."""

    project_id: str
    sha256: str
    size_bytes: int
    created_by: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Source:
        return from_row(cls, row)


@dataclass(frozen=True)
class RestartState:
    """A container's restarts as its agent reports them."""

    count: int = 0
    crash_loop: bool = False
    last_exit_reason: str = ""


# Database container states; "stopped" and "failed" are ends.
CONTAINER_LIVE = ("starting", "running", "stopping")
_CONTAINER_RANK = {"starting": 0, "running": 1, "stopping": 2, "stopped": 3, "failed": 3}


@dataclass(frozen=True)
class Container:
    id: str
    project_id: str
    deployment_id: str
    server_id: str
    status: str
    sleep_status: str
    address: str
    pid: int | None
    exit_code: int | None
    last_request_at: datetime | None
    started_at: datetime | None
    stopped_at: datetime | None
    created_at: datetime
    restart_count: int = 0  # times its agent started the app again after it crashed
    crash_loop: bool = False
    last_exit_reason: str = ""
    process_type: str = "web"

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Container:
        return from_row(cls, row)

    @property
    def live(self) -> bool:
        return self.status in CONTAINER_LIVE
