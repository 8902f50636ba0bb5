"""Shape checks with named dimensions, in the kornia style."""

from __future__ import annotations

import torch

from autolabel.errors import ShapeError


def check_shape(x: torch.Tensor, dims: list[str], name: str = "input") -> None:
    """Raise ShapeError unless ``x`` has ``len(dims)`` dimensions matching ``dims``.

    ``dims`` entries are names (any size) or digits (that exact size), e.g. ``["B", "2", "H", "W"]``.
    """
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(dims):
        raise ShapeError(f"{name} must have shape ({', '.join(dims)}), got {tuple(x.shape)}")
    for size, dim in zip(x.shape, dims):
        if dim.isdigit() and size != int(dim):
            raise ShapeError(f"{name} must have shape ({', '.join(dims)}), got {tuple(x.shape)}")


def check_same_hw(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.shape[-2:] != b.shape[-2:] or a.shape[0] != b.shape[0]:
        raise ShapeError(f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must share batch and (H, W)")
