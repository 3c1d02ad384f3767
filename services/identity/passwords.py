"""argon2id password hashing, off the event loop, with equal work for unknown accounts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from shared.settings import Settings

# The floor (OWASP's argon2id minimum): 19 MiB, two passes, one lane.
MIN_MEMORY_KIB = 19 * 1024
MIN_TIME_COST = 2
MIN_PARALLELISM = 1


@dataclass(frozen=True)
class Verdict:
    ok: bool
    new_hash: str | None = None  # set when the stored hash was weaker than today's params


class Passwords:
    def __init__(self, time_cost: int, memory_kib: int, parallelism: int) -> None:
        if time_cost < MIN_TIME_COST or memory_kib < MIN_MEMORY_KIB or parallelism < 1:
            raise ValueError("argon2id parameters below the minimum (t>=2, m>=19 MiB, p>=1)")
        self.hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        # Verified when the email is unknown, so both answers cost the same.
        self._dummy = self.hasher.hash("not a password anyone has: equal timing")

    @classmethod
    def from_settings(cls, settings: Settings) -> Passwords:
        return cls(
            settings.argon2_time_cost, settings.argon2_memory_kib, settings.argon2_parallelism
        )

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self.hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> Verdict:
        return await asyncio.to_thread(self._verify, stored_hash, password)

    def _verify(self, stored_hash: str | None, password: str) -> Verdict:
        if stored_hash is None:
            try:
                self.hasher.verify(self._dummy, password)
            except VerificationError:
                pass
            return Verdict(False)
        try:
            self.hasher.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return Verdict(False)
        if self.hasher.check_needs_rehash(stored_hash):
            return Verdict(True, self.hasher.hash(password))
        return Verdict(True)
