"""Label quality without ground truth: calibrated confidence turned into expected IoU.

A new drive has manual labels on its keyframes only. Its propagated labels are scored here in
two steps, both from what the drive has:

1. **Calibration on cycles** (paper 3.4's signal). From a keyframe ``t`` the method runs a
   forward-backward cycle (``t -> t+-l -> t``, ``2l`` steps of the same method, flow, teacher and
   refiner as the labels); the cycled label is compared with the keyframe's annotation. Each pixel
   gives one (confidence, correct) pair; a logistic fit on the logit of the confidence (Platt
   scaling, two parameters) maps the method's confidence to the probability that a pixel is right.
   Cycles through a keyframe the refiner trained on are left out (they would look better than
   the method is), see :func:`annotation_fingerprint`.
2. **Expected IoU**. For every propagated pixel with calibrated probability ``p`` of being right and
   predicted class ``c``: expected true positives of ``c`` grow by ``p``, predictions of ``c`` by 1,
   and the missing mass ``1 - p`` is a false negative of the *other* classes found around the
   pixel (a box of ``spread`` pixels; errors sit on boundaries). Per class, expected
   IoU = E[TP] / (E[pred] + E[gt] - E[TP]), and the estimated mIoU averages the classes predicted.

Everything is numpy or torch; no store, no Prefect.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from autolabel.models.cycle import cycle_path
from autolabel.models.metrics import confusion_matrix
from autolabel.models.propagation import LabelState, PropagationMethod, SequenceInputs
from pydantic import BaseModel, ConfigDict, Field

from autolabel.errors import ConfigError

_EPS = 1e-4


class EstimateConfig(BaseModel):
    """How labels are scored without ground truth (``autolabel label`` runs the cycles)."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = Field(True, description="run calibration cycles while labelling")
    cycle_lengths: tuple[int, ...] = Field(
        (1, 3, 5), description="cycle lengths l (2l steps each); lengths above ceil(K/2) are skipped")
    max_keyframes: int = Field(6, ge=1, description="keyframes per sequence whose cycles calibrate (evenly spread)")
    pixels_per_cycle: int = Field(4096, ge=64, description="pixels sampled from each cycled label for the fit")
    spread: int = Field(9, ge=1, description="box (pixels) around a pixel whose classes take its missing mass")
    seed: int = 0


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


def annotation_fingerprint(annotation: np.ndarray) -> str:
    """A short content hash of an annotation (H, W): recognises a keyframe across stores and copies."""
    a = np.ascontiguousarray(annotation, dtype=np.uint8)
    return hashlib.sha1(repr(a.shape).encode() + a.tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Calibration:
    """``P(right) = sigmoid(a * logit(confidence) + b)``, fitted on cycles (identity: a=1, b=0)."""

    a: float = 1.0
    b: float = 0.0

    def __call__(self, confidence: np.ndarray) -> np.ndarray:
        """float32 probabilities of being right, same shape as ``confidence`` (0-1)."""
        c = np.clip(np.asarray(confidence, dtype=np.float64), _EPS, 1 - _EPS)
        return _sigmoid(self.a * np.log(c / (1 - c)) + self.b).astype(np.float32)


def fit_calibration(confidence: np.ndarray, correct: np.ndarray, iterations: int = 50) -> Calibration:
    """Platt scaling by Newton's method on (confidence, correct) pairs, any shape, flattened.

    With fewer than 2 distinct confidences the slope is not identifiable: a=1 and only the offset
    is fitted. A small ridge on (a - 1, b) keeps the fit finite when every pixel is right.
    """
    c = np.clip(np.asarray(confidence, dtype=np.float64).ravel(), _EPS, 1 - _EPS)
    y = np.asarray(correct, dtype=np.float64).ravel()
    if c.size == 0:
        return Calibration()
    x = np.log(c / (1 - c))
    slope = np.ptp(x) > 1e-6
    prior = np.array([1.0, 0.0])
    ridge = 1e-3 * c.size

    def loss(theta: np.ndarray) -> float:
        z = theta[0] * x + theta[1]
        return float(np.dot(y, np.logaddexp(0, -z)) + np.dot(1 - y, np.logaddexp(0, z))
                     + 0.5 * ridge * np.sum((theta - prior) ** 2))

    theta = prior.copy()
    current = loss(theta)
    for _ in range(iterations):
        p = _sigmoid(theta[0] * x + theta[1])
        w = p * (1 - p)
        grad = np.array([np.dot(p - y, x), np.sum(p - y)]) + ridge * (theta - prior)
        hess = np.array([[np.dot(w, x * x), np.dot(w, x)], [np.dot(w, x), np.sum(w)]]) + ridge * np.eye(2)
        if not slope:
            grad[0], hess[0, 1], hess[1, 0], hess[0, 0] = 0.0, 0.0, 0.0, 1.0
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:  # backtracking: a full Newton step can overshoot and oscillate
            candidate = theta - scale * step
            value = loss(candidate)
            if value <= current:
                break
            scale *= 0.5
        else:
            break
        converged = current - value < 1e-9 * max(abs(current), 1.0)
        theta, current = candidate, value
        if converged:
            break
    return Calibration(float(theta[0]), float(theta[1]))


def expected_counts(labels: np.ndarray, prob_right: np.ndarray, num_classes: int, ignore_index: int,
                    spread: int = 9) -> np.ndarray:
    """Expected (TP, predicted, ground truth) pixel counts per class of one label map.

    Args:
        labels: integer (H, W) predicted classes (``ignore_index``: no label).
        prob_right: float (H, W) calibrated probability that each label is right.
        spread: box size (pixels) whose other classes share a pixel's missing mass ``1 - p``;
            where no other class is near, the mass goes to no class (it lowers nothing).

    Returns:
        float64 (C, 3): columns E[TP], E[predicted], E[ground truth]. Unlabelled pixels count as
        ground truth of the classes around them with mass 1 (a miss, as in :mod:`models.metrics`).
    """
    labels = np.asarray(labels)
    p = np.asarray(prob_right, dtype=np.float32)
    if labels.shape != p.shape:
        raise ValueError(f"labels {labels.shape} and probabilities {p.shape} differ in shape")
    c = num_classes
    valid = (labels >= 0) & (labels < c) & (labels != ignore_index)
    lab = np.where(valid, labels, 0).astype(np.int64).ravel()
    p = np.where(valid, p, 0.0).astype(np.float32)
    out = np.zeros((c, 3), np.float64)
    out[:, 0] = np.bincount(lab, weights=p.ravel(), minlength=c)[:c]
    out[:, 1] = np.bincount(lab, weights=valid.ravel().astype(np.float64), minlength=c)[:c]
    out[:, 2] = out[:, 0]
    missing = np.where(valid, 1.0 - p, 1.0).astype(np.float32)
    present = np.flatnonzero(out[:, 1])
    if not missing.any() or len(present) == 0:
        return out
    share = np.zeros((len(present),) + labels.shape, np.float32)
    for i, k in enumerate(present):
        share[i] = cv2.blur(((labels == k) & valid).astype(np.float32), (spread, spread),
                            borderType=cv2.BORDER_REPLICATE)
        share[i][labels == k] = 0.0  # the missing mass belongs to a class other than the one predicted
    total = share.sum(0)
    has_other = total > 1e-6
    weight = np.where(has_other, missing / np.where(has_other, total, 1.0), 0.0)
    out[present, 2] += (share * weight).reshape(len(present), -1).sum(1)
    return out


def expected_iou(counts: np.ndarray) -> np.ndarray:
    """float64 (C,) expected IoU (0-1) from :func:`expected_counts` sums; NaN for classes never predicted."""
    tp, pred, gt = counts[:, 0], counts[:, 1], counts[:, 2]
    union = pred + gt - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pred > 0, tp / np.where(union > 0, union, 1), np.nan)


def expected_miou(counts: np.ndarray) -> float:
    """Estimated mIoU in percent over the classes predicted; NaN when nothing was predicted."""
    iou = expected_iou(counts)
    return float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan")


@dataclass
class CycleCalibration:
    """What a sequence's cycles say about one method: the calibration and the cycles' own scores.

    ``cycle_confusion`` maps cycle length l to the (C, C+1) confusion of the cycled labels against
    the annotations; ``excluded`` counts keyframes left out because the refiner trained on them.
    """

    calibration: Calibration
    cycles: int
    pixels: int
    keyframes: list[int]
    excluded: int
    cycle_confusion: dict[int, np.ndarray] = field(default_factory=dict)

    def record(self) -> dict:
        """A JSON-ready record (kept in the store with the method's results)."""
        return {"a": round(self.calibration.a, 6), "b": round(self.calibration.b, 6), "cycles": self.cycles,
                "pixels": self.pixels, "keyframes": self.keyframes, "excluded_keyframes": self.excluded,
                "cycle_confusion": {str(k): v.tolist() for k, v in sorted(self.cycle_confusion.items())}}

    @staticmethod
    def from_record(record: dict) -> CycleCalibration:
        return CycleCalibration(
            Calibration(float(record["a"]), float(record["b"])), int(record["cycles"]), int(record["pixels"]),
            list(record.get("keyframes", [])), int(record.get("excluded_keyframes", 0)),
            {int(k): np.asarray(v, np.int64) for k, v in record.get("cycle_confusion", {}).items()})


def run_cycle(method: PropagationMethod, inputs: SequenceInputs, t: int, length: int, direction: int) -> LabelState:
    """Any method's label of keyframe ``t`` after the cycle ``t -> t + direction*length -> t``."""
    if length < 1 or direction not in (1, -1):
        raise ConfigError(f"a cycle needs length >= 1 and direction +1 or -1, got {length}, {direction}")
    if not 0 <= t + direction * length < inputs.num_frames:
        raise ConfigError(f"a cycle of length {length} from frame {t} leaves the sequence of {inputs.num_frames} frames")
    ann = method._tensor(inputs.annotation(t)).long()
    state = LabelState(ann, torch.ones(ann.shape, device=method.device))
    path = cycle_path(t, length, direction)
    for src, dst in itertools.pairwise(path):
        state = method.step(state, src, dst, inputs)
    return state


def calibration_keyframes(annotated: np.ndarray, max_keyframes: int) -> list[int]:
    """Up to ``max_keyframes`` annotated frames, evenly spread over the sequence."""
    keys = np.flatnonzero(annotated)
    if len(keys) <= max_keyframes:
        return [int(k) for k in keys]
    pick = np.round(np.linspace(0, len(keys) - 1, max_keyframes)).astype(int)
    return [int(keys[i]) for i in pick]


def estimate_plan(annotated: np.ndarray, config: EstimateConfig, max_distance: int) -> list[tuple[int, int, int]]:
    """The cycles (keyframe t, length l, direction) the estimate runs: lengths up to ceil(K/2), inside the sequence."""
    n = len(annotated)
    lengths = [length for length in config.cycle_lengths if 1 <= length <= math.ceil(max_distance / 2)] or [1]
    return [(t, length, d) for t in calibration_keyframes(np.asarray(annotated, bool), config.max_keyframes)
            for length in lengths for d in (1, -1) if 0 <= t + d * length < n]


def calibrate_on_cycles(method: PropagationMethod, inputs: SequenceInputs, config: EstimateConfig,
                        skip: Iterable[str] = (),
                        on_step: Callable[[], None] | None = None) -> CycleCalibration:
    """Run the cycles of ``config`` from the sequence's keyframes and fit the calibration.

    Args:
        skip: annotation fingerprints (:func:`annotation_fingerprint`) whose keyframes are left
            out: the refiner trained on their cycles.
        on_step: called with no argument after each cycle (progress).
    """
    skip = set(skip)
    rng = np.random.default_rng(config.seed)
    c, ignore = inputs.num_classes, inputs.ignore_index
    confs: list[np.ndarray] = []
    rights: list[np.ndarray] = []
    by_length: dict[int, np.ndarray] = {}
    used: list[int] = []
    excluded: set[int] = set()
    cycles = 0
    annotations: dict[int, np.ndarray] = {}
    for t, length, direction in estimate_plan(inputs.annotated, config, method.config.max_distance):
        if t in excluded:
            continue
        if t not in annotations:
            annotations[t] = np.asarray(inputs.annotation(t))
            if skip and annotation_fingerprint(annotations[t]) in skip:
                excluded.add(t)
                continue
            used.append(t)
        ann = annotations[t]
        state = run_cycle(method, inputs, t, length, direction)
        labels = state.labels.to(torch.uint8).cpu().numpy()
        conf = state.confidence.float().cpu().numpy()
        cm = confusion_matrix(ann, labels, c, ignore)
        by_length[length] = by_length[length] + cm if length in by_length else cm
        idx = np.flatnonzero(ann.ravel() != ignore)
        if len(idx) > config.pixels_per_cycle:
            idx = rng.choice(idx, config.pixels_per_cycle, replace=False)
        confs.append(conf.ravel()[idx])
        rights.append(labels.ravel()[idx] == ann.ravel()[idx])
        cycles += 1
        if on_step is not None:
            on_step()
    conf_all = np.concatenate(confs) if confs else np.zeros(0, np.float32)
    right_all = np.concatenate(rights) if rights else np.zeros(0, bool)
    return CycleCalibration(fit_calibration(conf_all, right_all), cycles, int(conf_all.size), used, len(excluded),
                            by_length)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` class (ties count half); NaN if one class."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(positive, dtype=bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), np.float64)
    # average ranks over ties (Mann-Whitney U)
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass
class Reliability:
    """A reliability diagram: per confidence bin, the mean confidence, the accuracy and the pixel count."""

    edges: np.ndarray        # (B + 1,)
    confidence: np.ndarray   # (B,) NaN for empty bins
    accuracy: np.ndarray     # (B,)
    count: np.ndarray        # (B,)

    @property
    def ece(self) -> float:
        """Expected calibration error in percent: count-weighted |accuracy - confidence|."""
        n = self.count.sum()
        ok = self.count > 0
        return float(100 * np.sum(self.count[ok] * np.abs(self.accuracy[ok] - self.confidence[ok])) / n) if n else float("nan")


def reliability(prob: np.ndarray, correct: np.ndarray, bins: int = 10) -> Reliability:
    """Bin pixels by probability of being right (0-1) and compare with how often they are right."""
    p = np.clip(np.asarray(prob, dtype=np.float64).ravel(), 0, 1)
    y = np.asarray(correct, dtype=np.float64).ravel()
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=bins) / count
        acc = np.bincount(idx, weights=y, minlength=bins) / count
    return Reliability(edges, conf, acc, count)
