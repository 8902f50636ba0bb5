"""Building blocks shared by the teacher and the refiner: convolution, batch norm, ReLU.

:class:`FoldingSequential` is an ``nn.Sequential`` that, in eval mode, runs each ``Conv2d`` that is
followed by a ``BatchNorm2d`` as one convolution whose weights and bias have the normalisation
folded in: ``conv(x, w * s) + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``. The same
function up to float rounding, with one pass over the activations fewer (on CUDA one kernel fewer
per layer). Folded weights are kept per module and made again whenever a tensor they came from
changed (its version counter: optimiser steps, ``load_state_dict``, test-time adaptation), so they
never go stale. In training mode it is a plain ``nn.Sequential`` (batch statistics, running
averages updated). Its children, and so its ``state_dict`` keys, are those of the ``nn.Sequential``
it replaces: checkpoints are unchanged.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["FoldingSequential", "conv_bn_relu"]


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training
            and bn.running_mean is not None and bn.running_var is not None
            and conv.out_channels == bn.num_features)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded convolution's weight (C_out, C_in / groups, kh, kw) and bias (C_out,)."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    # (C_out, 1, 1, 1) broadcast keeps the weight's memory format (channels_last stays so)
    return conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1))), shift


def _state_key(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple | None:
    """Identifies the tensors a fold was made from: storage, version (bumped by every in-place change:
    optimiser steps, ``load_state_dict``, running statistics), dtype and device of each. None where a
    tensor keeps no version (an inference tensor): such a fold is not kept."""
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if any(t is not None and t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in tensors)


def _tracing() -> bool:
    """True while torch.export, torch.compile, the ONNX exporter or torch.jit traces the module."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


# folded (weight, bias) per FoldingSequential and pair index, beside the module rather than in it, so
# that deepcopy, pickling and state_dict never see them; entries go with their module
_FOLDS: weakref.WeakKeyDictionary[nn.Module, dict[int, tuple]] = weakref.WeakKeyDictionary()


class FoldingSequential(nn.Sequential):
    """``nn.Sequential`` whose Conv2d -> BatchNorm2d pairs run as one folded convolution in eval mode.

    Shapes are those of the wrapped layers, e.g. (B, C_in, H, W) -> (B, C_out, H', W').
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.training:
            return super().forward(x)
        layers = list(self)
        i = 0
        while i < len(layers):
            if i + 1 < len(layers) and _foldable(layers[i], layers[i + 1]):
                x = self._folded(i, layers[i], layers[i + 1], x)  # type: ignore[arg-type]
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x

    def _folded(self, index: int, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        """``bn(conv(x))`` as one convolution. Without autograd (inference) the folded weights are kept
        and reused while the tensors they came from are unchanged: oneDNN prepares a weight it has
        seen before faster than a new one (folding afresh on every call made the teacher slower).
        Under autograd or while being traced (``torch.export``, ONNX) they are folded in the graph."""
        if torch.is_grad_enabled() or _tracing():
            return conv._conv_forward(x, *_fold(conv, bn))
        key = _state_key(conv, bn)
        if key is None:
            return conv._conv_forward(x, *_fold(conv, bn))
        folds = _FOLDS.setdefault(self, {})
        if index not in folds or folds[index][0] != key:
            folds[index] = (key, *_fold(conv, bn))
        _, weight, bias = folds[index]
        return conv._conv_forward(x, weight, bias)


def conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> FoldingSequential:
    """3x3 convolution (no bias), batch norm, ReLU: (B, cin, H, W) -> (B, cout, H / stride, W / stride)."""
    return FoldingSequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )
