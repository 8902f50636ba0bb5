"""Warping along flow: exactness, out-of-frame flags, occlusion masks, shape errors."""

from __future__ import annotations

import pytest
import torch

from autolabel.errors import ShapeError
from autolabel.models.warping import BackwardWarp, backward_warp, fb_consistency, inside_mask, photometric_error, warp_labels


def _constant_flow(b: int, h: int, w: int, dx: float, dy: float) -> torch.Tensor:
    flow = torch.zeros(b, 2, h, w)
    flow[:, 0], flow[:, 1] = dx, dy
    return flow


class TestBackwardWarp:
    def test_smoke_shapes(self) -> None:
        out, inside = backward_warp(torch.rand(2, 3, 4, 5), torch.zeros(2, 2, 4, 5))
        assert out.shape == (2, 3, 4, 5) and inside.shape == (2, 4, 5) and inside.dtype == torch.bool

    @pytest.mark.parametrize("mode", ["bilinear", "nearest"])
    def test_identity_flow_is_exact(self, mode: str) -> None:
        x = torch.rand(2, 3, 7, 9)
        out, inside = backward_warp(x, torch.zeros(2, 2, 7, 9), mode)
        torch.testing.assert_close(out, x)
        assert inside.all()

    @pytest.mark.parametrize(("dx", "dy"), [(2, 0), (0, -3), (-1, 2)])
    @pytest.mark.parametrize("mode", ["bilinear", "nearest"])
    def test_integer_translation_is_exact_and_flags_outside(self, dx: int, dy: int, mode: str) -> None:
        x = torch.rand(1, 2, 6, 8)
        out, inside = backward_warp(x, _constant_flow(1, 6, 8, dx, dy), mode)
        expected_inside = torch.zeros(6, 8, dtype=torch.bool)
        for i in range(6):
            for j in range(8):
                si, sj = i + dy, j + dx
                if 0 <= si < 6 and 0 <= sj < 8:
                    expected_inside[i, j] = True
                    torch.testing.assert_close(out[0, :, i, j], x[0, :, si, sj])
                else:
                    assert (out[0, :, i, j] == 0).all()
        assert torch.equal(inside[0], expected_inside)

    def test_half_pixel_bilinear(self) -> None:
        x = torch.tensor([[[[0.0, 2.0, 4.0]]]])
        out, _ = backward_warp(x, _constant_flow(1, 1, 3, 0.5, 0))
        torch.testing.assert_close(out[0, 0, 0, :2], torch.tensor([1.0, 3.0]))

    def test_module_matches_function(self) -> None:
        x, flow = torch.rand(1, 3, 5, 5), torch.randn(1, 2, 5, 5)
        torch.testing.assert_close(BackwardWarp()(x, flow)[0], backward_warp(x, flow)[0])

    def test_gradcheck(self) -> None:
        x = torch.rand(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
        flow = torch.rand(1, 2, 3, 4, dtype=torch.float64) * 0.6 + 0.2
        assert torch.autograd.gradcheck(lambda s: backward_warp(s, flow)[0], (x,))

    @pytest.mark.parametrize(("source", "flow"), [
        (torch.rand(3, 4, 5), torch.zeros(1, 2, 4, 5)),
        (torch.rand(1, 3, 4, 5), torch.zeros(1, 3, 4, 5)),
        (torch.rand(1, 3, 4, 5), torch.zeros(1, 2, 4, 6)),
    ])
    def test_shape_errors(self, source: torch.Tensor, flow: torch.Tensor) -> None:
        with pytest.raises(ShapeError, match="must"):
            backward_warp(source, flow)


class TestWarpLabels:
    def test_translation_moves_labels_and_fills_ignore(self) -> None:
        labels = torch.arange(12, dtype=torch.uint8).view(1, 3, 4)
        out = warp_labels(labels, _constant_flow(1, 3, 4, 1, 0), ignore_index=255)
        assert out.dtype == torch.uint8
        assert out[0, :, :3].tolist() == labels[0, :, 1:].tolist()
        assert (out[0, :, 3] == 255).all()

    def test_float_maps_are_not_rounded(self) -> None:
        conf = torch.full((1, 3, 4), 0.5)
        out = warp_labels(conf, _constant_flow(1, 3, 4, 1, 0), outside="border")
        torch.testing.assert_close(out, conf)

    def test_nearest_keeps_label_values(self) -> None:
        labels = torch.randint(0, 11, (2, 8, 8))
        out = warp_labels(labels, torch.randn(2, 2, 8, 8) * 0.3)
        assert set(out.unique().tolist()) <= set(labels.unique().tolist()) | {255}


class TestFbConsistency:
    def test_disoccluded_background_behind_a_moving_square_is_flagged(self) -> None:
        h, w = 20, 40
        fw = torch.zeros(1, 2, h, w)   # frame 0 -> 1: the square (cols 10..19) moves +4
        fw[0, 0, 5:15, 10:20] = 4.0
        bw = torch.zeros(1, 2, h, w)   # frame 1 -> 0: the square now at cols 14..23 moves back -4
        bw[0, 0, 5:15, 14:24] = -4.0
        consistent = fb_consistency(bw, fw)[0]  # target frame 1, source frame 0
        expected = torch.ones(h, w, dtype=torch.bool)
        expected[5:15, 10:14] = False  # background uncovered in frame 1 was under the square in frame 0
        assert torch.equal(consistent, expected)

    def test_pixels_leaving_the_frame_are_inconsistent(self) -> None:
        flow = _constant_flow(1, 4, 6, 2, 0)
        consistent = fb_consistency(flow, -flow)
        assert torch.equal(consistent[0], inside_mask(flow)[0])
        assert not consistent[0, :, 4:].any()


def test_photometric_error_is_euclidean() -> None:
    a = torch.zeros(1, 3, 1, 1)
    b = torch.tensor([3.0, 4.0, 0.0]).view(1, 3, 1, 1)
    assert photometric_error(a, b).item() == pytest.approx(5.0)
