"""Teacher features handed from the teacher stage to warp-refine's propagation within one process.

On its way to a frame's labels the teacher computes the decoder features (or, for a teacher
without them, the mapped probabilities at 1/4 resolution) that warp-refine's refiner takes for
that frame. Instead of a second forward pass per frame, the teacher stage writes them here and
the propagation (and its estimate's probes) read them back.

They live in an anonymous temporary file (the operating system frees it when the process ends,
killed or not) in the temporary folder (``$TMPDIR``), so they cost disk and page cache, not
resident memory (where that folder is a tmpfs they do take memory: point ``$TMPDIR`` at a disk,
or lower the budget). A process keeps one sequence's at a time (opening an entry drops the
others), at most ``budget`` bytes of it and never more than a quarter of the folder's free space:
frames past that are simply not kept. Nothing here is published or shared
between processes: a stage run elsewhere, a frame not kept or a full disk computes the features
again, as before. An entry belongs to one teacher-stage version of one sequence and to the very
teacher object that made it (:func:`find` checks both), so an adapted teacher's features, or
those of a version since replaced, are never handed to a refiner.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from typing import Any

import numpy as np
import torch

__all__ = ["FeatureScratch", "find", "open_scratch", "release", "scratch_bytes"]

log = logging.getLogger(__name__)

FREE_SHARE = 4  # use at most a quarter of the temporary folder's free space
_lock = threading.Lock()
_entries: dict[tuple[str, str, str], FeatureScratch] = {}


class FeatureScratch:
    """Features (F, h, w) float32 of one sequence's frames, by frame index, up to ``budget`` bytes.

    Each frame is stored as its (h, w, F) bytes, the channels_last order the teacher makes them in,
    and comes back as a channels_last (B, F, h, w) tensor on the teacher's device.
    """

    def __init__(self, teacher: Any, budget: int, directory: str | None = None) -> None:
        self._teacher = weakref.ref(teacher)
        self.device = torch.device(teacher.device)
        directory = directory or tempfile.gettempdir()
        self.budget = min(budget, shutil.disk_usage(directory).free // FREE_SHARE)
        self._file = tempfile.TemporaryFile(prefix="autolabel-features-", dir=directory)
        self._slots: dict[int, int] = {}
        self._shape: tuple[int, int, int] | None = None  # (F, h, w)
        self._lock = threading.Lock()
        self.closed = False

    def made_by(self, teacher: Any) -> bool:
        return self._teacher() is teacher

    @property
    def frame_bytes(self) -> int:
        return 0 if self._shape is None else 4 * int(np.prod(self._shape))

    @property
    def stored_bytes(self) -> int:
        return len(self._slots) * self.frame_bytes

    def __len__(self) -> int:
        return len(self._slots)

    def put(self, frames: list[int], features: torch.Tensor) -> None:
        """Keep ``features`` (B, F, h, w) of ``frames`` (B) while the budget lasts."""
        if self.closed or features.dim() != 4 or features.shape[0] != len(frames):
            return
        shape = tuple(int(v) for v in features.shape[1:])
        with self._lock:
            if self._shape is None:
                self._shape = shape  # type: ignore[assignment]
            if shape != self._shape:
                return
            block = features.detach().float().permute(0, 2, 3, 1).cpu().contiguous().numpy()
            for i, t in enumerate(frames):
                if t in self._slots or (len(self._slots) + 1) * self.frame_bytes > self.budget:
                    continue
                slot = len(self._slots)
                try:
                    _write_all(self._file.fileno(), memoryview(block[i]).cast("B"), slot * self.frame_bytes)
                except OSError as exc:  # a full disk, say: compute them again from here on
                    log.warning("teacher features not kept (%s); warp-refine computes them again", exc)
                    self._close_locked()
                    return
                self._slots[t] = slot

    def get(self, frames: list[int]) -> dict[int, torch.Tensor]:
        """The kept features of those ``frames`` that were kept: frame -> (1, F, h, w)."""
        with self._lock:
            if self.closed or self._shape is None:
                return {}
            found: dict[int, torch.Tensor] = {}
            f, h, w = self._shape
            for t in dict.fromkeys(frames):
                slot = self._slots.get(t)
                if slot is None:
                    continue
                buf = np.empty((1, h, w, f), dtype=np.float32)
                _read_all(self._file.fileno(), memoryview(buf).cast("B"), slot * self.frame_bytes)
                found[t] = torch.from_numpy(buf).permute(0, 3, 1, 2).to(self.device)
            return found

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if not self.closed:
            self.closed = True
            self._slots.clear()
            self._file.close()


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _read_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        got = os.preadv(fd, [buf], offset)
        if got == 0:
            raise OSError(f"teacher feature scratch file ended at byte {offset}")
        buf, offset = buf[got:], offset + got


def open_scratch(store_url: str, seq_id: str, version: str, teacher: Any, budget: int) -> FeatureScratch | None:
    """The entry, of at most ``budget`` bytes, for the teacher-stage version ``version`` of a
    sequence, made by ``teacher`` (the one this process holds for that version and teacher, as the
    segments of one version add to one entry, else a new one); every other entry of the process is
    dropped. None when the budget is 0."""
    if budget <= 0:
        return None
    key = (store_url, seq_id, version)
    with _lock:
        kept = _entries.pop(key, None)
        while _entries:
            _entries.popitem()[1].close()
        if kept is not None and not kept.closed and kept.made_by(teacher):
            scratch = kept  # another segment of the same version: keep adding to it
        else:
            if kept is not None:
                kept.close()
            scratch = FeatureScratch(teacher, budget)
        _entries[key] = scratch
    return scratch


def find(store_url: str, seq_id: str, version: str | None, teacher: Any) -> FeatureScratch | None:
    """The entry of that teacher-stage version, if this process holds one made by this very ``teacher``."""
    if version is None:
        return None
    with _lock:
        scratch = _entries.get((store_url, seq_id, version))
    if scratch is None or scratch.closed or not scratch.made_by(teacher):
        return None
    return scratch


def release(store_url: str, seq_id: str) -> None:
    """Drop every entry of a sequence (its labelling is over)."""
    with _lock:
        for key in [k for k in _entries if k[:2] == (store_url, seq_id)]:
            _entries.pop(key).close()


def scratch_bytes() -> int:
    """Bytes this process holds in scratch files now."""
    with _lock:
        return sum(e.stored_bytes for e in _entries.values())
