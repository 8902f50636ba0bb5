"""Per-sequence results for the dashboard, reduced with dask over the stored label arrays.

For a sequence with ground truth: mIoU of a method (frames at distance 1..K that are not
annotations), from one confusion matrix accumulated chunk by chunk - the label arrays are never
loaded whole. Without ground truth: label coverage (share of pixels of reached frames holding a
class, not ignore) and the mean confidence instead.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np

from models.metrics import confusion_matrix, iou_per_class, mean_iou
from storage.stages import GROUND_TRUTH, result_array_names, results_stage
from storage.store import Sequence, SequenceStore


def _block_confusion(gt: np.ndarray, pred: np.ndarray, keep: np.ndarray, num_classes: int,
                     ignore_index: int) -> np.ndarray:
    """(1, C, C+1) confusion of the frames of one block whose ``keep`` is set; gt/pred (t, H, W), keep (t, 1, 1)."""
    gt = np.where(keep, gt, ignore_index)
    return confusion_matrix(gt, pred, num_classes, ignore_index)[None]


def dask_confusion(seq: Sequence, method: str, max_distance: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Pooled (C, C+1) confusion and one per distance 1..K of ``method`` on ``seq`` (dask reduction).

    Frames scored: ground truth present, not annotated, reached at distance 1..K.
    """
    classes = seq.store.classes
    c, ignore = classes.num_classes, classes.ignore_index
    labels_name, _, distance_name = result_array_names(method)
    distance = np.asarray(seq.array(distance_name)[:])
    scored = seq.has_gt & ~seq.annotated & (distance >= 1) & (distance <= max_distance)
    gt = seq.to_dask(GROUND_TRUTH)
    pred = seq.to_dask(labels_name).rechunk(gt.chunks)
    by_distance: dict[int, Any] = {}
    for d in np.unique(distance[scored]):
        keep = da.from_array(scored & (distance == d), chunks=(gt.chunks[0],))
        blocks = da.map_blocks(_block_confusion, gt, pred, keep[:, None, None], c, ignore,
                               dtype=np.int64, chunks=((1,) * gt.numblocks[0], (c,), (c + 1,)))
        by_distance[int(d)] = blocks.sum(axis=0)
    computed = dask.compute(by_distance)[0] if by_distance else {}
    pooled = sum(computed.values()) if computed else np.zeros((c, c + 1), np.int64)
    return np.asarray(pooled), {d: np.asarray(v) for d, v in computed.items()}


def sequence_summary(seq: Sequence, method: str, max_distance: int = 10) -> dict[str, Any]:
    """Dashboard row of one sequence: frames labelled, and mIoU or coverage + mean confidence.

    Returns:
        ``{"sequence", "frames", "annotated", "frames_labelled", "has_gt", "miou", "coverage",
        "mean_confidence", "miou_by_distance", "per_class_iou"}`` (percent; None where not defined).
    """
    return _summary_and_confusions(seq, method, max_distance)[0]


def _summary_and_confusions(seq: Sequence, method: str,
                            max_distance: int) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """:func:`sequence_summary`'s row and the confusion matrix per distance it was computed from."""
    classes = seq.store.classes
    row: dict[str, Any] = {"sequence": seq.id, "frames": seq.num_frames, "annotated": int(seq.annotated.sum()),
                           "frames_labelled": 0, "has_gt": False, "miou": None, "coverage": None,
                           "mean_confidence": None, "miou_by_distance": {}, "per_class_iou": {}}
    by_d: dict[int, np.ndarray] = {}
    if not seq.stage_done(results_stage(method)):
        return row, by_d
    labels_name, conf_name, distance_name = result_array_names(method)
    distance = np.asarray(seq.array(distance_name)[:])
    reached = (distance >= 1)
    row["frames_labelled"] = int((distance >= 0).sum())
    scored = seq.has_gt & ~seq.annotated & reached & (distance <= max_distance)
    if scored.any():
        pooled, by_d = dask_confusion(seq, method, max_distance)
        row["has_gt"] = True
        row["miou"] = round(mean_iou(pooled), 2)
        row["miou_by_distance"] = {str(d): round(mean_iou(cm), 2) for d, cm in sorted(by_d.items())}
        iou = iou_per_class(pooled) * 100
        row["per_class_iou"] = {n: (None if np.isnan(v) else round(float(v), 2)) for n, v in zip(classes.names, iou)}
    if reached.any():
        idx = np.flatnonzero(reached)
        labels = seq.to_dask(labels_name)
        conf = seq.to_dask(conf_name)
        valid = (labels[idx] != classes.ignore_index)
        covered, conf_sum = dask.compute(valid.mean(), conf[idx].astype(np.float64).mean())
        row["coverage"] = round(float(covered) * 100, 2)
        row["mean_confidence"] = round(float(conf_sum) / 255 * 100, 2)
    return row, by_d


def store_report(store: SequenceStore, methods: list[str], sequences: list[str],
                 max_distance: int = 10) -> dict[str, Any]:
    """Dashboard tables of many sequences: per-sequence rows and, pooled over sequences with ground
    truth, mIoU by distance and per-class IoU per method (confusion matrices summed, not mIoUs averaged).

    Returns:
        ``{"rows": {method: [row, ...]}, "miou_by_distance": {method: {"1": ...}}, "miou_mean":
        {method: ...}, "per_class_iou": {method: {class: ...}}}``
    """
    classes = store.classes
    c = classes.num_classes
    out: dict[str, Any] = {"rows": {}, "miou_by_distance": {}, "miou_mean": {}, "per_class_iou": {}}
    for method in methods:
        by_distance = {d: np.zeros((c, c + 1), np.int64) for d in range(1, max_distance + 1)}
        rows = []
        for seq_id in sequences:
            row, per_d = _summary_and_confusions(store.sequence(seq_id), method, max_distance)
            rows.append(row)
            for d, cm in per_d.items():
                by_distance[d] += cm
        miou_d = {str(d): (round(mean_iou(cm), 2) if cm.sum() else None) for d, cm in by_distance.items()}
        values = [v for v in miou_d.values() if v is not None]
        iou = iou_per_class(sum(by_distance.values())) * 100
        out["rows"][method] = rows
        out["miou_by_distance"][method] = miou_d
        out["miou_mean"][method] = round(float(np.mean(values)), 2) if values else None
        out["per_class_iou"][method] = {n: (None if np.isnan(v) else round(float(v), 2))
                                        for n, v in zip(classes.names, iou)}
    return out
