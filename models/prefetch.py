"""Read the next propagation step's inputs in a background thread while the current step computes.

A propagation step of a batch of chains reads, per chain, two flows, two frames and the teacher's
output of the target frame (:meth:`PropagationMethod.step_reads` says which); reading and
decompressing them takes about as long as warping. :class:`PrefetchingInputs` wraps any
:class:`~models.propagation.SequenceInputs`: :meth:`PrefetchingInputs.prefetch` is given the next
step's reads, starts them on one reader thread and keeps what it read for the current and the next
step only (memory: two steps' inputs, whatever the sequence's length). Reads are the same calls on
the same inputs, so the labels do not change; an error raised by a read comes out in the step that
uses it.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

# the reads a step may prefetch: SequenceInputs methods of one frame index
READS = frozenset({"frame", "flow_to_next", "flow_to_prev", "teacher"})

Read = tuple[str, int]


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
