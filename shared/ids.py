"""Ids: cuid2's construction and format, made fast.

Like cuid2, an id is a lower-case letter followed by base-36 digits of a SHA3-512 hash over the
time, a per-process counter, a host/process fingerprint and fresh random bytes, so ids are
unguessable, do not leak their creation order, and never collide across hosts or processes.
The `cuid2` package computes the same in pure Python at ~26 us an id (base-36 of a 512-bit
number, random characters one by one), which showed up in every hot path that writes rows;
this takes the hash's low 23 base-36 digits (~119 bits) at ~2 us.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import socket
import time

LENGTH = 24
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_LETTERS = _DIGITS[10:]
_BODY = LENGTH - 1
_BODY_SPACE = 36**_BODY


class _Generator:
    def __init__(self) -> None:
        self._counter = itertools.count(secrets.randbelow(476_782_367))
        seed = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(32)}"
        self._fingerprint = hashlib.sha3_256(seed.encode()).digest()

    def new(self) -> str:
        data = b"%d:%d:" % (time.time_ns(), next(self._counter))
        digest = hashlib.sha3_512(data + self._fingerprint + os.urandom(16)).digest()
        number = int.from_bytes(digest[:16], "big") % _BODY_SPACE
        body = []
        for _ in range(_BODY):
            number, digit = divmod(number, 36)
            body.append(_DIGITS[digit])
        letter = _LETTERS[int.from_bytes(digest[16:24], "big") % 26]
        return letter + "".join(body)


_generator = _Generator()


def _reseed_after_fork() -> None:
    global _generator
    _generator = _Generator()


os.register_at_fork(after_in_child=_reseed_after_fork)


def new_id() -> str:
    """A new id: 24 characters, a lower-case letter then [0-9a-z]."""
    return _generator.new()
