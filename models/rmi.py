"""Region Mutual Information loss (Zhao et al., NeurIPS 2019), in plain torch.

Each pixel is represented together with its ``radius x radius`` neighbourhood: a ``d = radius**2``
dimensional vector of one-hot ground truth ``Y`` and one of predicted probabilities ``P`` per
class. RMI maximises a lower bound of the mutual information ``I(Y; P)``, which (up to constants)
means minimising

    0.5 * log det( Sigma_Y - Sigma_YP (Sigma_P + eps I)^-1 Sigma_YP^T + eps I )

the log-volume of the posterior covariance of Y given P. Covariances are estimated over all
(valid) pixel positions of an image, per class. Unlike per-pixel cross-entropy this rewards
predictions whose local structure (edges, thin parts) matches the label's.

Here ``P`` is the softmax probability (the refiner is trained with softmax cross-entropy as well),
ignored pixels are zeroed in both ``Y`` and ``P``, and the loss is divided by ``d`` so its scale does
not depend on the radius.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autolabel.errors import ShapeError
from autolabel.models._checks import check_shape


def rmi_lower_bound(y: torch.Tensor, p: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """``0.5 * log det`` of the posterior covariance of ``y`` given ``p``, divided by ``d``.

    Args:
        y: (B, C, d, N) label vectors, N samples of dimension d.
        p: (B, C, d, N) prediction vectors.

    Returns:
        (B, C) loss per image and class (float64).
    """
    check_shape(y, ["B", "C", "D", "N"], "y")
    if y.shape != p.shape:
        raise ShapeError(f"y {tuple(y.shape)} and p {tuple(p.shape)} must have the same shape")
    y = y.double()
    p = p.double()
    d, n = y.shape[-2:]
    y = y - y.mean(-1, keepdim=True)
    p = p - p.mean(-1, keepdim=True)
    sigma_y = y @ y.transpose(-1, -2) / n
    sigma_p = p @ p.transpose(-1, -2) / n
    sigma_yp = y @ p.transpose(-1, -2) / n
    eye = torch.eye(d, dtype=y.dtype, device=y.device)
    posterior = sigma_y - sigma_yp @ torch.linalg.solve(sigma_p + eps * eye, sigma_yp.transpose(-1, -2))
    # symmetrise against round-off before the Cholesky-based log-determinant
    posterior = 0.5 * (posterior + posterior.transpose(-1, -2)) + eps * eye
    return 0.5 * torch.linalg.cholesky(posterior).diagonal(dim1=-2, dim2=-1).log().sum(-1) * 2 / d


def region_vectors(x: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, radius**2, N): every valid ``radius x radius`` window as a vector."""
    b, c = x.shape[:2]
    cols = F.unfold(x, kernel_size=radius)  # (B, C * r * r, N), channel-major
    return cols.view(b, c, radius * radius, -1)


def rmi_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, radius: int = 3,
             downsample: int = 2, eps: float = 5e-4) -> torch.Tensor:
    """RMI loss of class ``logits`` (B, C, H, W) against integer labels ``target`` (B, H, W).

    Args:
        radius: neighbourhood side (d = radius**2 dimensions).
        downsample: average-pool both maps by this factor first (the paper's memory saving; 1 = off).

    Returns:
        Scalar loss (mean over images and classes).
    """
    check_shape(logits, ["B", "C", "H", "W"], "logits")
    check_shape(target, ["B", "H", "W"], "target")
    if logits.shape[-2:] != target.shape[-2:] or logits.shape[0] != target.shape[0]:
        raise ShapeError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must share B, H, W")
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1).to(logits.dtype)
    onehot = F.one_hot(torch.where(target == ignore_index, 0, target).long(), num_classes)
    y = onehot.permute(0, 3, 1, 2).to(logits.dtype) * valid
    p = logits.float().softmax(1) * valid
    if downsample > 1:
        y = F.avg_pool2d(y, downsample, downsample)
        p = F.avg_pool2d(p, downsample, downsample)
    if min(y.shape[-2:]) < radius:
        raise ShapeError(f"RMI needs maps of at least {radius}x{radius} after downsampling, got {tuple(y.shape[-2:])}")
    return rmi_lower_bound(region_vectors(y, radius), region_vectors(p, radius), eps).mean().float()


class RMILoss(nn.Module):
    """Module form of :func:`rmi_loss`."""

    def __init__(self, ignore_index: int = 255, radius: int = 3, downsample: int = 2, eps: float = 5e-4) -> None:
        super().__init__()
        self.ignore_index, self.radius, self.downsample, self.eps = ignore_index, radius, downsample, eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return rmi_loss(logits, target, self.ignore_index, self.radius, self.downsample, self.eps)
