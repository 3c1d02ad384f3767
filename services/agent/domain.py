"""The agent's rules as plain Python: what a container is, the states it goes through, what a
start request must say (with its restart policy and liveness check), and the bounded
per-container log buffer that telemetry ships."""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum

from services.agent.image_users import ImageUser
from shared.errors import FieldViolation, InvalidArgument
from shared.resources import Resources

# Env names a POSIX shell accepts; anything else could not be read by the app anyway.
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_GRACE_SECONDS = 300.0
MAX_LIVENESS_PERIOD_SECONDS = 3600.0
MAX_LIVENESS_FAILURE_THRESHOLD = 100
# Lines the agent itself writes into an app's logs start with this (never the app's own).
AGENT_NOTICE = "[hangar agent]"


def utcnow() -> datetime:
    return datetime.now(UTC)


class ContainerState(StrEnum):
    STARTING = "starting"  # process started, health check not passed yet
    RUNNING = "running"  # health check passed
    STOPPING = "stopping"  # SIGTERM sent on request, waiting for the process to end
    EXITED = "exited"  # ended on its own after it had been running
    FAILED = "failed"  # could not start, ended during start-up, or never became healthy
    STOPPED = "stopped"  # ended because StopContainer (or the agent's shutdown) asked

    @property
    def ended(self) -> bool:
        return self in (ContainerState.EXITED, ContainerState.FAILED, ContainerState.STOPPED)


class SleepState(StrEnum):
    AWAKE = "awake"
    SLEEPING = "sleeping"  # its process stopped for idleness; its public port still open
    WAKING = "waking"  # a connection arrived: the process is starting again


def exit_code_of(returncode: int) -> int:
    """A process's exit code the way a shell reports it: killed by signal N -> 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"


class RestartPolicy(StrEnum):
    """What the agent does when an app that has been healthy ends without being asked to."""

    ON_FAILURE = "on-failure"  # restart after a non-zero exit, a signal, an OOM kill or a
    # failed liveness check; an exit with code 0 ends the container
    ALWAYS = "always"  # restart after any end, exit code 0 included
    NEVER = "never"  # the container ends with the app


@dataclass(frozen=True)
class LivenessCheck:
    """GET `path` on the app every `period_seconds` once it is healthy; `failure_threshold`
    failures in a row and the agent stops the app (which then restarts per its policy)."""

    path: str
    period_seconds: float = 10.0
    failure_threshold: int = 3

    def violations(self, prefix: str = "liveness_") -> list[FieldViolation]:
        found = []
        if not self.path.startswith("/"):
            found.append(FieldViolation(f"{prefix}check_path", "must start with '/'"))
        elif "\x00" in self.path or any(c.isspace() for c in self.path):
            found.append(FieldViolation(f"{prefix}check_path", "must not contain spaces or NUL"))
        if not 0 < self.period_seconds <= MAX_LIVENESS_PERIOD_SECONDS:
            found.append(
                FieldViolation(f"{prefix}period", f"between 0 and {MAX_LIVENESS_PERIOD_SECONDS:g}s")
            )
        if not 1 <= self.failure_threshold <= MAX_LIVENESS_FAILURE_THRESHOLD:
            found.append(
                FieldViolation(
                    f"{prefix}failure_threshold",
                    f"between 1 and {MAX_LIVENESS_FAILURE_THRESHOLD}",
                )
            )
        return found


@dataclass(frozen=True)
class ContainerSpec:
    """What runtime asks the agent to run."""

    container_id: str
    deployment_id: str = ""
    project_id: str = ""
    command: str = ""
    image: str = ""
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # secrets: never logged
    resources: Resources = field(default_factory=Resources)  # limits: RAM, CPU (0: none)
    health_check_path: str = ""  # empty: the app is up once its port accepts connections
    restart_policy: RestartPolicy = RestartPolicy.ON_FAILURE
    liveness: LivenessCheck | None = None  # None: no liveness check once it is healthy
    # Built from an uploaded source (fetched from runtime) before it starts, or run from a
    # slug already built; `command` then overrides the Procfile's command for process_type.
    source_sha256: str = ""
    slug_sha256: str = ""
    process_type: str = ""
    app_dir: str = ""  # where its slug is unpacked on this server, once it is
    # A container image: its command replacing the image's Cmd, the pull's credentials
    # (dropped once pulled); once pulled, its unpacked root, argv and working directory.
    image_command: str = ""
    registry_username: str = ""
    registry_password: str = field(default="", repr=False)
    image_root: str = ""
    args: tuple[str, ...] = ()
    workdir: str = ""
    image_user: ImageUser | None = None  # the image's own user, when not root

    def validate(self) -> None:
        violations = []
        if not self.container_id:
            violations.append(FieldViolation("container_id", "required"))
        elif not _CONTAINER_ID.match(self.container_id):
            violations.append(
                FieldViolation("container_id", "1 to 128 of letters, digits, '-', '_', '.'")
            )
        built = bool(self.source_sha256 or self.slug_sha256)
        if [bool(self.image.strip()), bool(self.command.strip() or built)].count(True) != 1:
            violations.append(
                FieldViolation("source", "exactly one of command, image or a source to build")
            )
        if self.image_command and not self.image:
            violations.append(FieldViolation("image_command", "only with an image"))
        for name in ("source_sha256", "slug_sha256"):
            digest = getattr(self, name)
            if digest and not _SHA256.match(digest):
                violations.append(FieldViolation(name, "must be 64 lowercase hex digits"))
        if "\x00" in self.command:
            violations.append(FieldViolation("command", "must not contain NUL"))
        for name, value in self.env.items():
            if not _ENV_NAME.match(name):
                violations.append(FieldViolation(f"env[{name!r}]", "not a valid variable name"))
            elif "\x00" in value:
                violations.append(FieldViolation(f"env[{name}]", "value must not contain NUL"))
        violations += [
            FieldViolation(f"resources.{name}", "must not be negative")
            for name, value in self.resources.items()
            if value < 0
        ]
        if self.health_check_path and not self.health_check_path.startswith("/"):
            violations.append(FieldViolation("health_check_path", "must start with '/'"))
        if self.liveness is not None:
            violations += self.liveness.violations()
        if violations:
            raise InvalidArgument(violations)

    @property
    def serves_http(self) -> bool:
        """A web process (the default) gets traffic and is health-checked over HTTP; any
        other process type (a worker) is healthy while it runs."""
        return self.process_type in ("", "web")

    def same_container(self, other: ContainerSpec) -> bool:
        """Whether a repeated start names the container already known (idempotency)."""
        return (self.deployment_id, self.project_id) == (other.deployment_id, other.project_id)


@dataclass(frozen=True)
class ContainerInfo:
    """A container as the agent sees it at one moment (what GetContainer answers)."""

    container_id: str
    deployment_id: str
    project_id: str
    state: ContainerState
    address: str = ""
    port: int = 0
    pid: int = 0
    exit_code: int | None = None
    reason: str = ""
    started_at: datetime | None = None  # of the current run (a wake starts a new one)
    ended_at: datetime | None = None
    sleep: SleepState = SleepState.AWAKE
    run: int = 1  # 1 at the start, one more at each wake and each restart
    last_request_at: datetime | None = None  # a client connection last open
    restarts: int = 0  # times the app ended on its own and the agent starts it again (the
    # start a back-off waits for included)
    last_exit_reason: str = ""  # why its last run ended on its own (a crash, a kill...)
    last_log_lines: tuple[str, ...] = ()  # the app's last lines before that end
    crash_loop: bool = False  # it keeps crashing soon after each start (still restarted)
    restart_delay: float = 0.0  # the back-off before its next start; 0: none pending
    next_restart_at: datetime | None = None  # when that start is due
    building: bool = False  # its source is being built, or image pulled (still STARTING)
    image_digest: str = ""  # the manifest digest of the image it runs, once pulled
    slug_sha256: str = ""  # the slug it runs, once built (or as it was started from)

    def with_changes(self, **changes: object) -> ContainerInfo:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ResourceSample:
    """One psutil reading of a container's process tree, with its network bytes when the
    driver counts them (the process driver's ingress proxy); None when it does not."""

    container_id: str
    rss_bytes: int
    cpu_seconds: float  # user + system, including children that have ended
    sampled_at: datetime
    rx_bytes: int | None = None  # cumulative, received from clients
    tx_bytes: int | None = None  # cumulative, sent to clients
    run: int = 1  # the container's process run it was read from (see ContainerInfo.run)


class LogStream(StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"
    BUILD = "build"  # a build's output (and a release command's)


@dataclass(frozen=True)
class LogLine:
    sequence: int  # per container, strictly increasing from 1 (runtime drops re-sent lines)
    stream: LogStream
    text: str
    emitted_at: datetime


class LogBuffer:
    """The newest `capacity` lines of one container; older ones are dropped and counted.

    Shipping (telemetry) reads `since(acknowledged)` and acknowledges what runtime stored;
    while runtime is away the buffer keeps the newest lines and `dropped` says how many went.
    Sequences are contiguous, so the lines sit in a ring indexed by sequence: `since` costs
    what it returns, not the size of the buffer.
    """

    def __init__(self, capacity: int = 5000, max_line_chars: int = 16 * 1024) -> None:
        if capacity < 1:
            raise ValueError("a log buffer holds at least one line")
        self.capacity = capacity
        self.max_line_chars = max_line_chars
        self._ring: list[LogLine | None] = [None] * capacity  # line n at n % capacity
        self._first_sequence = 1  # the oldest line kept
        self._next_sequence = 1
        self.dropped = 0  # lines evicted before anyone acknowledged them
        self.trimmed = 0  # lines cut to max_line_chars
        self.acknowledged = 0  # highest sequence runtime confirmed it stored
        # An adopted container's lines continue past the sequences an earlier agent could
        # have issued: those are neither this buffer's to reuse nor its losses to count.
        self.resumed_after = 0

    def resume_after(self, sequence: int) -> None:
        """Continue an earlier agent's sequences (an empty buffer only)."""
        if self._next_sequence != 1:
            raise ValueError("only an empty buffer resumes")
        self._first_sequence = self._next_sequence = sequence + 1
        self.acknowledged = self.resumed_after = sequence

    def append(self, stream: LogStream, text: str, at: datetime | None = None) -> LogLine:
        if len(text) > self.max_line_chars:
            text = text[: self.max_line_chars]
            self.trimmed += 1
        sequence = self._next_sequence
        line = LogLine(sequence, stream, text, at or utcnow())
        if sequence - self._first_sequence == self.capacity:  # full: the oldest goes
            if self._first_sequence > self.acknowledged:
                self.dropped += 1
            self._first_sequence += 1
        self._ring[sequence % self.capacity] = line
        self._next_sequence = sequence + 1
        return line

    def since(self, sequence: int = 0, limit: int | None = None) -> list[LogLine]:
        """Lines after `sequence`, oldest first (at most `limit`)."""
        start = max(sequence + 1, self._first_sequence)
        end = self._next_sequence
        if limit is not None:
            end = min(end, start + max(limit, 0))
        ring, capacity = self._ring, self.capacity
        return [ring[n % capacity] for n in range(start, end)]  # type: ignore[misc]

    def acknowledge(self, sequence: int) -> None:
        self.acknowledged = max(self.acknowledged, sequence)

    @property
    def last_sequence(self) -> int:
        return self._next_sequence - 1

    @property
    def first_sequence(self) -> int:
        """The oldest line still kept (last_sequence + 1 while empty)."""
        return self._first_sequence

    def __len__(self) -> int:
        return self._next_sequence - self._first_sequence

    def text(self, stream: LogStream | None = None) -> str:
        """Every kept line joined (tests and debugging)."""
        return "\n".join(
            line.text for line in self.since(0) if stream is None or line.stream is stream
        )
