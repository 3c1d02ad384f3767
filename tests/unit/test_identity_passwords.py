"""The admission in front of identity's password pool: slots, a bounded queue, a bounded
wait, and no slot lost to a caller that gives up."""

from __future__ import annotations

import asyncio

import pytest

from services.identity.passwords import Admission, Overloaded, Passwords

WITHIN = 30.0


async def test_callers_beyond_the_slots_wait_in_order_and_beyond_the_queue_are_refused() -> None:
    admission = Admission(slots=1, queue=2, wait_seconds=WITHIN)
    await admission.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        await admission.acquire()
        order.append(n)

    first, second = asyncio.create_task(waiter(1)), asyncio.create_task(waiter(2))
    await asyncio.sleep(0)  # both queued
    with pytest.raises(Overloaded) as refused:
        await admission.acquire()
    assert refused.value.metadata["retry_after_seconds"] == str(int(WITHIN))
    admission.release()
    await first
    admission.release()
    await second
    assert order == [1, 2] and admission.refused == 1


async def test_a_caller_that_cannot_get_a_slot_in_time_is_refused() -> None:
    admission = Admission(slots=1, queue=5, wait_seconds=0.01)
    await admission.acquire()
    with pytest.raises(Overloaded):
        await admission.acquire()  # the holder never releases
    admission.release()
    async with asyncio.timeout(WITHIN):
        await admission.acquire()  # the slot came back, nothing leaked


async def test_a_predictably_long_wait_is_refused_at_once() -> None:
    admission = Admission(slots=1, queue=100, wait_seconds=1.0, typical_seconds=0.6)
    await admission.acquire()
    queued = asyncio.create_task(admission.acquire())  # expected wait 0.6 s: admitted
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await admission.acquire()  # second in line: 1.2 s expected
    admission.release()
    await queued


async def test_a_waiter_that_gives_up_leaves_no_slot_behind() -> None:
    admission = Admission(slots=1, queue=5, wait_seconds=WITHIN)
    await admission.acquire()
    gives_up = asyncio.create_task(admission.acquire())
    await asyncio.sleep(0)
    gives_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gives_up
    admission.release()
    async with asyncio.timeout(WITHIN):
        await admission.acquire()


async def test_a_slot_granted_to_a_caller_that_just_gave_up_passes_on() -> None:
    admission = Admission(slots=1, queue=5, wait_seconds=WITHIN)
    await admission.acquire()
    late = asyncio.create_task(admission.acquire())
    after = asyncio.create_task(admission.acquire())
    await asyncio.sleep(0)
    admission.release()  # granted to `late` ...
    late.cancel()  # ... which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await late
    async with asyncio.timeout(WITHIN):
        await after  # the slot went on to the next caller


async def test_hashing_and_verifying_go_through_the_pool() -> None:
    passwords = Passwords(2, 19 * 1024, 1, workers=1, queue=1, wait_seconds=WITHIN)
    try:
        stored = await passwords.hash("a long enough password")
        assert (await passwords.verify(stored, "a long enough password")).ok
        assert not (await passwords.verify(stored, "another password")).ok
        assert not (await passwords.verify(None, "a long enough password")).ok
        assert passwords.admission.typical_seconds > 0
    finally:
        passwords.close()
