"""Splitting a long drive into segments that separate jobs label (pure; no store, no Prefect).

A segment *owns* the frames ``start..stop-1``: it is the only writer of those frames' flow pairs
(pair ``t`` is frame ``t`` -> ``t + 1``), teacher output and labels. Owned ranges begin and end
on shard boundaries of the store's frame arrays (multiples of ``shard``; the last one ends at the
drive's end), so no two segments ever write into the same shard file.

Propagation is local to keyframe gaps: a frame's label depends only on the nearest keyframe before
it and the nearest one after it (:mod:`models.propagation`). So a segment labels its frames exactly
as a single job would by propagating over its *span* ``span_start..span_stop-1``: from the last
keyframe at or before ``start`` (or the drive's first frame) to the first keyframe at or after
``stop - 1`` (or the last frame). Boundaries are placed on a shard boundary that coincides with a
keyframe where one is near, so spans overlap as little as possible.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from autolabel.errors import ConfigError


@dataclass(frozen=True)
class Segment:
    """Frames ``start..stop-1`` owned, propagated over ``span_start..span_stop-1``."""

    index: int
    start: int
    stop: int
    span_start: int
    span_stop: int

    @property
    def frames(self) -> int:
        return self.stop - self.start

    def pairs(self, num_frames: int) -> tuple[int, int]:
        """The flow pairs this segment owns: ``start..min(stop, T - 1) - 1``."""
        return self.start, min(self.stop, num_frames - 1)


def _boundary(target: int, lo: int, hi: int, shard: int, keys: set[int], slack: int) -> int:
    """The shard boundary in ``[lo, hi]`` nearest ``target``, preferring keyframes within ``slack``."""
    candidates = range(lo, hi + 1, shard)
    on_key = [b for b in candidates if b in keys and abs(b - target) <= slack]
    pool = on_key or list(candidates)
    return min(pool, key=lambda b: (abs(b - target), b))


def plan_segments(annotated: np.ndarray, shard: int, frames_per_segment: int) -> list[Segment]:
    """Split a drive of ``len(annotated)`` frames into segments of about ``frames_per_segment``.

    Args:
        annotated: bool (T,), the keyframes.
        shard: frames per shard of the store's arrays (1 when unsharded).
        frames_per_segment: wanted segment length; rounded to whole shards (at least one).

    Returns:
        Segments in time order covering ``0..T-1`` exactly once; one segment when the drive is
        not longer than ``frames_per_segment``.
    """
    annotated = np.asarray(annotated, dtype=bool)
    if annotated.ndim != 1:
        raise ConfigError(f"annotated must be (T,), got shape {annotated.shape}")
    if shard < 1 or frames_per_segment < 1:
        raise ConfigError(f"shard ({shard}) and frames per segment ({frames_per_segment}) must be >= 1")
    n = len(annotated)
    keys = [int(k) for k in np.flatnonzero(annotated)]
    size = max(shard, round(frames_per_segment / shard) * shard)
    cuts = [0]
    while n - cuts[-1] > size:
        lo = cuts[-1] + shard
        hi = (n - 1) // shard * shard  # a cut leaves at least one frame after it
        if lo > hi:
            break
        cuts.append(_boundary(cuts[-1] + size, lo, hi, shard, set(keys), size // 4))
    cuts.append(n)
    segments = []
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        before = [k for k in keys if k <= a]
        after = [k for k in keys if k >= b - 1]
        segments.append(Segment(i, a, b, before[-1] if before else 0, after[0] + 1 if after else n))
    return segments


def plan_key(content: str, segments: list[Segment]) -> str:
    """A short hash naming a drive's content and its split (shared by every job of one plan)."""
    cuts = [(s.start, s.stop) for s in segments]
    return hashlib.sha256(json.dumps([content, cuts]).encode()).hexdigest()[:16]


def stage_key(plan: str, settings: Any) -> str:
    """The key of one stage's shared version: the plan and the stage's settings (JSON-able)."""
    return hashlib.sha256(json.dumps([plan, settings], sort_keys=True, default=str).encode()).hexdigest()[:16]


__all__ = ["Segment", "plan_key", "plan_segments", "stage_key"]
