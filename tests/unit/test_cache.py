"""shared.cache.TtlCache: entries answer until they expire, a full cache starts over."""

from __future__ import annotations

from shared.cache import TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_answers_until_its_ttl_and_not_at_it() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(5.0, clock=clock)
    cache.put("a", 1)
    clock.now = 104.9
    assert cache.get("a") == 1
    clock.now = 105.0
    assert cache.get("a") is None
    assert cache.get("never") is None


def test_an_explicit_expiry_overrides_the_ttl() -> None:
    clock = Clock()
    cache: TtlCache[str, str] = TtlCache(5.0, clock=clock)
    cache.put("token", "alice", expires_at=101.0)
    assert cache.get("token") == "alice"
    clock.now = 101.0
    assert cache.get("token") is None


def test_a_full_cache_is_emptied_before_the_next_entry() -> None:
    cache: TtlCache[int, int] = TtlCache(60.0, max_entries=3, clock=Clock())
    for key in range(3):
        cache.put(key, key)
    assert len(cache) == 3
    cache.put(3, 3)
    assert len(cache) == 1 and cache.get(3) == 3 and cache.get(0) is None
    cache.clear()
    assert len(cache) == 0
