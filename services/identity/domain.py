"""Identity's rules as plain Python: roles and permissions, input rules, sign-in throttling,
page tokens and the audit hash chain. No I/O here."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from functools import cache
from importlib import resources
from typing import Any

from shared.errors import FailedPrecondition, FieldViolation, InvalidArgument, PermissionDenied


class Role(IntEnum):
    """Numbers grow with rights and match hangar.identity.v1.Role."""

    VIEWER = 1
    DEVELOPER = 2
    ADMIN = 3
    OWNER = 4

    @classmethod
    def parse(cls, name: str) -> Role:
        return cls[name.upper()]

    @property
    def db_name(self) -> str:
        return self.name.lower()


# Minimum role per dotted permission. Other services ask Authorize with these names.
PERMISSIONS: dict[str, Role] = {
    "organizations.get": Role.VIEWER,
    "organizations.update": Role.ADMIN,
    "organizations.delete": Role.OWNER,
    "members.list": Role.VIEWER,
    "members.manage": Role.ADMIN,
    "audit.read": Role.ADMIN,
    "projects.list": Role.VIEWER,
    "projects.get": Role.VIEWER,
    "projects.create": Role.DEVELOPER,
    "projects.update": Role.DEVELOPER,
    "projects.delete": Role.ADMIN,
    "secrets.list": Role.VIEWER,
    "secrets.write": Role.DEVELOPER,
    "secrets.delete": Role.DEVELOPER,
    "secrets.reveal": Role.ADMIN,
    "domains.list": Role.VIEWER,
    "domains.manage": Role.ADMIN,
    "deployments.list": Role.VIEWER,
    "deployments.get": Role.VIEWER,
    "deployments.create": Role.DEVELOPER,
    "deployments.cancel": Role.DEVELOPER,
    "deployments.rollback": Role.DEVELOPER,
    "containers.list": Role.VIEWER,
    "logs.read": Role.VIEWER,
    "metrics.read": Role.VIEWER,
    "billing.read": Role.VIEWER,
    "billing.manage": Role.ADMIN,
}


def required_role(permission: str) -> Role:
    try:
        return PERMISSIONS[permission]
    except KeyError:
        raise InvalidArgument.field("permission", f"unknown permission {permission!r}") from None


# What a service may do in any organization with its own token: only the reads the call
# graph between services needs (README, Architecture). Anything else (an agent beside
# customer code, say) is refused.
SERVICE_GRANTS: dict[str, frozenset[str]] = {
    "runtime": frozenset({"projects.get"}),
    "billing": frozenset({"organizations.get"}),
}


def service_allows(service: str, permission: str) -> bool:
    required_role(permission)  # unknown permission: INVALID_ARGUMENT
    return permission in SERVICE_GRANTS.get(service, frozenset())


# An API token's scope: the highest role it acts with, whatever its owner's.
TOKEN_SCOPES: dict[str, Role] = {"read": Role.VIEWER, "deploy": Role.DEVELOPER, "admin": Role.OWNER}


def scope_role(scope: str) -> Role | None:
    """The highest role a token of this scope acts with; None for no token scope."""
    return TOKEN_SCOPES.get(scope) if scope else None


def capped(role: Role | None, scope: str) -> Role | None:
    """The member's role, no higher than the token's scope allows (a scope naming
    permissions leaves the role as it is: `token_allows` checks those)."""
    cap = scope_role(scope)
    if role is None or cap is None:
        return role
    return min(role, cap)


# What a token naming permissions may also do: read what they act on (creating a deployment
# reads its project, as the services do on the caller's behalf).
IMPLIED_BY_NAMED = frozenset({"organizations.get", "projects.get"})


def scope_permissions(scope: str) -> frozenset[str] | None:
    """The permissions a scope names ("deployments.create,logs.read"); None for a role
    scope (read, deploy, admin) or none."""
    if not scope or scope in TOKEN_SCOPES:
        return None
    return frozenset(p.strip() for p in scope.split(",") if p.strip())


def check_token_scope(scope: str) -> str:
    """A token scope as given: read, deploy, admin, or permissions (INVALID_ARGUMENT)."""
    named = scope_permissions(scope)
    if named is None:
        if scope not in TOKEN_SCOPES:
            raise InvalidArgument.field(
                "token.scope", "read, deploy, admin, or comma-separated permissions"
            )
        return scope
    unknown = sorted(p for p in named if p not in PERMISSIONS)
    if unknown or not named:
        raise InvalidArgument.field(
            "token.scope", f"unknown permissions: {', '.join(unknown) or '(none)'}"
        )
    return ",".join(sorted(named))


def token_allows(role: Role | None, scope: str, permission: str) -> bool:
    """Whether a member of `role` acting with a token of `scope` holds `permission`: the
    role as the scope caps it, and for a scope of permissions, only those."""
    named = scope_permissions(scope)
    if named is not None and permission not in named | IMPLIED_BY_NAMED:
        return False
    return allows(capped(role, scope), permission)


# What an API token limited to one project may be authorized for: what is about a project
# (the service checks it is that one); never the organization's members, billing or audit.
PROJECT_PERMISSIONS = frozenset(
    {
        "projects.get",
        "projects.update",
        "secrets.list",
        "secrets.write",
        "secrets.delete",
        "secrets.reveal",
        "domains.list",
        "domains.manage",
        "deployments.list",
        "deployments.get",
        "deployments.create",
        "deployments.cancel",
        "deployments.rollback",
        "containers.list",
        "logs.read",
        "metrics.read",
    }
)


def allows(role: Role | None, permission: str) -> bool:
    needed = required_role(permission)
    return role is not None and role >= needed


def check_member_change(
    actor: Role, current: Role | None, new: Role | None, *, is_self: bool = False
) -> None:
    """May `actor` move a member from `current` to `new` (None: absent / removed)?

    Admins manage members; only owners create, demote or remove owners. Anyone may leave.
    """
    if is_self and new is None:
        return
    if actor < Role.ADMIN:
        raise PermissionDenied("only admins and owners manage members")
    if Role.OWNER in (current, new) and actor is not Role.OWNER:
        raise PermissionDenied("only owners may add, change or remove an owner")


def check_keeps_an_owner(owners_left: int) -> None:
    if owners_left < 1:
        raise FailedPrecondition(
            "an organization must keep at least one owner", reason="LAST_OWNER"
        )


# ------------------------------------------------------------------------ input rules

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
MIN_PASSWORD = 10
MAX_PASSWORD = 1024  # argon2 would hash more, but nobody needs it and it costs CPU
MAX_NAME = 200


def normalize_email(raw: str, field: str = "email") -> str:
    email = raw.strip().lower()
    if not email:
        raise InvalidArgument.field(field, "required")
    if len(email) > 254 or not EMAIL.match(email):
        raise InvalidArgument.field(field, "not an email address")
    return email


@cache
def common_passwords() -> frozenset[str]:
    text = resources.files(__package__).joinpath("common_passwords.txt").read_text()
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def password_violation(password: str, email: str = "") -> FieldViolation | None:
    if len(password) < MIN_PASSWORD:
        return FieldViolation("password", f"must be at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        return FieldViolation("password", f"must be at most {MAX_PASSWORD} characters")
    if password.lower() in common_passwords():
        return FieldViolation("password", "too common; choose another")
    if email and password.strip().lower() == email:
        return FieldViolation("password", "must not be the email address")
    return None


def clean_name(raw: str, field: str, *, required: bool) -> str:
    name = raw.strip()
    if required and not name:
        raise InvalidArgument.field(field, "required")
    if len(name) > MAX_NAME:
        raise InvalidArgument.field(field, f"at most {MAX_NAME} characters")
    if "\x00" in name:
        raise InvalidArgument.field(field, "must not contain NUL")
    return name


def slug_violation(slug: str, field: str = "organization.slug") -> FieldViolation | None:
    if not slug:
        return FieldViolation(field, "required")
    if len(slug) > 40:
        return FieldViolation(field, "at most 40 characters")
    if not SLUG.match(slug):
        return FieldViolation(field, "lower-case letters and digits in groups joined by '-'")
    return None


# --------------------------------------------------------------------- sign-up retries

# How long a SignUp's request_id keeps answering with the account it created (AIP-155).
SIGNUP_REPLAY_WINDOW = timedelta(days=1)
MAX_REQUEST_ID = 100


def request_id_violation(request_id: str) -> FieldViolation | None:
    if len(request_id) > MAX_REQUEST_ID:
        return FieldViolation("request_id", f"at most {MAX_REQUEST_ID} characters")
    if request_id and (not request_id.isprintable() or request_id != request_id.strip()):
        return FieldViolation("request_id", "printable characters, no surrounding spaces")
    return None


# ------------------------------------------------------------------ sign-in throttling

FREE_FAILURES = 5  # failures before any delay
MAX_BLOCK = timedelta(minutes=15)  # the longest wait: the owner is never locked out for good
FAILURE_MEMORY = timedelta(hours=1)  # failures older than this are forgotten


def block_after(failures: int) -> timedelta | None:
    """How long an email is refused after `failures` consecutive failures: 1s, 2s, 4s..."""
    if failures < FREE_FAILURES:
        return None
    return min(timedelta(seconds=2 ** (failures - FREE_FAILURES)), MAX_BLOCK)


# ------------------------------------------------------------------ revoked sessions

# Beyond an access token's own lifetime, how long a revoked session is still announced (the
# verifiers' clock leeway, and then some).
REVOKED_MARGIN = timedelta(seconds=60)


def revoked_lifetime(access_token_ttl_seconds: int) -> timedelta:
    """How long after its revocation a session is still announced to the verifiers."""
    return timedelta(seconds=access_token_ttl_seconds) + REVOKED_MARGIN


# ----------------------------------------------------------------------- audit chain


@dataclass(frozen=True)
class AuditEntry:
    event_id: str
    organization_id: str | None
    seq: int
    service: str
    actor_id: str | None
    actor_type: str
    action: str
    target_type: str | None
    target_id: str | None
    metadata: dict[str, Any]
    occurred_at: datetime
    prev_hash: str | None


def actor_type_of(actor_id: str) -> str:
    if not actor_id:
        return "anonymous"
    return "service" if actor_id.startswith("service:") else "user"


def _canonical_value(value: Any) -> Any:
    """JSON values as they survive a jsonb round trip (numbers compare as numbers)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        if float(value).is_integer() and abs(value) < 2**53:
            return int(value)
        return float(value)
    if isinstance(value, dict):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical_value(v) for v in value]
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def canonical_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    return _canonical_value(metadata)  # type: ignore[no-any-return]


def utc_micros(moment: datetime) -> datetime:
    """Timestamps as PostgreSQL stores them: UTC, microseconds."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def audit_hash(entry: AuditEntry) -> str:
    """Hex SHA-256 over the previous hash and this entry's canonical JSON."""
    body = {
        "event_id": entry.event_id,
        "organization_id": entry.organization_id,
        "seq": entry.seq,
        "service": entry.service,
        "actor_id": entry.actor_id,
        "actor_type": entry.actor_type,
        "action": entry.action,
        "target_type": entry.target_type,
        "target_id": entry.target_id,
        "metadata": canonical_metadata(entry.metadata),
        "occurred_at": utc_micros(entry.occurred_at).isoformat(timespec="microseconds"),
        "prev_hash": entry.prev_hash,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def first_broken(entries: list[tuple[AuditEntry, str]], previous_hash: str | None) -> int | None:
    """Index of the first entry whose link or hash does not match, or None."""
    expected_prev = previous_hash
    for index, (entry, stored_hash) in enumerate(entries):
        if entry.prev_hash != expected_prev or audit_hash(entry) != stored_hash:
            return index
        expected_prev = stored_hash
    return None


def check_metadata(metadata: dict[str, Any], field: str) -> None:
    text = json.dumps(metadata)
    if "\\u0000" in text:
        raise InvalidArgument.field(field, "must not contain NUL characters")
    if len(text) > 16_384:
        raise InvalidArgument.field(field, "at most 16 KiB of JSON")
