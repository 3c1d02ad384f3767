"""check_certificate, the rules an uploaded certificate meets: each refusal names its field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.project.certificates import (
    CHAIN_FIELD,
    KEY_FIELD,
    MAX_CHAIN_BYTES,
    check_certificate,
)
from shared.certificates import covers
from shared.errors import InvalidArgument
from tests.support.certificates import Leaf, TestCA, key_pem, new_key

HOST = "shop.ada.dev"
NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def refused(leaf_chain: str, key: str, hostname: str = HOST) -> str:
    with pytest.raises(InvalidArgument) as info:
        check_certificate(hostname, leaf_chain, key, NOW)
    (violation,) = info.value.violations
    return violation.field


@pytest.mark.parametrize("kind", ["ec256", "ec384", "ed25519", "rsa2048"])
def test_a_valid_certificate_is_accepted_with_its_facts(ca: TestCA, kind: str) -> None:
    leaf = ca.leaf(HOST, "www.ada.dev", key=new_key(kind))
    checked = check_certificate(HOST, leaf.chain_pem, leaf.key_pem, NOW)
    assert checked.sha256_fingerprint == leaf.fingerprint
    assert checked.dns_names == [HOST, "www.ada.dev"]
    assert checked.issuer == ca.intermediate.subject.rfc4514_string()
    assert checked.not_after == leaf.cert.not_valid_after_utc
    assert checked.chain_pem == leaf.chain_pem
    assert b"PRIVATE KEY" in checked.key_pem and "PRIVATE" not in repr(checked)


def test_a_wildcard_covers_one_left_most_label_only(ca: TestCA) -> None:
    leaf = ca.leaf("*.ada.dev")
    assert check_certificate(HOST, leaf.chain_pem, leaf.key_pem, NOW)
    assert refused(leaf.chain_pem, leaf.key_pem, "a.shop.ada.dev") == CHAIN_FIELD
    assert refused(leaf.chain_pem, leaf.key_pem, "ada.dev") == CHAIN_FIELD


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("shop.ada.dev", "shop.ada.dev", True),
        ("SHOP.ada.dev.", "shop.ada.dev", True),
        ("*.ada.dev", "shop.ada.dev", True),
        ("*.ada.dev", "x.shop.ada.dev", False),
        ("*.dev", "ada.dev", False),  # never a whole top-level name
        ("s*.ada.dev", "shop.ada.dev", False),  # partial wildcards: refused
        ("*.*.dev", "a.ada.dev", False),
        ("shop.ada.dev", "other.ada.dev", False),
    ],
)
def test_covers_follows_rfc_6125(pattern: str, name: str, expected: bool) -> None:
    assert covers(pattern, name) is expected


def test_a_leaf_for_another_name_or_without_dns_names_is_refused(ca: TestCA) -> None:
    other = ca.leaf("other.ada.dev")
    assert refused(other.chain_pem, other.key_pem) == CHAIN_FIELD
    no_san = ca.leaf(common_name=HOST)
    assert refused(no_san.chain_pem, no_san.key_pem) == CHAIN_FIELD  # CN alone never counts


def test_expired_and_not_yet_valid_leaves_are_refused(ca: TestCA) -> None:
    expired = ca.leaf(
        HOST, not_before=NOW - timedelta(days=90), not_after=NOW - timedelta(minutes=1)
    )
    assert refused(expired.chain_pem, expired.key_pem) == CHAIN_FIELD
    future = ca.leaf(HOST, not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=90))
    assert refused(future.chain_pem, future.key_pem) == CHAIN_FIELD


def test_a_key_that_is_not_the_leaf_s_is_refused_on_the_key(ca: TestCA) -> None:
    leaf = ca.leaf(HOST)
    assert refused(leaf.chain_pem, key_pem(new_key())) == KEY_FIELD


def test_the_leaf_must_come_first_and_the_chain_be_in_order(ca: TestCA) -> None:
    leaf = ca.leaf(HOST)
    reversed_chain = Leaf(leaf.cert, leaf.key, [ca.intermediate, leaf.cert])
    assert refused(reversed_chain.chain_pem, leaf.key_pem) == CHAIN_FIELD
    unrelated = Leaf(leaf.cert, leaf.key, [leaf.cert, TestCA("Other").intermediate])
    assert refused(unrelated.chain_pem, leaf.key_pem) == CHAIN_FIELD


@pytest.mark.parametrize("kind", ["rsa1024", "ec521"])
def test_weak_or_unsupported_keys_are_refused(ca: TestCA, kind: str) -> None:
    leaf = ca.leaf(HOST, key=new_key(kind))
    assert refused(leaf.chain_pem, leaf.key_pem) == KEY_FIELD


def test_malformed_input_is_refused_naming_the_field(ca: TestCA) -> None:
    leaf = ca.leaf(HOST)
    assert refused("", leaf.key_pem) == CHAIN_FIELD
    assert refused("not pem at all", leaf.key_pem) == CHAIN_FIELD
    broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    assert refused(broken, leaf.key_pem) == CHAIN_FIELD
    # A key pasted into the chain would be stored in clear: refused.
    assert refused(leaf.chain_pem + leaf.key_pem, leaf.key_pem) == CHAIN_FIELD
    assert refused(leaf.chain_pem + "x" * MAX_CHAIN_BYTES, leaf.key_pem) == CHAIN_FIELD
    assert refused(leaf.chain_pem, "") == KEY_FIELD
    assert refused(leaf.chain_pem, leaf.chain_pem) == KEY_FIELD
    assert refused(leaf.chain_pem, key_pem(leaf.key, password=b"pw")) == KEY_FIELD
    assert refused(leaf.chain_pem, leaf.key_pem * 2) == KEY_FIELD
