"""RMI loss: a hand-computed case, its invariances and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autolabel.errors import ShapeError
from autolabel.models.rmi import RMILoss, region_vectors, rmi_loss, rmi_lower_bound

EPS = 5e-4


class TestRMILowerBound:
    def test_one_dimension_by_hand(self) -> None:
        # y = [1, 0, 1, 0], p = [0.9, 0.1, 0.8, 0.2]: var(y) = 0.25, var(p) = 0.125, cov = 0.175
        y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 4)
        p = torch.tensor([0.9, 0.1, 0.8, 0.2], dtype=torch.float64).view(1, 1, 1, 4)
        expected = 0.5 * math.log(0.25 - 0.175 ** 2 / (0.125 + EPS) + EPS)
        assert rmi_lower_bound(y, p, EPS).item() == pytest.approx(expected, rel=1e-9)

    def test_two_dimensions_match_the_matrix_formula(self) -> None:
        rng = np.random.default_rng(0)
        y = (rng.random((2, 50)) > 0.5).astype(np.float64)
        p = np.clip(y * 0.7 + rng.random((2, 50)) * 0.3, 0, 1)
        yc, pc = y - y.mean(1, keepdims=True), p - p.mean(1, keepdims=True)
        sy, sp, syp = yc @ yc.T / 50, pc @ pc.T / 50, yc @ pc.T / 50
        post = sy - syp @ np.linalg.inv(sp + EPS * np.eye(2)) @ syp.T + EPS * np.eye(2)
        expected = 0.5 * np.log(np.linalg.det(post)) / 2
        got = rmi_lower_bound(torch.from_numpy(y).view(1, 1, 2, 50), torch.from_numpy(p).view(1, 1, 2, 50), EPS)
        assert got.item() == pytest.approx(expected, rel=1e-8)

    def test_shape_mismatch(self) -> None:
        with pytest.raises(ShapeError, match="same shape"):
            rmi_lower_bound(torch.zeros(1, 1, 4, 9), torch.zeros(1, 1, 4, 8))


class TestRMILoss:
    def _target(self) -> torch.Tensor:
        t = torch.zeros(2, 24, 24, dtype=torch.long)
        t[:, 6:18, 4:14] = 1
        t[:, :, 18:] = 2
        return t

    def test_region_vectors_are_the_windows(self) -> None:
        x = torch.arange(16.0).view(1, 1, 4, 4)
        v = region_vectors(x, 3)
        assert v.shape == (1, 1, 9, 4)
        assert v[0, 0, :, 0].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]

    def test_a_right_prediction_scores_lower_than_a_blurred_or_wrong_one(self) -> None:
        t = self._target()
        right = torch.nn.functional.one_hot(t, 3).permute(0, 3, 1, 2).float() * 8
        blurred = torch.nn.functional.avg_pool2d(right, 7, 1, 3)
        wrong = right.roll(5, dims=-1)
        losses = [rmi_loss(x, t).item() for x in (right, blurred, wrong)]
        assert losses[0] < losses[1] < losses[2]

    def test_ignored_pixels_do_not_count(self) -> None:
        t = self._target()
        t_ign = t.clone()
        t_ign[:, :4] = 255
        logits = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
        other = logits.clone()
        other[..., :4, :] = 100 * torch.randn(2, 3, 4, 24)
        assert rmi_loss(logits, t_ign).item() == pytest.approx(rmi_loss(other, t_ign).item(), abs=1e-6)

    def test_gradients_flow(self) -> None:
        logits = torch.randn(1, 3, 24, 24, requires_grad=True)
        RMILoss()(logits, self._target()[:1]).backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0

    @pytest.mark.parametrize(("logits", "target", "match"), [
        (torch.zeros(1, 3, 8, 8), torch.zeros(1, 9, 8, dtype=torch.long), "share B, H, W"),
        (torch.zeros(3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long), "shape"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), "at least 3x3"),
    ])
    def test_bad_shapes(self, logits: torch.Tensor, target: torch.Tensor, match: str) -> None:
        with pytest.raises(ShapeError, match=match):
            rmi_loss(logits, target)
