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
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import cv2
import numpy as np
import torch
from autolabel.models.cycle import cycle_path
from autolabel.models.metrics import confusion_matrix, mean_iou
from autolabel.models.propagation import Chain, LabelState, PropagationMethod, SequenceInputs, share_trust
from pydantic import BaseModel, ConfigDict, Field

from autolabel.errors import ConfigError

_EPS = 1e-4
ESTIMATE_VERSION = 3  # bump when the estimate's algorithm changes: stored estimates are then recomputed


class EstimateConfig(BaseModel):
    """How labels are scored without ground truth (``autolabel label`` runs the cycles)."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = Field(True, description="run the estimate's probes while labelling")
    source: Literal["auto", "held-out", "cycles"] = Field(
        "auto", description="held-out keyframe chains where two keyframes are at most max_gap apart, else cycles")
    max_gap: int = Field(127, ge=2, description="longest keyframe gap a held-out probe runs across (frames)")
    max_keyframes: int = Field(6, ge=1, description="keyframe pairs (or keyframes, for cycles) probed per sequence")
    cycle_lengths: tuple[int, ...] = Field(
        (3,), description="cycles: lengths l (2l steps each); lengths above ceil(K/2) are skipped")
    pixels_per_probe: int = Field(4096, ge=64, description="pixels sampled from each probe's answer for the fit")
    class_prior_pixels: float = Field(200.0, ge=0, description="pseudo-pixels shrinking each class's offset to 0")
    deficit_correction: float = Field(1.0, ge=0, le=1, description="exponent of the deficit ratio (0: off)")
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
    """``P(right) = sigmoid(a * logit(confidence) + b + offsets[class])`` (identity: a=1, b=0, no offsets).

    ``offsets`` (one per class, may be empty) say how much more often than average a pixel
    labelled with that class is wrong: thin classes (poles, signs) are wrong more often at the
    same confidence.
    """

    a: float = 1.0
    b: float = 0.0
    offsets: tuple[float, ...] = ()

    def __call__(self, confidence: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """float32 probabilities of being right, same shape as ``confidence`` (0-1); ``labels``: classes."""
        c = np.clip(np.asarray(confidence, dtype=np.float64), _EPS, 1 - _EPS)
        z = self.a * np.log(c / (1 - c)) + self.b
        if labels is not None and self.offsets:
            table = np.zeros(256)
            table[: len(self.offsets)] = self.offsets
            z = z + table[np.asarray(labels, dtype=np.uint8)]
        return _sigmoid(z).astype(np.float32)

    def of_stored(self, confidence: np.ndarray, labels: np.ndarray, ignore_index: int) -> np.ndarray:
        """float32 (H, W) P(right) of stored uint8 confidence (x255) and uint8 labels (H, W), 0 where
        the label is ``ignore_index``: ``self(confidence / 255, labels)`` to the bit, looked up in a
        table of every (label, confidence) pair made once per calibration (a few times faster per
        frame than computing it)."""
        confidence, labels = np.asarray(confidence), np.asarray(labels)
        if confidence.dtype != np.uint8 or labels.dtype != np.uint8:
            raise TypeError(f"stored confidence and labels are uint8, got {confidence.dtype} and {labels.dtype}")
        return _stored_table(self, ignore_index)[labels, confidence]


@lru_cache(maxsize=32)
def _stored_table(calibration: Calibration, ignore_index: int) -> np.ndarray:
    """float32 (256, 256): P(right) by (label, stored confidence); the ``ignore_index`` row 0."""
    levels = np.broadcast_to(np.arange(256) / 255.0, (256, 256))
    labels = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 256))
    table = calibration(levels, labels)
    table[ignore_index] = 0.0
    return table


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


def fit_class_offsets(calibration: Calibration, confidence: np.ndarray, correct: np.ndarray, labels: np.ndarray,
                      num_classes: int, prior_pixels: float = 200.0, iterations: int = 30) -> Calibration:
    """Per-class offsets on top of a global fit, each shrunk towards 0 by ``prior_pixels`` pseudo-pixels."""
    c = np.clip(np.asarray(confidence, dtype=np.float64).ravel(), _EPS, 1 - _EPS)
    y = np.asarray(correct, dtype=np.float64).ravel()
    lab = np.asarray(labels).ravel()
    base = calibration.a * np.log(c / (1 - c)) + calibration.b
    offsets = np.zeros(num_classes)
    ridge = prior_pixels * 0.25  # the curvature of that many pixels at p = 0.5
    for k in range(num_classes):
        sel = lab == k
        if not sel.any():
            continue
        zk, yk, o = base[sel], y[sel], 0.0
        for _ in range(iterations):
            p = _sigmoid(zk + o)
            grad = np.sum(p - yk) + ridge * o
            hess = np.sum(p * (1 - p)) + ridge
            step = grad / hess
            o -= float(np.clip(step, -2.0, 2.0))
            if abs(step) < 1e-6:
                break
        offsets[k] = o
    return Calibration(calibration.a, calibration.b, tuple(round(float(v), 5) for v in offsets))


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
    p = np.where(valid, p, 0.0).astype(np.float32)
    out = np.zeros((c, 3), np.float64)
    if labels.dtype == np.uint8:  # stored labels, counted as they are: other values land past c
        out[:, 0] = np.bincount(labels.ravel(), weights=p.ravel(), minlength=256)[:c]
        out[:, 1] = np.bincount(labels.ravel(), minlength=256)[:c]
    else:
        lab = np.where(valid, labels, 0).astype(np.int64).ravel()
        out[:, 0] = np.bincount(lab, weights=p.ravel(), minlength=c)[:c]
        out[:, 1] = np.bincount(lab, weights=valid.ravel().astype(np.float64), minlength=c)[:c]
    out[:, 2] = out[:, 0]
    missing = np.where(valid, 1.0 - p, 1.0).astype(np.float32)
    present = np.flatnonzero(out[:, 1])
    if not missing.any() or len(present) == 0:
        return out
    # how many pixels of each present class lie in each pixel's box (integer box sums: the shares
    # of the missing mass are these counts over their total, so the box's area cancels)
    planes = labels[None] == present[:, None, None].astype(labels.dtype)  # (P, H, W); present: valid classes
    counts = np.empty(planes.shape, np.float32)
    for i, plane in enumerate(planes.view(np.uint8)):
        cv2.boxFilter(plane, cv2.CV_32F, (spread, spread), dst=counts[i], normalize=False,
                      borderType=cv2.BORDER_REPLICATE)
    np.copyto(counts, 0.0, where=planes)  # the missing mass belongs to a class other than the one predicted
    total = counts[0].copy()
    for other in counts[1:]:
        total += other
    has_other = total > 0.5
    weight = np.where(has_other, missing / np.where(has_other, total, 1.0), 0.0).astype(np.float32)
    out[present, 2] += counts.reshape(len(present), -1) @ weight.ravel()
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
class Probe:
    """One run of the method whose answer is known: from keyframe ``source`` to keyframe ``target``.

    ``kind`` is ``held-out`` (a one-way chain to the next keyframe, scored against its annotation)
    or ``cycle`` (there and back to the source, ``length`` steps each way).
    """

    kind: str
    source: int
    target: int
    length: int
    direction: int


@dataclass
class EstimateCalibration:
    """What a sequence's probes say about one method's labels.

    ``calibration`` maps confidence (and class) to P(right); ``deficit_ratio`` is how much lower
    the probes' true mIoU was than expected-IoU predicted from their calibrated confidence (its
    (100 - true) / (100 - expected)), applied to the estimates (``errors concentrate``);
    ``confusion`` is the probes' own (C, C+1) confusion against the annotations; ``probe_auroc``
    how well the confidence told their right pixels from the wrong ones; ``spread`` the box
    (:func:`expected_counts`) the deficit ratio was fitted with, which the estimates then use.
    """

    calibration: Calibration
    kind: str
    probes: int
    pixels: int
    keyframes: list[int]
    excluded: int
    deficit_ratio: float = 1.0
    confusion: np.ndarray | None = None
    probe_auroc: float = float("nan")
    spread: int = 9

    def record(self) -> dict:
        """A JSON-ready record (kept in the store with the method's results)."""
        return {"a": round(self.calibration.a, 6), "b": round(self.calibration.b, 6),
                "offsets": list(self.calibration.offsets), "kind": self.kind, "probes": self.probes,
                "pixels": self.pixels, "keyframes": self.keyframes, "excluded_keyframes": self.excluded,
                "deficit_ratio": round(self.deficit_ratio, 5),
                "probe_auroc": None if not np.isfinite(self.probe_auroc) else round(self.probe_auroc, 4),
                "confusion": None if self.confusion is None else self.confusion.tolist(), "spread": self.spread}

    @staticmethod
    def from_record(record: dict) -> EstimateCalibration:
        confusion = record.get("confusion")
        return EstimateCalibration(
            Calibration(float(record["a"]), float(record["b"]), tuple(record.get("offsets", ()))),
            str(record.get("kind", "cycle")), int(record.get("probes", 0)), int(record.get("pixels", 0)),
            list(record.get("keyframes", [])), int(record.get("excluded_keyframes", 0)),
            float(record.get("deficit_ratio", 1.0)), None if confusion is None else np.asarray(confusion, np.int64),
            float(record["probe_auroc"]) if record.get("probe_auroc") is not None else float("nan"),
            int(record.get("spread", 9)))

    def correct_counts(self, counts: np.ndarray) -> np.ndarray:
        """:func:`expected_counts` sums with E[TP] lowered so each class's IoU deficit grows by the ratio.

        IoU' = 1 - r (1 - IoU) per class; E[TP'] = IoU' (E[pred] + E[gt]) / (1 + IoU'). Summed over
        sequences they pool like the uncorrected counts.
        """
        out = np.array(counts, dtype=np.float64, copy=True)
        iou = expected_iou(out)
        ok = np.isfinite(iou)
        target = np.clip(1.0 - self.deficit_ratio * (1.0 - iou[ok]), 0.0, 1.0)
        out[ok, 0] = target * (out[ok, 1] + out[ok, 2]) / (1.0 + target)
        return out


def run_cycle(method: PropagationMethod, inputs: SequenceInputs, t: int, length: int, direction: int) -> LabelState:
    """Any method's label of keyframe ``t`` after the cycle ``t -> t + direction*length -> t``."""
    if length < 1 or direction not in (1, -1):
        raise ConfigError(f"a cycle needs length >= 1 and direction +1 or -1, got {length}, {direction}")
    if not 0 <= t + direction * length < inputs.num_frames:
        raise ConfigError(f"a cycle of length {length} from frame {t} leaves the sequence of {inputs.num_frames} frames")
    return run_path(method, inputs, cycle_path(t, length, direction))


def run_path(method: PropagationMethod, inputs: SequenceInputs, path: list[int],
             on_step: Callable[[], None] | None = None) -> LabelState:
    """The method's steps along ``path`` (neighbouring frames), starting from the annotation of ``path[0]``."""
    return run_path_together([method], inputs, path, on_step)[0]


def run_path_together(methods: list[PropagationMethod], inputs: SequenceInputs, path: list[int],
                      on_step: Callable[[], None] | None = None,
                      states: list[LabelState] | None = None) -> list[LabelState]:
    """:func:`run_path` of several methods stepped together (warping methods that share a
    :class:`~models.propagation.StepMemo` make each step's trust check once); one state per method.

    ``states``: where each method stands at ``path[0]`` (default: that frame's annotation, confidence 1).
    """
    finals = run_paths_together(methods, inputs, [path], on_step, None if states is None else [[s] for s in states])
    return [f[0] for f in finals]


def run_paths_together(methods: list[PropagationMethod], inputs: SequenceInputs, paths: list[list[int]],
                       on_step: Callable[[], None] | None = None,
                       states: list[list[LabelState]] | None = None) -> list[list[LabelState]]:
    """:func:`run_path_together` along several paths at once: each step, the paths still going are one
    batch (:meth:`~models.propagation.PropagationMethod.step_batch`; shorter paths stop first).

    Args:
        states: per method, where it stands at each path's first frame (default: that frame's
            annotation, confidence 1).
        on_step: called after each step of each path and method (progress).

    Returns:
        per method, the final state of each path. Inputs with a ``prefetch``
        (:class:`~models.prefetch.PrefetchingInputs`) read each next step's meanwhile.
    """
    if states is None:
        anns = [methods[0]._tensor(inputs.annotation(path[0])).long() for path in paths]
        states = [[LabelState(ann, torch.ones(ann.shape, device=method.device)) for ann in anns] for method in methods]
    states = [list(s) for s in states]
    prefetch = getattr(inputs, "prefetch", None)

    def reads(k: int) -> list[tuple[str, int]]:  # step k: path[k] -> path[k + 1]
        wanted = [r for path in paths if k + 1 < len(path) for method in methods
                  for r in method.step_reads(path[k], path[k + 1])]
        return list(dict.fromkeys(wanted))

    if prefetch is not None:
        prefetch(reads(0))
    for k in range(max((len(path) - 1 for path in paths), default=0)):
        if prefetch is not None:
            prefetch(reads(k + 1))
        active = [j for j, path in enumerate(paths) if k + 1 < len(path)]
        srcs, dsts = [paths[j][k] for j in active], [paths[j][k + 1] for j in active]
        for m, method in enumerate(methods):
            for j, state in zip(active, method.step_batch([states[m][j] for j in active], srcs, dsts, inputs)):
                states[m][j] = state
                if on_step is not None:
                    on_step()
    return states


def calibration_keyframes(annotated: np.ndarray, max_keyframes: int) -> list[int]:
    """Up to ``max_keyframes`` annotated frames, evenly spread over the sequence."""
    keys = np.flatnonzero(annotated)
    if len(keys) <= max_keyframes:
        return [int(k) for k in keys]
    pick = np.round(np.linspace(0, len(keys) - 1, max_keyframes)).astype(int)
    return [int(keys[i]) for i in pick]


def estimate_plan(annotated: np.ndarray, config: EstimateConfig, max_distance: int) -> list[Probe]:
    """The probes the estimate runs.

    Held-out probes when two keyframes lie at most ``max_gap`` apart: from each of up to
    ``max_keyframes`` such pairs, a chain to the other keyframe in each direction. Otherwise
    cycles of the configured lengths (up to ceil(K/2)) from up to ``max_keyframes`` keyframes;
    they come back to what they started from and flatter the method (``deficit_ratio`` then 1).
    """
    keys = [int(k) for k in np.flatnonzero(annotated)]
    pairs = [(a, b) for a, b in itertools.pairwise(keys) if 1 < b - a <= config.max_gap]
    if pairs and config.source in ("auto", "held-out"):
        if len(pairs) > config.max_keyframes:
            pick = np.round(np.linspace(0, len(pairs) - 1, config.max_keyframes)).astype(int)
            pairs = [pairs[i] for i in pick]
        return [p for a, b in pairs for p in (Probe("held-out", a, b, b - a, 1), Probe("held-out", b, a, b - a, -1))]
    if config.source == "held-out":
        return []
    n = len(annotated)
    lengths = [length for length in config.cycle_lengths if 1 <= length <= math.ceil(max_distance / 2)] or [1]
    return [Probe("cycle", t, t, length, d) for t in calibration_keyframes(np.asarray(annotated, bool),
                                                                           config.max_keyframes)
            for length in lengths for d in (1, -1) if 0 <= t + d * length < n]


def probe_steps(plan: list[Probe]) -> int:
    """Propagation steps of a plan (progress)."""
    return sum(p.length * (2 if p.kind == "cycle" else 1) for p in plan)


def probe_path(probe: Probe) -> list[int]:
    """The frames a probe steps through, from its source keyframe to its target keyframe."""
    if probe.kind == "cycle":
        return cycle_path(probe.source, probe.length, probe.direction)
    return list(range(probe.source, probe.target + probe.direction, probe.direction))


def probes_to_run(plan: list[Probe], inputs: SequenceInputs, skip: Iterable[str] = ()) -> tuple[list[int], set[int]]:
    """Indices into ``plan`` of the probes to run, in plan order, and the keyframes left out.

    A probe ending on a keyframe whose annotation fingerprint is in ``skip`` (the refiner trained on
    it) is left out: its answer would flatter the method.
    """
    skip = set(skip)
    fingerprints: dict[int, str] = {}
    kept: list[int] = []
    excluded: set[int] = set()
    for i, probe in enumerate(plan):
        if probe.target not in fingerprints:
            fingerprints[probe.target] = annotation_fingerprint(np.asarray(inputs.annotation(probe.target)))
        if fingerprints[probe.target] in skip:
            excluded.add(probe.target)
        else:
            kept.append(i)
    return kept, excluded


def run_probe(method: PropagationMethod, inputs: SequenceInputs, probe: Probe,
              on_step: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The method's answer at the probe's target: labels uint8 (H, W) and confidence float32 (H, W)."""
    return run_probe_together([method], inputs, probe, on_step)[0]


def run_probe_together(methods: list[PropagationMethod], inputs: SequenceInputs, probe: Probe,
                       on_step: Callable[[], None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`run_probe` of several methods stepped together (:func:`run_path_together`: warping
    methods that share trust make each step's check once); one answer per method, each the one
    it gets alone."""
    return [_answer(state) for state in run_path_together(methods, inputs, probe_path(probe), on_step)]


def _answer(state: LabelState) -> tuple[np.ndarray, np.ndarray]:
    """A probe's answer: labels uint8 (H, W) and confidence float32 (H, W)."""
    return state.labels.to(torch.uint8).cpu().numpy(), state.confidence.float().cpu().numpy()


def split_probes(plan: list[Probe], parts: int) -> list[list[int]]:
    """Indices into ``plan`` dealt to ``parts`` jobs with about equal propagation steps each.

    Longest probe first, each to the part with the fewest steps so far (ties: the lower part);
    every part's indices in plan order. Deterministic: every job computes the same split.
    """
    if parts < 1:
        raise ConfigError(f"probes are split into at least one part, got {parts}")
    load = [0] * parts
    dealt: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(plan)), key=lambda i: (-probe_steps([plan[i]]), i)):
        part = min(range(parts), key=lambda j: (load[j], j))
        dealt[part].append(i)
        load[part] += probe_steps([plan[i]])
    return [sorted(d) for d in dealt]


def fit_probes(plan: list[Probe], answers: dict[int, tuple[np.ndarray, np.ndarray]], inputs: SequenceInputs,
               config: EstimateConfig, excluded: int = 0) -> EstimateCalibration:
    """Fit the calibration and the deficit ratio on the probes' answers (:func:`run_probe`, by plan index).

    Pixels are sampled from the answers in plan order with one generator seeded by ``config.seed``,
    so the fit depends only on the answers, not on which job ran which probe.
    """
    rng = np.random.default_rng(config.seed)
    c, ignore = inputs.num_classes, inputs.ignore_index
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    finals: list[tuple[np.ndarray, np.ndarray]] = []
    confusion = np.zeros((c, c + 1), np.int64)
    used: set[int] = set()
    for i in sorted(answers):
        probe, (labels, conf) = plan[i], answers[i]
        used.update((probe.source, probe.target))
        ann = np.asarray(inputs.annotation(probe.target))
        confusion += confusion_matrix(ann, labels, c, ignore)
        finals.append((labels, conf))
        idx = np.flatnonzero(ann.ravel() != ignore)
        if len(idx) > config.pixels_per_probe:
            idx = rng.choice(idx, config.pixels_per_probe, replace=False)
        samples.append((conf.ravel()[idx], labels.ravel()[idx] == ann.ravel()[idx], labels.ravel()[idx]))
    kind = plan[0].kind if plan else "none"
    if not samples:
        return EstimateCalibration(Calibration(), kind, 0, 0, sorted(used), excluded, spread=config.spread)
    conf_all, right_all, labels_all = (np.concatenate(x) for x in zip(*samples))
    calibration = fit_class_offsets(fit_calibration(conf_all, right_all), conf_all, right_all, labels_all, c,
                                    config.class_prior_pixels)
    ratio = 1.0
    probe_auroc = auroc(-conf_all, ~right_all)
    if kind == "held-out" and config.deficit_correction > 0:
        expected = sum(expected_counts(lab, calibration(cf, lab), c, ignore, config.spread) for lab, cf in finals)
        true_deficit = 100.0 - mean_iou(confusion)
        expected_deficit = 100.0 - expected_miou(expected)
        # transferred in full only where confidence tells right from wrong (probe AUROC >= 0.8): where it
        # does not, the gap mostly reflects the probes' longer distance, not how errors concentrate
        informative = float(np.clip((probe_auroc - 0.5) / 0.3, 0.0, 1.0)) if np.isfinite(probe_auroc) else 0.0
        if np.isfinite(true_deficit) and np.isfinite(expected_deficit) and expected_deficit > 0.5:
            ratio = float(np.clip(true_deficit / expected_deficit, 0.25, 4.0)) ** (config.deficit_correction
                                                                                   * informative)
    return EstimateCalibration(calibration, kind, len(samples), int(conf_all.size), sorted(used), excluded,
                               ratio, confusion, probe_auroc, config.spread)


def calibrate(method: PropagationMethod, inputs: SequenceInputs, config: EstimateConfig, skip: Iterable[str] = (),
              on_step: Callable[[], None] | None = None) -> EstimateCalibration:
    """Run the probes of :func:`estimate_plan` and fit the calibration and the deficit ratio.

    Args:
        skip: annotation fingerprints (:func:`annotation_fingerprint`) of keyframes the refiner
            trained on: probes that end on them are left out (their answer would flatter it).
        on_step: called after every propagation step (progress).
    """
    return calibrate_together([method], inputs, config, [skip], on_step)[0]


def calibrate_together(methods: list[PropagationMethod], inputs: SequenceInputs, config: EstimateConfig,
                       skips: list[Iterable[str]], on_step: Callable[[], None] | None = None
                       ) -> list[EstimateCalibration]:
    """:func:`calibrate` of several methods (same K; ``skips``: one per method) with each probe run
    by the methods that keep it stepped together, so warping methods share each step's trust check
    (:func:`~models.propagation.share_trust`); each method's calibration is the one it gets alone."""
    if len({m.config.max_distance for m in methods}) > 1:
        raise ConfigError("methods calibrated together need the same K (max_distance), got "
                          f"{[m.config.max_distance for m in methods]}")
    share_trust(methods)
    probes = ProbeAnswers(inputs, config, methods[0].config.max_distance, list(skips), on_step)
    return [c for c in probes.calibrations(methods, inputs) if c is not None]


class ProbeAnswers:
    """The answers of a sequence's probes for several methods (same K), and their calibrations.

    A held-out probe ``a -> b`` takes its first steps exactly as the propagation's chain from ``a``
    towards ``b`` does (same method, inputs and steps; the chain stops K frames out, or one frame
    before ``b``). Given to :func:`~models.propagation.propagate_frames_together` as ``on_chains``
    on a whole sequence, each such probe resumes from its chain's final state and steps only the
    rest of the way: at K = 10 and keyframes 21 apart, about half of the estimate's steps.
    :meth:`calibrations` runs whole the probes no chain started (cycles, or no propagation pass)
    and fits each method. Either way a method's answers are those it gets alone (tests check the
    records are equal on CPU; batches can differ from lone calls in the last bits).

    Args:
        inputs: the sequence (whole: frame indices are the sequence's).
        skips: per method, annotation fingerprints of keyframes its probes must not end on
            (:func:`probes_to_run`); None for a method whose estimate is not wanted.
        on_step: called after each step of each method (progress).
        batch: resumed probes stepped together at most (a gap's two on CPU, as its chains are).
    """

    def __init__(self, inputs: SequenceInputs, config: EstimateConfig, max_distance: int,
                 skips: list[Iterable[str] | None], on_step: Callable[[], None] | None = None,
                 batch: int = 2) -> None:
        if batch < 1:
            raise ConfigError(f"probes are stepped in batches of at least one, got {batch}")
        self.config, self.max_distance, self.on_step, self.batch = config, max_distance, on_step, batch
        self.plan = estimate_plan(inputs.annotated, config, max_distance)
        self.chosen = [probes_to_run(self.plan, inputs, skip) if skip is not None else None for skip in skips]
        self.answers: list[dict[int, tuple[np.ndarray, np.ndarray]]] = [{} for _ in skips]
        self._resumable = {(p.source, p.direction): i for i, p in enumerate(self.plan) if p.kind == "held-out"}
        self._done: set[int] = set()

    def _running(self, i: int) -> list[int]:
        return [m for m, chosen in enumerate(self.chosen) if chosen is not None and i in chosen[0]]

    def _chain_length(self, probe: Probe) -> int:
        """Steps the propagation's chain from the probe's source takes towards its target (0: none)."""
        return min(self.max_distance, probe.length - 1) if probe.kind == "held-out" else 0

    def steps(self, resumed: bool) -> int:
        """Steps still to run (progress): with ``resumed``, the held-out probes from their chains' ends."""
        return sum(len(self._running(i)) * (probe_steps([p]) - (self._chain_length(p) if resumed else 0))
                   for i, p in enumerate(self.plan))

    def __call__(self, methods: list[PropagationMethod], inputs: SequenceInputs, chains: list[Chain],
                 states: list[list[LabelState]]) -> None:
        """:data:`~models.propagation.OnChains`: resume the probes these chains start (``methods`` and
        ``states`` in the order of ``skips``), up to ``batch`` of them stepped as one batch (those
        run by the same methods)."""
        resumed: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}  # methods -> (probe, chain, steps done)
        for j, chain in enumerate(chains):
            i = self._resumable.get((chain.key, chain.direction))
            if i is None or i in self._done or not 0 < chain.length < self.plan[i].length:
                continue
            self._done.add(i)
            if running := tuple(self._running(i)):
                resumed.setdefault(running, []).append((i, j, chain.length))
        for running, probes in resumed.items():
            for b in range(0, len(probes), self.batch):
                part = probes[b:b + self.batch]
                finals = run_paths_together([methods[m] for m in running], inputs,
                                            [probe_path(self.plan[i])[done:] for i, _, done in part], self.on_step,
                                            [[states[m][j] for _, j, _ in part] for m in running])
                for m, method_finals in zip(running, finals):
                    for (i, _, _), state in zip(part, method_finals):
                        self.answers[m][i] = _answer(state)

    def calibrations(self, methods: list[PropagationMethod], inputs: SequenceInputs
                     ) -> list[EstimateCalibration | None]:
        """Run the probes not answered yet, then fit each wanted method (None for the others)."""
        for i, probe in enumerate(self.plan):
            running = self._running(i)
            if i in self._done or not running:
                continue
            finals = run_path_together([methods[m] for m in running], inputs, probe_path(probe), self.on_step)
            for m, state in zip(running, finals):
                self.answers[m][i] = _answer(state)
            self._done.add(i)
        return [None if chosen is None else fit_probes(self.plan, self.answers[m], inputs, self.config,
                                                       len(chosen[1]))
                for m, chosen in enumerate(self.chosen)]


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
