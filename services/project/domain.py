"""Project's rules as plain Python: what a valid project and secret look like, field masks,
pool arithmetic for resizes, page tokens and the secrets version hash. No I/O here."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

from shared.errors import FieldViolation, InvalidArgument
from shared.resources import DIMENSIONS, Resources

SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
SECRET_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
REGION = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
URL = re.compile(r"^(https?|ssh|git)://[^\s/$.?#][^\s]*$|^git@[^\s:]+:[^\s]+$")
IMAGE = re.compile(r"^[a-z0-9]+([._/:@-][A-Za-z0-9_.-]+)*$")
HTTP_PATH = re.compile(r"^/[^\s]*$")

MAX_SLUG = 40
MAX_NAME = 100
MAX_DESCRIPTION = 2000
MAX_URL = 2048
MAX_COMMAND = 4096
MAX_IMAGE = 512
MAX_PATH = 512
MAX_REGION = 32
MAX_SECRET_NAME = 128
MAX_SECRET_VALUE = 64 * 1024  # bytes of UTF-8

# Bounds a single project may ask for; the org's pool is billing's to enforce.
RAM_MB = (32, 256 * 1024)
CPU_MILLIS = (10, 64_000)
BANDWIDTH_GB = (0, 100_000)
SLEEP_AFTER_SECONDS = (30, 7 * 86400)
LIVENESS_PERIOD_SECONDS = (1, 3600)
LIVENESS_FAILURE_THRESHOLD = (1, 100)
# What the agent does when an app ends on its own after it was healthy (agent.RestartPolicy).
RESTART_POLICIES = ("on-failure", "always", "never")

# Server-side defaults for fields a create leaves unset (proto3 zero values).
DEFAULT_RAM_MB = 256
DEFAULT_CPU_MILLIS = 250
DEFAULT_SLEEP_AFTER_SECONDS = 900
DEFAULT_RESTART_POLICY = "on-failure"
DEFAULT_LIVENESS_PERIOD_SECONDS = 10
DEFAULT_LIVENESS_FAILURE_THRESHOLD = 3
DEFAULT_REGION = "local"

PERM_LIST = "projects.list"
PERM_GET = "projects.get"
PERM_CREATE = "projects.create"
PERM_UPDATE = "projects.update"
PERM_DELETE = "projects.delete"
PERM_SECRETS_LIST = "secrets.list"
PERM_SECRETS_REVEAL = "secrets.reveal"
PERM_SECRETS_WRITE = "secrets.write"
PERM_SECRETS_DELETE = "secrets.delete"


@dataclass(frozen=True)
class ProjectSpec:
    """The fields a caller sets on a project."""

    name: str
    slug: str
    resources: Resources  # reserved from the organization's pool
    region: str
    sleep_enabled: bool
    sleep_after_seconds: int
    description: str = ""
    repository_url: str = ""
    default_command: str = ""
    default_image: str = ""
    health_check_path: str = ""
    restart_policy: str = DEFAULT_RESTART_POLICY  # one of RESTART_POLICIES
    liveness_check_path: str = ""  # empty: no liveness check
    liveness_period_seconds: int = DEFAULT_LIVENESS_PERIOD_SECONDS
    liveness_failure_threshold: int = DEFAULT_LIVENESS_FAILURE_THRESHOLD


# Update-mask paths: every field, and each resource dimension on its own ("resources" in a
# mask stands for all three).
RESOURCES = "resources"
RESOURCE_PATHS = tuple(f"{RESOURCES}.{name}" for name in DIMENSIONS)
UPDATABLE = (*(f.name for f in fields(ProjectSpec) if f.name != RESOURCES), *RESOURCE_PATHS)


def spec_value(spec: ProjectSpec, path: str) -> Any:
    """The value at an update path ("slug", "resources.ram_mb")."""
    head, _, dimension = path.partition(".")
    value = getattr(spec, head)
    return getattr(value, dimension) if dimension else value


@dataclass(frozen=True)
class Project:
    id: str
    organization_id: str
    spec: ProjectSpec
    created_at: datetime
    updated_at: datetime
    organization_slug: str = ""  # identity's, as this service last learned it ("" not yet)


def with_create_defaults(spec: ProjectSpec) -> ProjectSpec:
    return replace(
        spec,
        resources=replace(
            spec.resources,
            ram_mb=spec.resources.ram_mb or DEFAULT_RAM_MB,
            cpu_millis=spec.resources.cpu_millis or DEFAULT_CPU_MILLIS,
        ),
        sleep_after_seconds=spec.sleep_after_seconds or DEFAULT_SLEEP_AFTER_SECONDS,
        region=spec.region or DEFAULT_REGION,
        restart_policy=spec.restart_policy or DEFAULT_RESTART_POLICY,
        liveness_period_seconds=spec.liveness_period_seconds or DEFAULT_LIVENESS_PERIOD_SECONDS,
        liveness_failure_threshold=(
            spec.liveness_failure_threshold or DEFAULT_LIVENESS_FAILURE_THRESHOLD
        ),
    )


def _bounded(value: int, bounds: tuple[int, int], field: str) -> FieldViolation | None:
    low, high = bounds
    if not low <= value <= high:
        return FieldViolation(field, f"must be between {low} and {high}")
    return None


def _text(value: str, field: str, limit: int, pattern: re.Pattern[str] | None, rule: str) -> Any:
    if not value:
        return None
    if len(value) > limit:
        return FieldViolation(field, f"at most {limit} characters")
    if "\x00" in value:
        return FieldViolation(field, "must not contain NUL")
    if pattern is not None and not pattern.match(value):
        return FieldViolation(field, rule)
    return None


def slug_violation(slug: str, field: str = "project.slug") -> FieldViolation | None:
    if not slug:
        return FieldViolation(field, "required")
    if len(slug) > MAX_SLUG:
        return FieldViolation(field, f"at most {MAX_SLUG} characters")
    if not SLUG.match(slug):
        return FieldViolation(field, "lower-case letters and digits in groups joined by '-'")
    return None


def spec_violations(spec: ProjectSpec, only: Iterable[str] | None = None) -> list[FieldViolation]:
    """Every rule the spec breaks, named `project.<field>` (only the `only` fields if given)."""
    checked = set(UPDATABLE if only is None else only)
    name = spec.name.strip()
    candidates: dict[str, FieldViolation | None] = {
        "name": FieldViolation("project.name", "required")
        if not name
        else _text(name, "project.name", MAX_NAME, None, ""),
        "slug": slug_violation(spec.slug),
        **{
            path: _bounded(spec_value(spec, path), bounds, f"project.{path}")
            for path, bounds in zip(RESOURCE_PATHS, (RAM_MB, CPU_MILLIS, BANDWIDTH_GB), strict=True)
        },
        "sleep_after_seconds": _bounded(
            spec.sleep_after_seconds, SLEEP_AFTER_SECONDS, "project.sleep_after_seconds"
        ),
        "region": FieldViolation("project.region", "required")
        if not spec.region
        else _text(
            spec.region,
            "project.region",
            MAX_REGION,
            REGION,
            "lower-case letters and digits in groups joined by '-', e.g. eu-west-1",
        ),
        "description": _text(spec.description, "project.description", MAX_DESCRIPTION, None, ""),
        "repository_url": _text(
            spec.repository_url,
            "project.repository_url",
            MAX_URL,
            URL,
            "an http(s)://, ssh://, git:// or git@host:path URL",
        ),
        "default_command": _text(
            spec.default_command, "project.default_command", MAX_COMMAND, None, ""
        ),
        "default_image": _text(
            spec.default_image,
            "project.default_image",
            MAX_IMAGE,
            IMAGE,
            "an image reference such as registry.example.com/app:1.2",
        ),
        "health_check_path": _text(
            spec.health_check_path,
            "project.health_check_path",
            MAX_PATH,
            HTTP_PATH,
            "an absolute path such as /healthz",
        ),
        "restart_policy": None
        if spec.restart_policy in RESTART_POLICIES
        else FieldViolation("project.restart_policy", "one of on-failure, always or never"),
        "liveness_check_path": _text(
            spec.liveness_check_path,
            "project.liveness_check_path",
            MAX_PATH,
            HTTP_PATH,
            "an absolute path such as /healthz (empty: no liveness check)",
        ),
        "liveness_period_seconds": _bounded(
            spec.liveness_period_seconds,
            LIVENESS_PERIOD_SECONDS,
            "project.liveness_period_seconds",
        ),
        "liveness_failure_threshold": _bounded(
            spec.liveness_failure_threshold,
            LIVENESS_FAILURE_THRESHOLD,
            "project.liveness_failure_threshold",
        ),
    }
    return [v for key, v in candidates.items() if key in checked and v is not None]


def validate_spec(spec: ProjectSpec, only: Iterable[str] | None = None) -> ProjectSpec:
    violations = spec_violations(spec, only)
    if violations:
        raise InvalidArgument(violations)
    return replace(spec, name=spec.name.strip())


def update_paths(paths: Sequence[str], set_fields: Iterable[str]) -> list[str]:
    """The fields an update touches (AIP-134): the mask, '*' for all, or the non-empty ones."""
    if not paths:
        touched = [p for p in set_fields if p in UPDATABLE]
        if not touched:
            raise InvalidArgument.field("update_mask", "names no field to update")
        return touched
    if list(paths) == ["*"]:
        return list(UPDATABLE)
    expanded = [q for p in paths for q in (RESOURCE_PATHS if p == RESOURCES else (p,))]
    unknown = [p for p in expanded if p not in UPDATABLE]
    if unknown:
        raise InvalidArgument(
            [FieldViolation("update_mask", f"cannot update {p!r}") for p in unknown]
        )
    return list(dict.fromkeys(expanded))


def apply_update(current: ProjectSpec, requested: ProjectSpec, paths: Sequence[str]) -> ProjectSpec:
    prefix = f"{RESOURCES}."
    dimensions = {
        p.removeprefix(prefix): spec_value(requested, p) for p in paths if p.startswith(prefix)
    }
    fields_ = {p: getattr(requested, p) for p in paths if not p.startswith(prefix)}
    return replace(current, resources=replace(current.resources, **dimensions), **fields_)


def secret_name_violation(name: str, field: str = "name") -> FieldViolation | None:
    if not name:
        return FieldViolation(field, "required")
    if len(name) > MAX_SECRET_NAME:
        return FieldViolation(field, f"at most {MAX_SECRET_NAME} characters")
    if not SECRET_NAME.match(name):
        return FieldViolation(
            field, "upper-case letters, digits and '_', not starting with a digit"
        )
    return None


def check_secret_name(name: str) -> str:
    if (bad := secret_name_violation(name)) is not None:
        raise InvalidArgument(bad)
    return name


def check_secret_value(value: str) -> bytes:
    """The value as UTF-8 bytes; the error names the size, never the value."""
    data = value.encode()
    if len(data) > MAX_SECRET_VALUE:
        raise InvalidArgument.field("value", f"at most {MAX_SECRET_VALUE} bytes")
    return data


def secrets_version_hash(versions: Iterable[tuple[str, int]]) -> str:
    """A digest of names and versions: changes whenever any secret is set, added or removed."""
    digest = hashlib.sha256()
    for name, version in sorted(versions):
        digest.update(f"{name}\x00{version}\n".encode())
    return "sha256:" + digest.hexdigest()


# ------------------------------------------------------------------ public hostnames

MAX_LABEL = 63  # a DNS label (RFC 1035)
_HASHED_PREFIX = MAX_LABEL - 9  # "<prefix>-<8 hex>"


def hostname_label(project_slug: str, organization_slug: str) -> str:
    """`<project>-<org>`. Creates and renames keep it within MAX_LABEL (label_violation);
    only an organization's rename can make it longer, and then it is shortened: its first
    54 characters, '-', and 8 hex characters of the SHA-256 of the full label."""
    label = f"{project_slug}-{organization_slug}"
    if len(label) <= MAX_LABEL:
        return label
    digest = hashlib.sha256(label.encode()).hexdigest()[:8]
    return f"{label[:_HASHED_PREFIX].rstrip('-')}-{digest}"


def label_violation(project_slug: str, organization_slug: str) -> FieldViolation | None:
    """The project's slug with its organization's must fit one DNS label."""
    length = len(project_slug) + 1 + len(organization_slug)
    if not organization_slug or length <= MAX_LABEL:
        return None
    room = MAX_LABEL - 1 - len(organization_slug)
    return FieldViolation(
        "project.slug",
        f"the hostname label '<project slug>-<organization slug>' may have at most {MAX_LABEL}"
        f" characters; with this organization's slug the project's slug may have at most {room}",
    )


@dataclass(frozen=True)
class PublicAddress:
    """Where the edge serves projects: `<label>.<apps_domain>` on `edge_port`."""

    apps_domain: str = "localhost"
    edge_port: int = 8000

    @classmethod
    def of(cls, apps_domain: str, edge_address: str) -> PublicAddress:
        port = edge_address.rpartition(":")[2]
        return cls(apps_domain.strip(".").lower() or "localhost", int(port) if port else 80)

    def hostname(self, project: Project) -> str:
        """Empty while the organization's slug is not known."""
        if not project.organization_slug:
            return ""
        label = hostname_label(project.spec.slug, project.organization_slug)
        return f"{label}.{self.apps_domain}"

    def url(self, project: Project) -> str:
        hostname = self.hostname(project)
        if not hostname:
            return ""
        return (
            f"http://{hostname}" if self.edge_port == 80 else f"http://{hostname}:{self.edge_port}"
        )


@dataclass(frozen=True)
class OrganizationSlug:
    """This service's copy of an organization's slug. `cursor` is the (txid, position) of the
    identity event that set it, None when it came from a GetOrganization lookup; `as_of` the
    event's time, or the time just before that lookup."""

    organization_id: str
    slug: str
    cursor: tuple[int, int] | None
    as_of: datetime


def slug_event_applies(
    stored: OrganizationSlug | None, slug: str, cursor: tuple[int, int], occurred_at: datetime
) -> bool:
    """Whether an organization.created/updated event may set the stored slug.

    After another event: only a later one (the feed's order). After a lookup: an event from
    no earlier than the lookup, or the one that set the slug the lookup saw (its older events
    are skipped, so a lagging feed never takes the slug back)."""
    if stored is None:
        return True
    if stored.cursor is not None:
        return cursor > stored.cursor
    return slug == stored.slug or occurred_at >= stored.as_of
