"""Identity's rules without a database: passwords, input, roles, throttling, page tokens,
the audit hash chain."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.identity import domain
from services.identity.domain import (
    AuditEntry,
    Role,
    allows,
    capped,
    check_token_scope,
    token_allows,
)
from services.identity.passwords import Passwords
from shared.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from shared.settings import Settings


def test_argon2_defaults_meet_the_issue_minimum() -> None:
    settings = Settings(service="identity")
    assert settings.argon2_memory_kib >= 19 * 1024
    assert settings.argon2_time_cost >= 2
    assert settings.argon2_parallelism >= 1
    hasher = Passwords.from_settings(settings).hasher
    assert hasher.type.name == "ID"
    with pytest.raises(ValueError):
        Passwords(time_cost=1, memory_kib=19 * 1024, parallelism=1)
    with pytest.raises(ValueError):
        Passwords(time_cost=2, memory_kib=8 * 1024, parallelism=1)


async def test_weaker_stored_hash_verifies_and_asks_for_a_rehash() -> None:
    from argon2 import PasswordHasher

    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("long enough pw")
    passwords = Passwords(time_cost=2, memory_kib=19 * 1024, parallelism=1)
    verdict = await passwords.verify(weak, "long enough pw")
    assert verdict.ok and verdict.new_hash is not None
    assert "m=19456,t=2,p=1" in verdict.new_hash
    assert not (await passwords.verify(weak, "wrong password!")).ok
    assert not (await passwords.verify(None, "long enough pw")).ok


@pytest.mark.parametrize(
    ("password", "ok"),
    [
        ("short", False),
        ("123456789", False),
        ("password123", False),
        ("Qwertyuiop", False),
        ("1234567890", False),
        ("a quiet lighthouse keeper", True),
    ],
)
def test_password_rules(password: str, ok: bool) -> None:
    assert (domain.password_violation(password) is None) is ok


def test_password_equal_to_email_is_refused() -> None:
    assert domain.password_violation("me@example.com", "me@example.com") is not None


def test_email_is_trimmed_and_lower_cased() -> None:
    assert domain.normalize_email("  Alice@Example.COM ") == "alice@example.com"
    for bad in ("", "alice", "a@b", "a b@c.d"):
        with pytest.raises(InvalidArgument) as caught:
            domain.normalize_email(bad)
        assert caught.value.violations[0].field == "email"


SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@given(st.text(alphabet="abc-09A_ ", max_size=45))
def test_slug_rule_is_exactly_the_documented_pattern(slug: str) -> None:
    expected = bool(slug) and len(slug) <= 40 and bool(SLUG.match(slug))
    assert (domain.slug_violation(slug) is None) is expected


def test_login_backoff_grows_then_caps_and_never_locks_forever() -> None:
    assert domain.block_after(domain.FREE_FAILURES - 1) is None
    waits = [domain.block_after(n) for n in range(domain.FREE_FAILURES, 40)]
    assert waits[0] == timedelta(seconds=1)
    assert all(w is not None and w <= domain.MAX_BLOCK for w in waits)
    assert waits[-1] == domain.MAX_BLOCK


def test_roles_are_ordered_and_permissions_map_to_a_minimum() -> None:
    assert Role.OWNER > Role.ADMIN > Role.DEVELOPER > Role.VIEWER
    assert domain.allows(Role.VIEWER, "projects.get")
    assert not domain.allows(Role.DEVELOPER, "projects.delete")
    assert domain.allows(Role.ADMIN, "projects.delete")
    assert not domain.allows(None, "projects.get")
    assert not domain.allows(Role.ADMIN, "organizations.delete")
    with pytest.raises(InvalidArgument):
        domain.allows(Role.OWNER, "nuke.everything")


def test_admin_cannot_create_demote_or_remove_an_owner() -> None:
    for current, new in [(None, Role.OWNER), (Role.OWNER, Role.ADMIN), (Role.OWNER, None)]:
        with pytest.raises(PermissionDenied):
            domain.check_member_change(Role.ADMIN, current, new)
    domain.check_member_change(Role.ADMIN, Role.VIEWER, Role.ADMIN)
    domain.check_member_change(Role.OWNER, Role.OWNER, Role.ADMIN)
    with pytest.raises(PermissionDenied):
        domain.check_member_change(Role.DEVELOPER, Role.VIEWER, None)
    domain.check_member_change(Role.VIEWER, Role.VIEWER, None, is_self=True)
    with pytest.raises(FailedPrecondition):
        domain.check_keeps_an_owner(0)


def _entry(**changes: object) -> AuditEntry:
    base: dict[str, object] = {
        "event_id": "e1",
        "organization_id": "o1",
        "seq": 1,
        "service": "identity",
        "actor_id": "u1",
        "actor_type": "user",
        "action": "member.added",
        "target_type": "user",
        "target_id": "u2",
        "metadata": {"role": "viewer", "n": 1.0},
        "occurred_at": datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC),
        "prev_hash": None,
    }
    base.update(changes)
    return AuditEntry(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"action": "member.removed"},
        {"actor_id": "u9"},
        {"metadata": {"role": "owner", "n": 1.0}},
        {"seq": 2},
        {"prev_hash": "00"},
        {"occurred_at": datetime(2026, 1, 1, 12, 0, 1, tzinfo=UTC)},
    ],
)
def test_audit_hash_changes_with_any_field(change: dict[str, object]) -> None:
    assert domain.audit_hash(_entry()) != domain.audit_hash(_entry(**change))


def test_audit_hash_is_stable_across_a_jsonb_round_trip_of_numbers() -> None:
    # jsonb hands 1.0 back as 1 and 1e20 as an integer; the hash must not care.
    written = _entry(metadata={"a": 1.0, "b": 1e20, "c": 0.1, "d": [2.0]})
    read = _entry(metadata={"a": 1, "b": 100000000000000000000, "c": 0.1, "d": [2]})
    assert domain.audit_hash(written) == domain.audit_hash(read)


def test_first_broken_names_the_edited_entry() -> None:
    first = _entry()
    h1 = domain.audit_hash(first)
    second = _entry(event_id="e2", seq=2, prev_hash=h1)
    h2 = domain.audit_hash(second)
    third = _entry(event_id="e3", seq=3, prev_hash=h2)
    h3 = domain.audit_hash(third)
    chain = [(first, h1), (second, h2), (third, h3)]
    assert domain.first_broken(chain, None) is None
    edited = _entry(event_id="e2", seq=2, prev_hash=h1, action="member.removed")
    assert domain.first_broken([(first, h1), (edited, h2), (third, h3)], None) == 1


def test_services_get_only_their_granted_reads() -> None:
    assert domain.service_allows("runtime", "projects.get")
    assert domain.service_allows("billing", "organizations.get")
    for service in ("agent", "runtime", "project", "billing"):
        for permission in ("billing.manage", "billing.read", "members.manage", "secrets.reveal"):
            assert not domain.service_allows(service, permission), (service, permission)
    with pytest.raises(InvalidArgument):
        domain.service_allows("runtime", "no.such.permission")


def test_an_api_token_s_scope_caps_its_owner_s_role() -> None:
    assert capped(Role.OWNER, "read") is Role.VIEWER
    assert capped(Role.OWNER, "deploy") is Role.DEVELOPER
    assert capped(Role.VIEWER, "admin") is Role.VIEWER  # never more than its owner
    assert capped(Role.ADMIN, "") is Role.ADMIN  # not a token
    assert capped(None, "admin") is None  # not a member
    assert not allows(capped(Role.OWNER, "read"), "deployments.create")
    assert allows(capped(Role.OWNER, "deploy"), "deployments.create")


def test_a_token_scope_may_name_permissions() -> None:
    scope = check_token_scope("logs.read, deployments.create")
    assert scope == "deployments.create,logs.read"
    assert token_allows(Role.OWNER, scope, "deployments.create")
    assert token_allows(Role.DEVELOPER, scope, "logs.read")
    assert not token_allows(Role.OWNER, scope, "projects.delete")  # not named
    assert not token_allows(Role.VIEWER, scope, "deployments.create")  # not its owner's
    assert token_allows(Role.OWNER, "deploy", "secrets.write")
    assert not token_allows(Role.OWNER, "read", "secrets.write")
    for bad in ("deployments.teleport", "write", ""):
        with pytest.raises(InvalidArgument):
            check_token_scope(bad)
