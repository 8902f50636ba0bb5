"""Confusion matrix and IoU against a hand-computed case."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autolabel.models.metrics import confusion_matrix, iou_per_class, mean_iou


def test_hand_computed_confusion_and_iou() -> None:
    # 3 classes; 255 = ignore
    gt = np.array([[0, 0, 1, 1],
                   [1, 2, 255, 0]])
    pred = np.array([[0, 1, 1, 255],
                     [1, 0, 2, 0]])
    cm = confusion_matrix(gt, pred, num_classes=3, ignore_index=255)
    expected = np.array([
        # pred 0  1  2  unknown
        [2, 1, 0, 0],   # gt 0: (0,0) (0,1)->1 (1,3)->0  => 2 right, 1 as class 1
        [0, 2, 0, 1],   # gt 1: two right, one predicted ignore (a miss)
        [1, 0, 0, 0],   # gt 2: predicted 0
    ])
    np.testing.assert_array_equal(cm, expected)
    iou = iou_per_class(cm)
    # class 0: TP 2, FP 1 (gt 2 -> 0), FN 1 -> 2/4; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: TP 0, FN 1 -> 0
    np.testing.assert_allclose(iou, [0.5, 0.5, 0.0])
    assert mean_iou(cm) == pytest.approx(100 / 3)


def test_absent_class_is_nan_and_left_out() -> None:
    cm = confusion_matrix(np.array([0, 0, 1]), np.array([0, 0, 1]), num_classes=3)
    iou = iou_per_class(cm)
    assert iou[:2].tolist() == [1.0, 1.0] and math.isnan(iou[2])
    assert mean_iou(cm) == 100.0


def test_prediction_only_class_counts() -> None:
    cm = confusion_matrix(np.array([0, 0]), np.array([0, 2]), num_classes=3)
    iou = iou_per_class(cm)
    assert iou[0] == 0.5 and iou[2] == 0.0 and math.isnan(iou[1])


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 2)
