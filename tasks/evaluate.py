"""Evaluation stage: mIoU of each method by propagation distance, per class and per sequence.

Scored frames: those with ground truth that are not annotations and that the method reached
at distance 1..K. One confusion matrix is accumulated per (method, distance); the per-class IoU
pools distances 1..K; each sequence's mIoU pools its own frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from models.metrics import confusion_matrix, iou_per_class, mean_iou
from storage.stages import result_array_names, results_stage
from storage.store import Sequence, SequenceStore


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def sequence_confusions(seq: Sequence, method: str, max_distance: int) -> tuple[dict[int, np.ndarray], int]:
    """Confusion matrix (C, C+1) per distance 1..K for one sequence and method, read frame by frame,
    and the number of frames scored."""
    classes = seq.store.classes
    labels_name, _, distance_name = result_array_names(method)
    labels = seq.array(labels_name)
    distance = np.asarray(seq.array(distance_name)[:])
    scored = seq.has_gt & ~seq.annotated & (distance >= 1) & (distance <= max_distance)
    out: dict[int, np.ndarray] = {}
    for t in np.flatnonzero(scored):
        cm = confusion_matrix(seq.ground_truth(int(t)), np.asarray(labels[int(t)]), classes.num_classes,
                              classes.ignore_index)
        d = int(distance[t])
        out[d] = out[d] + cm if d in out else cm
    return out, int(scored.sum())


def evaluate_store(
    store: SequenceStore,
    methods: Iterable[str],
    max_distance: int = 10,
    sequences: Iterable[str] | None = None,
    on_sequence: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """The evaluation report (percent, 0-100; NaN written as null).

    Returns:
        ``{"store": str, "methods": {method: {"miou_mean", "miou_by_distance": {"1": ...},
        "per_class_iou": {name: ...}, "per_sequence_miou": {seq: ...}, "frames_scored": int,
        "sequences_missing": [...]}}}``
    """
    classes = store.classes
    c = classes.num_classes
    ids = list(sequences) if sequences is not None else store.sequence_ids()
    report: dict[str, Any] = {"store": store.url, "max_distance": max_distance, "methods": {}}
    for method in methods:
        by_distance = {d: np.zeros((c, c + 1), np.int64) for d in range(1, max_distance + 1)}
        per_sequence: dict[str, float | None] = {}
        missing: list[str] = []
        frames = 0
        for seq_id in ids:
            seq = store.sequence(seq_id)
            if not seq.stage_done(results_stage(method)):
                missing.append(seq_id)
                continue
            confusions, scored = sequence_confusions(seq, method, max_distance)
            if on_sequence is not None:
                on_sequence(method, seq_id)
            frames += scored
            if confusions:
                per_sequence[seq_id] = _finite(mean_iou(sum(confusions.values())))
            for d, cm in confusions.items():
                by_distance[d] += cm
        miou_d = {str(d): _finite(mean_iou(cm)) if cm.sum() else None for d, cm in by_distance.items()}
        values = [v for v in miou_d.values() if v is not None]
        pooled_all = sum(by_distance.values())
        iou = iou_per_class(pooled_all) * 100
        report["methods"][method] = {
            "miou_mean": _finite(float(np.mean(values))) if values else None,
            "miou_by_distance": miou_d,
            "per_class_iou": {name: _finite(v) for name, v in zip(classes.names, iou)},
            "per_sequence_miou": per_sequence,
            "frames_scored": frames,
            "sequences_missing": missing,
        }
    return report
