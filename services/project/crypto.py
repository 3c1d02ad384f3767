"""Envelope encryption of project secrets: AES-256-GCM everywhere.

Each project has a random 256-bit data key, stored wrapped (AES-GCM) by a master key from the
keyring in settings. Secrets are encrypted under the data key with a fresh random 96-bit nonce
per write; the AAD binds a ciphertext to its project, name and key version, so a ciphertext
copied to another row (or another project) does not decrypt. Rotating the master key re-wraps
data keys only; secret ciphertexts never change.

Nothing here logs, and no error carries key material or plaintext.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
KEY_BYTES = 32
# The version of a project's data key that secrets are written under. Data keys are not
# rotated (master keys are); a data-key rotation would bump this and re-encrypt.
DATA_KEY_VERSION = 1


class DecryptionFailed(Exception):
    """A ciphertext or wrapped key did not authenticate (wrong key, row or tampering)."""


class UnknownMasterKey(Exception):
    """A wrapped data key names a master key id the keyring does not hold."""


@dataclass(frozen=True)
class Sealed:
    ciphertext: bytes  # ciphertext || 16-byte GCM tag
    nonce: bytes


def _aad(purpose: bytes, *parts: str | int) -> bytes:
    """Associated data binding a ciphertext to what it is and whose (a copied row won't open)."""
    return b"\x00".join((purpose, *(str(part).encode() for part in parts)))


def _secret_aad(project_id: str, name: str, key_version: int) -> bytes:
    return _aad(b"hangar.project.secret.v1", project_id, name, key_version)


def _data_key_aad(project_id: str, master_key_id: str) -> bytes:
    return _aad(b"hangar.project.data-key.v1", project_id, master_key_id)


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def _seal(data_key: bytes, aad: bytes, value: bytes) -> Sealed:
    nonce = os.urandom(NONCE_BYTES)
    return Sealed(AESGCM(data_key).encrypt(nonce, value, aad), nonce)


def _open(data_key: bytes, aad: bytes, sealed: Sealed, what: str) -> bytes:
    try:
        return AESGCM(data_key).decrypt(sealed.nonce, sealed.ciphertext, aad)
    except (InvalidTag, ValueError):
        raise DecryptionFailed(f"{what} did not decrypt") from None


def seal_secret(data_key: bytes, project_id: str, name: str, value: bytes) -> Sealed:
    return _seal(data_key, _secret_aad(project_id, name, DATA_KEY_VERSION), value)


def open_secret(
    data_key: bytes, project_id: str, name: str, key_version: int, sealed: Sealed
) -> bytes:
    return _open(data_key, _secret_aad(project_id, name, key_version), sealed, "secret")


def _certificate_key_aad(project_id: str, hostname: str, key_version: int) -> bytes:
    return _aad(b"hangar.project.certificate-key.v1", project_id, hostname, key_version)


def seal_certificate_key(data_key: bytes, project_id: str, hostname: str, key: bytes) -> Sealed:
    """A custom domain's private key, as a secret is sealed; the AAD binds project and name."""
    aad = _certificate_key_aad(project_id, hostname, DATA_KEY_VERSION)
    return _seal(data_key, aad, key)


def open_certificate_key(
    data_key: bytes, project_id: str, hostname: str, key_version: int, sealed: Sealed
) -> bytes:
    aad = _certificate_key_aad(project_id, hostname, key_version)
    return _open(data_key, aad, sealed, "certificate key")


@dataclass(frozen=True)
class Keyring:
    """Master keys by id; new data keys are wrapped under `active_id`."""

    keys: Mapping[str, bytes] = field(repr=False)
    active_id: str

    def __post_init__(self) -> None:
        if not self.keys:
            return  # secrets are unavailable until a keyring is configured
        if self.active_id not in self.keys:
            raise ValueError(f"active master key {self.active_id!r} is not in the keyring")
        for kid, key in self.keys.items():
            if len(key) != KEY_BYTES:
                raise ValueError(f"master key {kid!r} must be {KEY_BYTES} bytes")

    @classmethod
    def from_settings(cls, keys: Mapping[str, bytes], active_id: str = "") -> Keyring:
        return cls(dict(keys), active_id or next(iter(keys), ""))

    @property
    def configured(self) -> bool:
        return bool(self.keys)

    def wrap(self, project_id: str, data_key: bytes, key_id: str | None = None) -> bytes:
        """nonce || AES-GCM(master key, data key), bound to the project and the master key id."""
        kid = key_id or self.active_id
        if kid not in self.keys:
            raise UnknownMasterKey(f"master key {kid!r} is not in the keyring")
        nonce = os.urandom(NONCE_BYTES)
        aad = _data_key_aad(project_id, kid)
        return nonce + AESGCM(self.keys[kid]).encrypt(nonce, data_key, aad)

    def unwrap(self, project_id: str, wrapped: bytes, key_id: str) -> bytes:
        master = self.keys.get(key_id)
        if master is None:
            raise UnknownMasterKey(f"master key {key_id!r} is not in the keyring")
        try:
            return AESGCM(master).decrypt(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _data_key_aad(project_id, key_id)
            )
        except (InvalidTag, ValueError):
            raise DecryptionFailed("data key did not unwrap") from None

    def rewrap(self, project_id: str, wrapped: bytes, from_id: str, to_id: str) -> bytes:
        return self.wrap(project_id, self.unwrap(project_id, wrapped, from_id), to_id)
