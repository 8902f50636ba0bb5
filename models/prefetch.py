"""Read the next propagation step's inputs in a background thread while the current step computes.

A propagation step of a batch of chains reads, per chain, two flows, two frames and the teacher's
output of the target frame (:meth:`PropagationMethod.step_reads` says which); reading and
decompressing them takes about as long as warping. :class:`PrefetchingInputs` wraps any
:class:`~models.propagation.SequenceInputs`: :meth:`PrefetchingInputs.prefetch` is given the next
step's reads, starts them on one reader thread and keeps what it read for the current and the next
step only (memory: two steps' inputs, whatever the sequence's length). Reads are the same calls on
the same inputs, so the labels do not change; an error raised by a read comes out in the step that
uses it.

:func:`read_ahead` does the same for a stream read in order (the frames of a drive that the flow
and teacher stages walk through): the next items are read on a thread while the current one computes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

# the reads a step may prefetch: SequenceInputs methods of one frame index
READS = frozenset({"frame", "flow_to_next", "flow_to_prev", "teacher"})

Read = tuple[str, int]
T = TypeVar("T")
_END = object()


class PrefetchingInputs:
    """``inputs`` with the reads of the next step started early on a reader thread.

    Everything else (``num_frames``, ``annotation``, ``teacher_features_batch``, ...) is ``inputs``'s
    own. Use as a context manager (or call :meth:`close`) so the reader thread ends.
    """

    def __init__(self, inputs: Any) -> None:
        self._inputs = inputs
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autolabel-prefetch")
        self._current: dict[Read, Future] = {}
        self._next: dict[Read, Future] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inputs, name)

    def prefetch(self, reads: Iterable[Read]) -> None:
        """Start ``reads`` (the next step's); what the step before the current one read is let go."""
        self._current = self._next
        upcoming: dict[Read, Future] = {}
        for key in reads:
            name, t = key
            if name not in READS:
                raise ValueError(f"cannot prefetch {name!r}: one of {sorted(READS)}")
            upcoming[key] = self._current.get(key) or self._pool.submit(getattr(self._inputs, name), t)
        self._next = upcoming

    def _read(self, name: str, t: int) -> Any:
        future = self._current.get((name, t)) or self._next.get((name, t))
        return future.result() if future is not None else getattr(self._inputs, name)(t)

    def frame(self, t: int) -> np.ndarray:
        return self._read("frame", t)

    def flow_to_next(self, t: int) -> np.ndarray:
        return self._read("flow_to_next", t)

    def flow_to_prev(self, t: int) -> np.ndarray:
        return self._read("flow_to_prev", t)

    def teacher(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        return self._read("teacher", t)

    def close(self) -> None:
        """Drop what was read and end the reader thread (reads in flight are waited for)."""
        self._current, self._next = {}, {}
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PrefetchingInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """The items of ``items`` in order, produced on a reader thread up to ``depth`` ahead of the consumer.

    Memory: at most ``depth`` items waiting. An error raised while producing an item comes out where
    that item would have; a consumer that stops early (``close()``, an exception) stops the reader,
    which finishes the item it is reading and ends.
    """
    if depth < 1:
        raise ValueError(f"read_ahead needs a depth of at least 1, not {depth}")
    ready: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((False, exc))

    reader = threading.Thread(target=produce, name="autolabel-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            ok, value = ready.get()
            if not ok:
                raise value
            if value is _END:
                return
            yield value
    finally:
        stop.set()
        reader.join()
