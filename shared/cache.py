"""An expiring map for what a process may remember a while (verified tokens, fetched keys).

Entries answer until their expiry; when the map is full it is emptied (a burst of distinct
keys costs one refill, and the hit path keeps no LRU bookkeeping)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int = 10_000,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        """The value while it has not expired, else None."""
        entry = self._entries.get(key)
        if entry is None or not entry[0] > self.clock():
            return None
        return entry[1]

    def put(self, key: K, value: V, *, expires_at: float | None = None) -> None:
        """Remember `value` for the cache's ttl, or until `expires_at` (on the cache's clock)."""
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        expiry = self.clock() + self.ttl if expires_at is None else expires_at
        self._entries[key] = (expiry, value)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
