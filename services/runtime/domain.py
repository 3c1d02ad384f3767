"""Runtime's rules as plain Python: the deployment state machine, server states, best fit,
which organizations may share a server."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from shared.errors import FailedPrecondition, InvalidArgument
from shared.resources import Resources


class DeploymentState(StrEnum):
    QUEUED = "queued"  # waiting for a server with room
    SCHEDULING = "scheduling"  # placed: capacity reserved, being handed to the agent
    BUILDING = "building"  # its agent builds its source in the sandbox, then starts it
    STARTING = "starting"  # the agent started it; health check not passed yet
    RUNNING = "running"
    # It ran, then kept crashing soon after each restart: its agent still restarts it (with
    # back-off), it is still placed and holds its capacity; back to running once it stays up.
    CRASH_LOOP = "crash_loop"
    SUPERSEDED = "superseded"  # a newer deployment of the project reached running
    FAILED = "failed"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"


S = DeploymentState

# The whole graph; anything else is refused.
TRANSITIONS: dict[DeploymentState, frozenset[DeploymentState]] = {
    S.QUEUED: frozenset({S.SCHEDULING, S.CANCELLED, S.FAILED}),
    S.SCHEDULING: frozenset({S.BUILDING, S.STARTING, S.CANCELLED, S.FAILED}),
    S.BUILDING: frozenset({S.STARTING, S.CANCELLED, S.FAILED}),
    S.STARTING: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.SUPERSEDED, S.FAILED, S.ROLLED_BACK, S.CRASH_LOOP}),
    # Stops as a running one does (superseded, rolled back, failed), or cancelled by its user.
    S.CRASH_LOOP: frozenset({S.RUNNING, S.SUPERSEDED, S.FAILED, S.ROLLED_BACK, S.CANCELLED}),
    S.SUPERSEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.ROLLED_BACK: frozenset(),
}

# States in which a deployment holds capacity on its server (capacity_reserved = true).
HOLDS_CAPACITY = frozenset({S.SCHEDULING, S.BUILDING, S.STARTING, S.RUNNING, S.CRASH_LOOP})
# The project's current release (at most one per project): it has run, and a newer one that
# reaches running supersedes it.
SERVING = frozenset({S.RUNNING, S.CRASH_LOOP})
CANCELLABLE = frozenset(s for s, nexts in TRANSITIONS.items() if S.CANCELLED in nexts)
ENDS = frozenset(s for s, nexts in TRANSITIONS.items() if not nexts)


def can_transition(current: DeploymentState, new: DeploymentState) -> bool:
    return new in TRANSITIONS[current]


def ensure_transition(current: DeploymentState, new: DeploymentState) -> None:
    """Refuse any move outside the graph with FAILED_PRECONDITION."""
    if not can_transition(current, new):
        raise FailedPrecondition(
            f"a {current.value} deployment cannot become {new.value}",
            reason="ILLEGAL_TRANSITION",
            metadata={"from": current.value, "to": new.value},
        )


LOG_LINES_HEADING = "\nlast log lines:\n"


def with_log_lines(reason: str, lines: Sequence[str]) -> str:
    """A status reason followed by the app's last log lines, when the agent sent some."""
    if not lines:
        return reason
    return reason + LOG_LINES_HEADING + "\n".join(lines)


def without_log_lines(reason: str) -> str:
    """The reason alone: what events and audit entries carry (an app's output may hold
    anything, and the audit trail is kept for good)."""
    return reason.split(LOG_LINES_HEADING, 1)[0]


def crash_loop_reason(exit_reason: str, restarts: int, lines: Sequence[str]) -> str:
    """A crash-looping deployment's status_reason: how its app last ended, and its last lines."""
    times = "once" if restarts == 1 else f"{restarts} times"
    return with_log_lines(
        f"{exit_reason or 'the app ended'} (crash loop: restarted {times})", lines
    )


class ServerState(StrEnum):
    ACTIVE = "active"  # accepts placements
    DRAINING = "draining"  # keeps what it runs, takes nothing new
    DOWN = "down"  # missed its heartbeats


class Isolation(StrEnum):
    """Whether a server's apps are isolated from each other (the agent's driver says)."""

    NONE = "none"  # plain processes: one organization's apps at a time
    CONTAINER = "container"  # each app in its own container: any organizations side by side


# A server's tenant (servers.tenant_organization_id) when several organizations hold
# capacity on it; None when none does.
SEVERAL_TENANTS = "*"


@dataclass(frozen=True)
class Tenancy:
    """Whose deployment a placement is for, and whether organizations may share a server
    without isolation (settings.single_tenant: the whole platform is one tenant's)."""

    organization_id: str
    share_unisolated: bool = False
    sandbox: bool = False  # it builds a source: only a server with the container sandbox


def tenant_of(organization_ids: Iterable[str]) -> str | None:
    """A server's tenant given the organizations of the deployments holding capacity on it."""
    distinct = set(organization_ids)
    if not distinct:
        return None
    return distinct.pop() if len(distinct) == 1 else SEVERAL_TENANTS


def unisolated_reason(region: str) -> str:
    """Why a deployment waits although servers have room: none of them may take it."""
    return (
        f"no server in region {region!r} is free for this organization: those with room run "
        "another organization's apps without isolation"
    )


def reservable(resources: Resources, field: str) -> Resources:
    """What a server offers or a deployment holds: positive RAM and CPU (bandwidth is metered
    per project, not reserved on a server: dropped); INVALID_ARGUMENT naming the field."""
    if resources.ram_mb <= 0:
        raise InvalidArgument.field(f"{field}.ram_mb", "must be positive")
    if resources.cpu_millis <= 0:
        raise InvalidArgument.field(f"{field}.cpu_millis", "must be positive")
    return resources.compute


@dataclass(frozen=True)
class Candidate:
    """A server as placement sees it: what it has and what is already reserved."""

    id: str
    capacity: Resources
    reserved: Resources

    @property
    def free(self) -> Resources:
        return self.capacity - self.reserved

    def fits(self, need: Resources) -> bool:
        return need.fits_in(self.free)


def best_fit_key(candidate: Candidate, need: Resources) -> tuple[int, int, str]:
    """Fewest leftover RAM, then CPU, then id (stable): store.reserve_capacity's ORDER BY."""
    free = candidate.free
    return (free.ram_mb - need.ram_mb, free.cpu_millis - need.cpu_millis, candidate.id)


def best_fit(candidates: Iterable[Candidate], need: Resources) -> Candidate | None:
    fitting = [c for c in candidates if c.fits(need)]
    return min(fitting, key=lambda c: best_fit_key(c, need)) if fitting else None


@dataclass(frozen=True)
class TenantDrift:
    """A server whose recorded tenant is not the organization(s) holding capacity on it."""

    server_id: str
    recorded: str | None
    actual: str | None

    @property
    def narrowing(self) -> bool:
        """Once several organizations', now one's: releases leave SEVERAL_TENANTS (which
        admits fewer, never more) until the server empties; not a fault."""
        return self.recorded == SEVERAL_TENANTS and self.actual is not None


def find_tenant_drift(
    servers: Iterable[tuple[str, str | None]], organizations: dict[str, list[str]]
) -> list[TenantDrift]:
    """(server id, recorded tenant) against the organizations of the deployments holding
    capacity on each server."""
    drift = []
    for server_id, recorded in servers:
        actual = tenant_of(organizations.get(server_id, ()))
        if actual != recorded:
            drift.append(TenantDrift(server_id, recorded, actual))
    return drift


@dataclass(frozen=True)
class Drift:
    """A server whose counters disagree with the deployments that hold capacity on it."""

    server_id: str
    recorded: Resources
    actual: Resources
    capacity: Resources

    @property
    def repairable(self) -> bool:
        """Counters may only be set to what the CHECK constraints allow."""
        return self.actual.fits_in(self.capacity)


def find_drift(
    servers: Iterable[tuple[str, Resources, Resources]], sums: dict[str, Resources]
) -> list[Drift]:
    """(server id, capacity, recorded reserved) against the per-server sums of reservations."""
    drift = []
    for server_id, capacity, recorded in servers:
        actual = sums.get(server_id, Resources())
        if actual != recorded:
            drift.append(Drift(server_id, recorded, actual, capacity))
    return drift


def required(value: str, field: str) -> str:
    """A text field that must not be blank, trimmed; INVALID_ARGUMENT naming it otherwise."""
    if not value.strip():
        raise InvalidArgument.field(field, "required")
    return value.strip()


class ReleaseReason(StrEnum):
    """Why a deployment (a release) exists."""

    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    CONFIG_CHANGE = "config_change"  # the project's secrets changed
    FAILOVER = "failover"  # its server fell silent: the same release on another server


# The Procfile process type a deployment runs when its request names none.
WEB = "web"
LATEST = "latest"  # source_sha256 naming the project's newest upload


@dataclass(frozen=True)
class ProcessShare:
    """One process type of a deployment and what its container gets."""

    type: str
    resources: Resources


# The least a process's share may be: below it, nothing runs.
MIN_PROCESS_RAM_MB = 16
MIN_PROCESS_CPU_MILLIS = 10


@dataclass(frozen=True)
class RequestedSource:
    """What a new deployment's request names to run: an image, a command, an uploaded
    source (its sha256, or LATEST), or none (the project's default); as one process type,
    or several with their shares in percent (0 everywhere: equal shares); as how many
    replicas."""

    image: str | None = None
    command: str | None = None
    source_sha256: str | None = None
    process_type: str = ""
    processes: tuple[tuple[str, int], ...] = ()
    image_command: str = ""
    replicas: int = 0  # 0: one
    max_surge: int | None = None  # None: the defaults of rollout_limits
    max_unavailable: int | None = None


# A project's secrets that are a private registry's credentials: handed to the image's pull
# only, never part of the app's environment.
REGISTRY_USERNAME = "HANGAR_REGISTRY_USERNAME"
REGISTRY_PASSWORD = "HANGAR_REGISTRY_PASSWORD"


def pinned_image(image: str, digest: str) -> str:
    """`image` ("registry/name:tag", "name@sha256:...") pinned to the manifest `digest`."""
    repository = image.split("@", 1)[0]
    last = repository.rsplit("/", 1)[-1]
    if ":" in last:  # a tag (a colon before the last "/" is a registry's port)
        repository = repository[: len(repository) - len(last)] + last.split(":", 1)[0]
    return f"{repository}@{digest}"


def split_processes(
    requested: Sequence[tuple[str, int]], total: Resources
) -> tuple[ProcessShare, ...]:
    """The deployment's RAM and CPU split between its process types as requested (percent
    each, or equal shares when every percent is 0); what rounding leaves goes to the first.
    INVALID_ARGUMENT naming the field for a bad list."""
    field = "deployment.processes"
    types = [process_type_of(name, f"{field}[{i}].type") for i, (name, _) in enumerate(requested)]
    if len(set(types)) != len(types):
        raise InvalidArgument.field(field, "each process type at most once")
    percents = [percent for _, percent in requested]
    if all(p == 0 for p in percents):
        percents = [100 // len(types)] * len(types)
        percents[0] += 100 - sum(percents)
    else:
        for i, percent in enumerate(percents):
            if not 1 <= percent <= 100:
                raise InvalidArgument.field(
                    f"{field}[{i}].percent", "1 to 100 (or 0 on every process: equal shares)"
                )
        if sum(percents) != 100:
            raise InvalidArgument.field(field, f"percents must sum to 100, not {sum(percents)}")
    ram = [total.ram_mb * p // 100 for p in percents]
    cpu = [total.cpu_millis * p // 100 for p in percents]
    ram[0] += total.ram_mb - sum(ram)
    cpu[0] += total.cpu_millis - sum(cpu)
    for i, (r, c) in enumerate(zip(ram, cpu, strict=True)):
        if r < MIN_PROCESS_RAM_MB or c < MIN_PROCESS_CPU_MILLIS:
            raise InvalidArgument.field(
                f"{field}[{i}].percent",
                f"gives {types[i]} {r} MB and {c} mCPU: at least {MIN_PROCESS_RAM_MB} MB and "
                f"{MIN_PROCESS_CPU_MILLIS} mCPU each",
            )
    return tuple(ProcessShare(t, Resources(r, c)) for t, r, c in zip(types, ram, cpu, strict=True))


MAX_REPLICAS = 20


def replica_share(total: Resources, requested: int) -> tuple[int, Resources]:
    """How many replicas (0 asks for 1) and each one's RAM and CPU: the project's
    allocation divided evenly, so the replicas together never hold more than it (what
    rounding leaves is not reserved). INVALID_ARGUMENT on deployment.replicas when out of
    range or when a share would be below a process's minimum."""
    replicas = requested or 1
    if not 1 <= replicas <= MAX_REPLICAS:
        raise InvalidArgument.field("deployment.replicas", f"1 to {MAX_REPLICAS}")
    share = Resources(total.ram_mb // replicas, total.cpu_millis // replicas)
    if share.ram_mb < MIN_PROCESS_RAM_MB or share.cpu_millis < MIN_PROCESS_CPU_MILLIS:
        raise InvalidArgument.field(
            "deployment.replicas",
            f"{replicas} replicas of the project's {total.ram_mb} MB and {total.cpu_millis} "
            f"mCPU get {share.ram_mb} MB and {share.cpu_millis} mCPU each: at least "
            f"{MIN_PROCESS_RAM_MB} MB and {MIN_PROCESS_CPU_MILLIS} mCPU each",
        )
    return replicas, share


def rollout_limits(replicas: int, surge: int | None, unavailable: int | None) -> tuple[int, int]:
    """(max surge, max unavailable) of a set of `replicas`: unset, start every replica and
    switch at once (replicas, 0); INVALID_ARGUMENT naming the field when out of range."""
    surge = replicas if surge is None else surge
    unavailable = unavailable or 0
    for field, value in (("max_surge", surge), ("max_unavailable", unavailable)):
        if not 0 <= value <= replicas:
            raise InvalidArgument.field(f"deployment.{field}", f"0 to replicas ({replicas})")
    if surge == unavailable == 0:
        raise InvalidArgument.field(
            "deployment.max_surge", "max_surge and max_unavailable cannot both be 0"
        )
    return surge, unavailable


def process_type_of(requested: str, field: str = "deployment.process_type") -> str:
    """The Procfile process type to run: the request's, else WEB."""
    name = requested.strip() or WEB
    if not all(c.isalnum() or c in "_-" for c in name) or len(name) > 63:
        raise InvalidArgument.field(field, "letters, digits, '_' and '-' only, at most 63")
    return name


def source_digest(value: str) -> str:
    """An uploaded source's sha256 as the request gives it (LATEST passes through)."""
    digest = required(value, "deployment.source_sha256").lower()
    if digest != LATEST and not is_sha256(digest):
        raise InvalidArgument.field(
            "deployment.source_sha256", "must be a sha256 (64 hex digits) or 'latest'"
        )
    return digest


def is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def choose_source(
    requested: RequestedSource, default_image: str, default_command: str
) -> tuple[str | None, str | None]:
    """(image, command): what the request names, else the project's default (a request
    naming a source is handled by the caller)."""
    if requested.image is not None:
        return required(requested.image, "deployment.image"), None
    if requested.command is not None:
        command = required(requested.command, "deployment.command")
    elif default_image:
        return default_image, None
    elif default_command:
        command = default_command
    else:
        raise InvalidArgument.field(
            "deployment.command", "required: the project has no default command or image"
        )
    if "\x00" in command:
        raise InvalidArgument.field("deployment.command", "must not contain NUL")
    return None, command
