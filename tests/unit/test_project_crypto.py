"""Envelope encryption of project secrets: nonces, AAD binding, wrapping and re-wrapping."""

from __future__ import annotations

import os

import pytest

from services.project.crypto import (
    DATA_KEY_VERSION,
    NONCE_BYTES,
    DecryptionFailed,
    Keyring,
    Sealed,
    UnknownMasterKey,
    new_data_key,
    open_secret,
    seal_secret,
)


def _keyring(*ids: str, active: str = "") -> Keyring:
    return Keyring.from_settings({kid: os.urandom(32) for kid in ids}, active)


def test_100000_encryptions_never_repeat_a_nonce() -> None:
    key = new_data_key()
    nonces = {seal_secret(key, "p1", "NAME", b"same value").nonce for _ in range(100_000)}
    assert len(nonces) == 100_000
    assert {len(n) for n in nonces} == {NONCE_BYTES}


def test_a_secret_round_trips_and_the_ciphertext_hides_the_value() -> None:
    key = new_data_key()
    sealed = seal_secret(key, "p1", "DATABASE_URL", b"postgres://user:pw@host/db")
    assert b"postgres" not in sealed.ciphertext
    assert len(sealed.ciphertext) == len(b"postgres://user:pw@host/db") + 16  # + GCM tag
    opened = open_secret(key, "p1", "DATABASE_URL", DATA_KEY_VERSION, sealed)
    assert opened == b"postgres://user:pw@host/db"


@pytest.mark.parametrize(
    ("project", "name", "version"),
    [("p2", "NAME", DATA_KEY_VERSION), ("p1", "OTHER", DATA_KEY_VERSION), ("p1", "NAME", 2)],
)
def test_a_ciphertext_does_not_decrypt_under_another_project_name_or_key_version(
    project: str, name: str, version: int
) -> None:
    key = new_data_key()
    sealed = seal_secret(key, "p1", "NAME", b"value")
    with pytest.raises(DecryptionFailed) as info:
        open_secret(key, project, name, version, sealed)
    assert "value" not in str(info.value)


def test_tampering_and_a_wrong_key_are_detected() -> None:
    key = new_data_key()
    sealed = seal_secret(key, "p1", "NAME", b"value")
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(DecryptionFailed):
        open_secret(key, "p1", "NAME", DATA_KEY_VERSION, Sealed(flipped, sealed.nonce))
    with pytest.raises(DecryptionFailed):
        open_secret(new_data_key(), "p1", "NAME", DATA_KEY_VERSION, sealed)


def test_a_wrapped_data_key_is_bound_to_its_project_and_master_key() -> None:
    ring = _keyring("a", "b")
    data_key = new_data_key()
    wrapped = ring.wrap("p1", data_key)
    assert data_key not in wrapped
    assert ring.unwrap("p1", wrapped, "a") == data_key
    with pytest.raises(DecryptionFailed):
        ring.unwrap("p2", wrapped, "a")
    with pytest.raises(DecryptionFailed):
        ring.unwrap("p1", wrapped, "b")
    with pytest.raises(UnknownMasterKey):
        ring.unwrap("p1", wrapped, "gone")


def test_rewrapping_moves_a_data_key_to_the_new_master_key_only() -> None:
    old = _keyring("old", "new", active="old")
    data_key = new_data_key()
    wrapped = old.wrap("p1", data_key)
    rewrapped = old.rewrap("p1", wrapped, "old", "new")
    only_new = Keyring.from_settings({"new": old.keys["new"]})
    assert only_new.unwrap("p1", rewrapped, "new") == data_key
    with pytest.raises(UnknownMasterKey):
        only_new.unwrap("p1", wrapped, "old")


def test_the_keyring_refuses_bad_configuration_and_hides_keys() -> None:
    with pytest.raises(ValueError):
        Keyring.from_settings({"a": b"short"})
    with pytest.raises(ValueError):
        Keyring.from_settings({"a": os.urandom(32)}, "missing")
    ring = _keyring("a")
    assert ring.active_id == "a" and ring.keys["a"].hex() not in repr(ring)
    assert not Keyring.from_settings({}).configured
