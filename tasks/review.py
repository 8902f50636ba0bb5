"""The review queue and keyframe suggestions, from the estimate (no ground truth read).

* :func:`frame_errors`: each propagated frame's estimated error - the share of its pixels that
  are likely wrong (1 - calibrated probability of being right, unlabelled pixels wrong) - and
  its disagreement with the other stored methods.
* :func:`review_queue`: frames ranked by ``error + disagreement_weight * disagreement``, for a
  reviewer to correct (exported as a CVAT task by ``autolabel review``).
* :func:`suggest_keyframes`: frames whose manual label would remove the most estimated error.
  A new keyframe ``n`` between keyframes ``a < n < b`` brings each frame ``t`` of ``(a, b)`` to
  distance ``d'`` (the nearer of the chains, within K) and, the estimate says, scales its error by
  ``g(d') / g(d)``, where ``g`` is the sequence's mean frame error at each distance; ``n`` itself
  becomes exact. Chosen greedily, each pick updating the distances, so picks spread out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from autolabel.storage.queries import require_results, sequences_with_results
from autolabel.storage.stages import result_array_names, results_stage
from autolabel.storage.store import Sequence, SequenceStore
from autolabel.tasks.evaluate import results_max_distance, sequence_calibration


class ReviewConfig(BaseModel):
    """How frames are ranked for review and keyframes suggested."""

    model_config = ConfigDict(frozen=True)

    method: str = Field("warp-refine", description="the method whose labels are reviewed")
    budget: int = Field(20, ge=1, description="frames to propose")
    disagreement_weight: float = Field(0.5, ge=0, description="weight of disagreement with the other methods")
    per_block: int | None = Field(None, ge=1, description="suggest at most one keyframe per block of this many "
                                                           "frames (e.g. 21: one per window)")


@dataclass
class FrameErrors:
    """One sequence's per-frame estimates for one method (frames not reached: error 1)."""

    sequence: str
    distance: np.ndarray      # int (T,), -1 not reached, 0 annotated
    error: np.ndarray         # float (T,) estimated share of wrong pixels, 0 on annotated frames
    disagreement: np.ndarray  # float (T,) share of pixels where another stored method disagrees
    frame_names: list[str] = field(default_factory=list)


def frame_errors(seq: Sequence, method: str, on_frame: Callable[[], None] | None = None) -> FrameErrors:
    """Read the method's labels and confidence once, frame by frame; ``on_frame`` once per frame."""
    require_results(seq, method)
    labels_name, conf_name, distance_name = result_array_names(method)
    labels, conf = seq.array(labels_name), seq.array(conf_name)
    distance = np.asarray(seq.array(distance_name)[:]).astype(np.int64)
    calibration, _ = sequence_calibration(seq, method)
    ignore = seq.store.classes.ignore_index
    others = [m for m in ("warp-inpaint", "warp-refine", "motion-only") if m != method
              and seq.stage_done(results_stage(m))]
    other_labels = [seq.array(result_array_names(m)[0]) for m in others]
    error = np.where(distance < 0, 1.0, 0.0)
    disagreement = np.zeros(seq.num_frames)
    for t in np.flatnonzero(distance > 0):
        lab = np.asarray(labels[t])
        c = np.asarray(conf[t]) / 255.0
        p = calibration.calibration(c) if calibration is not None else c
        error[t] = float(np.mean(np.where(lab != ignore, 1.0 - p, 1.0)))
        if other_labels:
            disagreement[t] = float(np.mean([np.mean(np.asarray(o[t]) != lab) for o in other_labels]))
        if on_frame is not None:
            on_frame()
    if on_frame is not None:  # keyframes and frames not reached count as read: the progress ends at its total
        for _ in range(int((distance <= 0).sum())):
            on_frame()
    return FrameErrors(seq.id, distance, error, disagreement, seq.frame_names)


@dataclass(frozen=True)
class FrameChoice:
    """A frame proposed to a reviewer: why (score), and what the estimate says about it."""

    sequence: str
    t: int
    frame: str
    score: float
    error: float
    disagreement: float
    distance: int

    def as_dict(self) -> dict[str, object]:
        return {"sequence": self.sequence, "t": self.t, "frame": self.frame, "score": round(self.score, 4),
                "estimated_error": round(self.error, 4), "disagreement": round(self.disagreement, 4),
                "distance": self.distance}


def review_queue(errors: Iterable[FrameErrors], config: ReviewConfig) -> list[FrameChoice]:
    """The ``budget`` propagated frames most likely wrong, worst first."""
    choices = []
    for fe in errors:
        for t in np.flatnonzero(fe.distance > 0):
            score = fe.error[t] + config.disagreement_weight * fe.disagreement[t]
            choices.append(FrameChoice(fe.sequence, int(t), fe.frame_names[t], float(score), float(fe.error[t]),
                                       float(fe.disagreement[t]), int(fe.distance[t])))
    choices.sort(key=lambda c: -c.score)
    return choices[: config.budget]


def _error_by_distance(fe: FrameErrors, k: int) -> np.ndarray:
    """g(d), d = 0..K: the mean estimated frame error at each distance (made non-decreasing)."""
    g = np.zeros(k + 1)
    for d in range(1, k + 1):
        at = fe.error[fe.distance == d]
        g[d] = at.mean() if len(at) else g[d - 1]
    return np.maximum.accumulate(g)


def _expected(fe: FrameErrors, g: np.ndarray, distance: np.ndarray, frames: slice = slice(None)) -> np.ndarray:
    """Expected error of ``frames`` at ``distance`` (their new distances), scaled from their estimates."""
    d0 = fe.distance[frames]
    error = fe.error[frames]
    out = np.where(distance < 0, 1.0, 0.0)
    reached = distance > 0
    out[reached] = g[distance[reached]]
    scaled = reached & (d0 > 0)
    scaled[scaled] &= g[d0[scaled]] > 0
    out[scaled] = error[scaled] * g[distance[scaled]] / g[d0[scaled]]
    return out


def _distances_with(annotated: np.ndarray, n: int, k: int) -> tuple[slice, np.ndarray]:
    """The frames between n's neighbouring keyframes and their distances once n is a keyframe too."""
    before = np.flatnonzero(annotated[:n])
    after = np.flatnonzero(annotated[n + 1:]) + n + 1
    a = int(before[-1]) if len(before) else None
    b = int(after[0]) if len(after) else None
    lo, hi = (a + 1 if a is not None else 0), (b if b is not None else len(annotated))
    t = np.arange(lo, hi)
    big = np.iinfo(np.int64).max
    left = np.where(t < n, t - a if a is not None else big, t - n)
    right = np.where(t < n, n - t, b - t if b is not None else big)
    d = np.minimum(np.where(left <= k, left, big), np.where(right <= k, right, big))
    return slice(lo, hi), np.where(d == big, -1, d)


def suggest_keyframes(errors: Iterable[FrameErrors], k_of: dict[str, int], config: ReviewConfig) -> list[FrameChoice]:
    """Greedy: the frames whose annotation removes the most estimated error, ``budget`` in all."""
    state = []
    for fe in errors:
        k = k_of[fe.sequence]
        g = _error_by_distance(fe, k)
        state.append([fe, k, fe.distance == 0, g, _expected(fe, g, fe.distance)])
    picks: list[FrameChoice] = []
    used_blocks: set[tuple[str, int]] = set()
    for _ in range(config.budget):
        best: tuple[float, int, int] | None = None
        for i, (fe, k, annotated, g, current) in enumerate(state):
            for n in np.flatnonzero(~annotated):
                if config.per_block and (fe.sequence, int(n) // config.per_block) in used_blocks:
                    continue
                frames, distance = _distances_with(annotated, int(n), k)
                gain = float(current[frames].sum() - _expected(fe, g, distance, frames).sum())
                if best is None or gain > best[0]:
                    best = (gain, i, int(n))
        if best is None or best[0] <= 0:
            break
        gain, i, n = best
        fe, k, annotated, g, current = state[i]
        frames, distance = _distances_with(annotated, n, k)
        picks.append(FrameChoice(fe.sequence, n, fe.frame_names[n], gain, float(fe.error[n]),
                                 float(fe.disagreement[n]), int(fe.distance[n])))
        current = current.copy()
        current[frames] = _expected(fe, g, distance, frames)
        annotated = annotated.copy()
        annotated[n] = True
        state[i] = [fe, k, annotated, g, current]
        if config.per_block:
            used_blocks.add((fe.sequence, n // config.per_block))
    return picks


def store_frame_errors(store: SequenceStore, method: str, sequences: list[str],
                       on_frame: Callable[[], None] | None = None) -> tuple[list[FrameErrors], dict[str, int]]:
    """:func:`frame_errors` of every selected sequence labelled with ``method``, and each one's K."""
    errors, ks = [], {}
    for seq_id in sequences_with_results(store, [method], sequences, "review"):
        seq = store.sequence(seq_id)
        k = results_max_distance(seq, method)
        if k is None:
            continue
        errors.append(frame_errors(seq, method, on_frame))
        ks[seq_id] = k
    return errors, ks
