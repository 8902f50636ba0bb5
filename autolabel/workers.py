"""Worker processes for CPU-bound per-item work (flow pairs, rendered frames), results in order.

One pattern serves every such pool: ``spawn`` processes (never ``fork`` a process that runs torch's,
zarr's and the prefetching threads), each of which dies with the process that started it
(:func:`autolabel.runtime.die_with_parent`), and an ordered map that keeps at most two items per
worker in flight, so memory does not grow with the number of items.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Self, TypeVar

from autolabel.runtime import die_with_parent

__all__ = ["HoldsWorkerPool", "WorkerPool"]

R = TypeVar("R")


def _init_worker(parent_pid: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


class WorkerPool:
    """``workers`` spawned processes, each set up by ``initializer(*initargs)``; a context manager.

    :meth:`ordered` raises ``concurrent.futures.process.BrokenProcessPool`` when a worker dies
    (killed, out of memory): callers turn it into their own error saying what to do.
    """

    def __init__(self, workers: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple[Any, ...] = ()) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_init_worker,
            initargs=(os.getpid(), initializer, initargs))

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def ordered(self, fn: Callable[..., R], calls: Iterable[tuple[Any, ...]]) -> Iterator[R]:
        """``fn(*args)`` for each ``args`` of ``calls``, computed by the workers, yielded in order; at
        most 2 x ``workers`` calls submitted ahead of the one yielded (the rest wait, not queued)."""
        if self._pool is None:
            raise RuntimeError("the worker pool is closed")
        pending: deque[Future[R]] = deque()
        try:
            for args in calls:
                pending.append(self._pool.submit(fn, *args))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class HoldsWorkerPool:
    """Base of the classes that may hold a :class:`WorkerPool` in ``_pool`` (None: work in this
    process): a context manager that closes it."""

    _pool: WorkerPool | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
