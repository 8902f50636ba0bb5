"""Segmentation metrics the Cityscapes way: one confusion matrix, IoU = TP / (TP + FP + FN).

Ground-truth pixels equal to the ignore index are left out. Predictions outside the class set
(the ignore label, i.e. 'no label here') count as misses: they are false negatives of the true
class and false positives of no class. A class absent from both ground truth and prediction has
IoU NaN and is left out of the mean.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Counts of (true class, predicted class) over valid pixels.

    Args:
        gt, pred: integer label maps of one shape (any), e.g. (H, W).

    Returns:
        int64 (C, C + 1): rows are true classes; the last column counts predictions outside
        the class set (unknown / ignore).
    """
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    gt = gt.ravel().astype(np.int64)
    pred = pred.ravel().astype(np.int64)
    valid = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    pred = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)
    index = gt[valid] * (num_classes + 1) + pred[valid]
    return np.bincount(index, minlength=num_classes * (num_classes + 1)).reshape(num_classes, num_classes + 1)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """float64 (C,) IoU of each class (0-1); NaN for classes absent from ground truth and prediction."""
    c = cm.shape[0]
    tp = np.diag(cm[:, :c]).astype(np.float64)
    fp = cm[:, :c].sum(0) - tp
    fn = cm.sum(1) - tp
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU in percent (0-100) over the classes present; NaN when no class is present."""
    iou = iou_per_class(cm)
    return float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan")
