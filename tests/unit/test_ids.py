"""Ids keep cuid2's shape and never repeat, across threads and forked processes too."""

from __future__ import annotations

import multiprocessing
import re
from concurrent.futures import ThreadPoolExecutor

from shared.ids import new_id

SHAPE = re.compile(r"^[a-z][0-9a-z]{23}$")


def test_ids_have_the_cuid2_shape() -> None:
    assert all(SHAPE.match(new_id()) for _ in range(10_000))


def test_ids_do_not_repeat_across_threads() -> None:
    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: [new_id() for _ in range(25_000)], range(8)))
    ids = [i for batch in batches for i in batch]
    assert len(set(ids)) == len(ids) == 200_000


def _ids_in_child(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put([new_id() for _ in range(1000)])


def test_forked_processes_do_not_repeat_the_parents_ids() -> None:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_ids_in_child, args=(queue,)) for _ in range(3)]
    for child in children:
        child.start()
    ids = [i for _ in children for i in queue.get(timeout=30)] + [new_id() for _ in range(1000)]
    for child in children:
        child.join(timeout=30)
    assert len(set(ids)) == len(ids) == 4000
