"""autolabel.workers: spawned worker processes, results in order, a bounded number in flight."""

from __future__ import annotations

import os
from concurrent.futures.process import BrokenProcessPool

import pytest

from autolabel.workers import HoldsWorkerPool, WorkerPool

_OFFSET = 0


def _set_offset(offset: int) -> None:
    global _OFFSET
    _OFFSET = offset


def _add_offset(x: int) -> tuple[int, int]:
    return x + _OFFSET, os.getpid()


def _die(x: int) -> int:
    if x == 3:
        os._exit(1)
    return x


class TestWorkerPool:
    def test_results_in_order_from_the_workers_set_up_by_the_initializer(self) -> None:
        with WorkerPool(2, _set_offset, (100,)) as pool:
            results = list(pool.ordered(_add_offset, ((x,) for x in range(12))))
        assert [r for r, _ in results] == [100 + x for x in range(12)]
        assert os.getpid() not in {pid for _, pid in results}

    def test_at_most_two_calls_per_worker_ahead(self) -> None:
        drawn = []

        def calls():  # noqa: ANN202
            for x in range(20):
                drawn.append(x)
                yield (x,)

        with WorkerPool(2, _set_offset, (0,)) as pool:
            results = pool.ordered(_add_offset, calls())
            assert next(results)[0] == 0
            assert len(drawn) == 4  # 2 x 2 workers submitted, then the first result was yielded
            assert [r for r, _ in results] == list(range(1, 20))

    def test_a_dead_worker_breaks_the_pool_with_an_error(self) -> None:
        with WorkerPool(2) as pool, pytest.raises(BrokenProcessPool):
            list(pool.ordered(_die, ((x,) for x in range(8))))

    def test_closed_is_closed(self) -> None:
        pool = WorkerPool(1)
        pool.close()
        with pytest.raises(RuntimeError, match="closed"):
            next(pool.ordered(_die, [(1,)]))


def test_a_holder_closes_its_pool_on_leaving() -> None:
    class Holder(HoldsWorkerPool):
        def __init__(self) -> None:
            self._pool = WorkerPool(1)

    with Holder() as holder:
        assert holder._pool is not None
    assert holder._pool is None
    holder.close()  # twice is fine
