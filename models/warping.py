"""Backward warping along optical flow, and occlusion masks.

Convention: a flow field ``F`` of shape (B, 2, H, W) defined on the *target* frame's pixels
points to where each target pixel's content is found in the *source* frame:
``warped(p) = source(p + F(p))``. Channel 0 is the x (column) displacement, channel 1 the y
(row) displacement, both in pixels; integer coordinates are pixel centres.

To carry a label from frame t to frame t+1, warp it with the backward flow of the pair
(``t+1 -> t``, defined on frame t+1); to carry it from t+1 to t, use the forward flow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autolabel.models._checks import check_same_hw, check_shape


def source_coords(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source pixel coordinates ``x + F_x``, ``y + F_y`` of every target pixel, each (B, H, W)."""
    check_shape(flow, ["B", "2", "H", "W"], "flow")
    _, _, h, w = flow.shape
    ys = torch.arange(h, device=flow.device, dtype=flow.dtype).view(1, h, 1)
    xs = torch.arange(w, device=flow.device, dtype=flow.dtype).view(1, 1, w)
    return xs + flow[:, 0], ys + flow[:, 1]


def flow_to_grid(flow: torch.Tensor) -> torch.Tensor:
    """Sampling grid for ``grid_sample`` (align_corners=True) from a flow field.

    Args:
        flow: (B, 2, H, W) displacement in pixels.

    Returns:
        (B, H, W, 2) grid in [-1, 1] coordinates (x, y).
    """
    x, y = source_coords(flow)
    h, w = flow.shape[-2:]
    return torch.stack([2.0 * x / max(w - 1, 1) - 1.0, 2.0 * y / max(h - 1, 1) - 1.0], dim=-1)


def inside_mask(flow: torch.Tensor) -> torch.Tensor:
    """bool (B, H, W): target pixels whose source location lies inside the source frame."""
    x, y = source_coords(flow)
    h, w = flow.shape[-2:]
    return (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)


def sampling(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grid (B, H, W, 2), inside (B, H, W))`` of a float32 flow: computed once, given to several warps.

    :func:`backward_warp`, :func:`warp_labels` and :func:`fb_consistency` take them as ``grid`` and
    ``inside``; the results are those the functions compute from ``flow`` themselves.
    """
    flow = flow.float()
    return flow_to_grid(flow), inside_mask(flow)


def backward_warp(source: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear",
                  grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``source`` at ``p + flow(p)`` for every target pixel ``p``.

    Args:
        source: (B, C, H, W) image, one-hot or probability map.
        flow: (B, 2, H, W) target -> source flow.
        mode: ``bilinear`` (images, probabilities) or ``nearest``.
        grid: :func:`sampling` of ``flow`` when already computed (float32 sources).

    Returns:
        warped (B, C, H, W), zero where the source location is outside the frame, and
        inside (B, H, W) bool flags of the pixels that came from inside the frame.
    """
    check_shape(source, ["B", "C", "H", "W"], "source")
    check_same_hw(source, flow, ("source", "flow"))
    if grid is not None and source.dtype == torch.float32 and flow.dtype == torch.float32:
        coords, inside = grid
    else:
        coords = flow_to_grid(flow.to(source.dtype) if source.is_floating_point() else flow)
        inside = inside_mask(flow)
    # border padding: samples within half a pixel outside the frame take the edge value
    warped = F.grid_sample(source, coords, mode=mode, padding_mode="border", align_corners=True)
    return warped * inside.unsqueeze(1).to(warped.dtype), inside


def warp_labels(labels: torch.Tensor, flow: torch.Tensor, ignore_index: int = 255,
                outside: str = "ignore", grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Nearest-neighbour warp of index labels (or of any per-pixel map, e.g. confidence).

    Args:
        labels: (B, H, W) integer class indices, or floats (kept as they are, not rounded).
        flow: (B, 2, H, W) target -> source flow.
        outside: what pixels whose source lies outside the frame get: ``ignore`` (the
            ``ignore_index``) or ``border`` (the label of the nearest border pixel).
        grid: :func:`sampling` of ``flow`` when already computed.

    Returns:
        (B, H, W) labels of the same dtype.
    """
    check_shape(labels, ["B", "H", "W"], "labels")
    check_same_hw(labels, flow, ("labels", "flow"))
    coords, inside = grid if grid is not None else (flow_to_grid(flow.float()), None)
    warped = F.grid_sample(labels.unsqueeze(1).float(), coords, mode="nearest", padding_mode="border",
                           align_corners=True)
    out = warped.squeeze(1)
    if not labels.is_floating_point():
        out = out.round().to(labels.dtype)
    if outside == "border":
        return out
    if outside != "ignore":
        raise ValueError(f"outside must be 'ignore' or 'border', got {outside!r}")
    return torch.where(inside_mask(flow) if inside is None else inside, out, torch.full_like(out, ignore_index))


def fb_consistency(flow_to_source: torch.Tensor, flow_from_source: torch.Tensor,
                   alpha1: float = 0.01, alpha2: float = 0.5,
                   grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Forward-backward consistency: target pixels whose round trip returns to themselves.

    A target pixel ``p`` maps to ``q = p + w(p)`` in the source with ``w = flow_to_source``; the
    source's flow back, ``v = flow_from_source`` sampled at ``q``, should cancel it. The pixel is
    consistent when ``|w + v(q)|^2 < alpha1 (|w|^2 + |v(q)|^2) + alpha2`` (Sundaram et al. 2010);
    occluded and badly matched pixels fail.

    Args:
        flow_to_source: (B, 2, H, W) target -> source flow, on the target's pixels.
        flow_from_source: (B, 2, H, W) source -> target flow, on the source's pixels.
        grid: :func:`sampling` of ``flow_to_source`` when already computed.

    Returns:
        (B, H, W) bool, False also where ``q`` is outside the frame.
    """
    check_shape(flow_to_source, ["B", "2", "H", "W"], "flow_to_source")
    check_same_hw(flow_to_source, flow_from_source, ("flow_to_source", "flow_from_source"))
    back, inside = backward_warp(flow_from_source.float(), flow_to_source.float(), mode="bilinear", grid=grid)
    w = flow_to_source.float()
    diff = (w + back).pow(2).sum(1)
    bound = alpha1 * (w.pow(2).sum(1) + back.pow(2).sum(1)) + alpha2
    return (diff < bound) & inside


def photometric_error(target: torch.Tensor, warped_source: torch.Tensor) -> torch.Tensor:
    """Per-pixel Euclidean colour distance ``||I_k - phi(I_{k-1})||_2`` (paper Eq. 6).

    Args:
        target, warped_source: (B, 3, H, W) images on the same scale (0-255 here).

    Returns:
        (B, H, W) distances.
    """
    check_same_hw(target, warped_source, ("target", "warped_source"))
    return (target.float() - warped_source.float()).pow(2).sum(1).sqrt()


class BackwardWarp(nn.Module):
    """Module form of :func:`backward_warp`."""

    def __init__(self, mode: str = "bilinear") -> None:
        super().__init__()
        self.mode = mode

    def forward(self, source: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return backward_warp(source, flow, self.mode)
