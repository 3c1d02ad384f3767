"""argon2id password hashing, off the event loop, with equal work for unknown accounts.

Hashing is what saturates identity first (19 MiB and tens of milliseconds of CPU each), so it
runs on its own pool of `workers` threads behind a bounded queue: at most `queue` calls wait
for a thread, each at most `wait_seconds`. A call that cannot get a thread in that bound is
refused with RESOURCE_EXHAUSTED and a retry hint (the gateway answers 429 with Retry-After)
instead of queueing until its caller's deadline passes; one that would predictably wait
longer (its place in the queue times the typical hash time, per thread) is refused at once.
Callers hash before they write anything, so a refused sign-up or login has changed nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from shared.context import remaining_seconds
from shared.errors import QuotaViolation, ResourceExhausted
from shared.settings import Settings

# The floor (OWASP's argon2id minimum): 19 MiB, two passes, one lane.
MIN_MEMORY_KIB = 19 * 1024
MIN_TIME_COST = 2
MIN_PARALLELISM = 1

T = TypeVar("T")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    new_hash: str | None = None  # set when the stored hash was weaker than today's params


class Overloaded(ResourceExhausted):
    """The hashing pool is saturated: RESOURCE_EXHAUSTED, try again in `retry_after` s."""

    def __init__(self, message: str, *, retry_after: float, **kwargs: object) -> None:
        seconds = str(max(1, math.ceil(retry_after)))
        super().__init__(
            message,
            [QuotaViolation("identity:password-hashing", "hashing pool saturated")],
            retry_after=retry_after,
            reason="OVERLOADED",
            metadata={"retry_after_seconds": seconds},
            **kwargs,
        )


class Admission:
    """At most `slots` holders at a time, at most `queue` waiting, each at most `wait` s.

    Waiters are served in arrival order; a released slot passes straight to the next waiter.
    `typical_seconds` (a moving average fed by `observe`) is how long a holder keeps its slot:
    a caller whose expected wait exceeds the bound is refused without waiting for it.
    """

    def __init__(
        self, slots: int, queue: int, wait_seconds: float, typical_seconds: float = 0.0
    ) -> None:
        self.slots = slots
        self.queue = queue
        self.wait_seconds = wait_seconds
        self.typical_seconds = typical_seconds
        self._free = slots
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.refused = 0

    def observe(self, seconds: float) -> None:
        self.typical_seconds += (seconds - self.typical_seconds) * 0.2

    def _refuse(self) -> Overloaded:
        self.refused += 1
        return Overloaded(
            "identity is busy hashing passwords; retry shortly", retry_after=self.wait_seconds
        )

    async def acquire(self, within: float | None = None) -> None:
        """A slot, or Overloaded; waits at most `within` (default and cap: wait_seconds)."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        wait = self.wait_seconds if within is None else min(within, self.wait_seconds)
        expected = (len(self._waiters) + 1) * self.typical_seconds / self.slots
        if len(self._waiters) >= self.queue or expected > wait:
            raise self._refuse()
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[None] = loop.create_future()
        self._waiters.append(granted)
        timer = loop.call_later(wait, self._expire, granted)
        try:
            await granted
        except BaseException:
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self.release()  # granted just as the caller gave up: pass the slot on
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):  # already taken off by release()
                self._waiters.remove(granted)

    def _expire(self, granted: asyncio.Future[None]) -> None:
        if not granted.done():
            granted.set_exception(self._refuse())

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


class Passwords:
    def __init__(
        self,
        time_cost: int,
        memory_kib: int,
        parallelism: int,
        *,
        workers: int | None = None,
        queue: int | None = None,
        wait_seconds: float = 2.0,
    ) -> None:
        if time_cost < MIN_TIME_COST or memory_kib < MIN_MEMORY_KIB or parallelism < 1:
            raise ValueError("argon2id parameters below the minimum (t>=2, m>=19 MiB, p>=1)")
        self.hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="argon2")
        # Verified when the email is unknown, so both answers cost the same.
        started = time.perf_counter()
        self._dummy = self.hasher.hash("not a password anyone has: equal timing")
        self.admission = Admission(
            workers,
            queue if queue is not None else 64 * workers,
            wait_seconds,
            typical_seconds=time.perf_counter() - started,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Passwords:
        return cls(
            settings.argon2_time_cost,
            settings.argon2_memory_kib,
            settings.argon2_parallelism,
            workers=settings.identity_hash_workers or None,
            queue=settings.identity_hash_queue or None,
            wait_seconds=settings.identity_hash_wait_seconds,
        )

    async def _run(self, work: Callable[[], T]) -> T:
        # Waiting past the caller's deadline would only turn a refusal into a timeout: keep
        # room for the hash itself and the write after it.
        remaining = remaining_seconds()
        within = None if remaining is None else remaining - 3 * self.admission.typical_seconds
        await self.admission.acquire(within)
        loop = asyncio.get_running_loop()

        def timed() -> T:
            started = time.perf_counter()
            try:
                return work()
            finally:
                took = time.perf_counter() - started
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(self.admission.observe, took)

        def release(_: Future[T]) -> None:
            # When the thread is done, not when the caller stops waiting: a hash still
            # running for a caller that gave up holds its thread all the same.
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self.admission.release)

        try:
            running = self._pool.submit(timed)
        except BaseException:
            self.admission.release()
            raise
        running.add_done_callback(release)
        return await asyncio.wrap_future(running)

    async def hash(self, password: str) -> str:
        return await self._run(lambda: self.hasher.hash(password))

    async def verify(self, stored_hash: str | None, password: str) -> Verdict:
        return await self._run(lambda: self._verify(stored_hash, password))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

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
