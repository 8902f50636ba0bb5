"""Export a PyTorch segmentation model as a teacher: ``.pt2`` (torch.export) or ``.onnx``, plus sidecar.

:func:`export_module` works for any ``nn.Module`` that maps a normalised image batch (B, 3, H, W)
to logits (B, C, h, w), or to ``(logits, features)``; batch, height and width stay dynamic.
:func:`export_builtin_teacher` exports an autolabel teacher checkpoint the same way (its input
normalisation moves into the sidecar), which is how the tests check that every format gives the
same labels.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from autolabel.atomic import atomic_path, write_serialised
from autolabel.errors import MissingDependencyError, TeacherFormatError
from autolabel.models.teacher import MEAN, STD, Teacher
from autolabel.models.teacher_sidecar import TeacherSidecar, sidecar_path

OUTPUT_NAMES = ("logits", "features")


def export_module(module: nn.Module, out: Path, sidecar: TeacherSidecar,
                  example: torch.Tensor | None = None) -> tuple[Path, Path]:
    """Write ``module`` to ``out`` (format from its suffix) and the sidecar beside it.

    Args:
        module: maps x (B, 3, H, W), normalised as ``sidecar`` says, to logits or (logits, features).
        out: ``something.pt2`` or ``something.onnx``.
        sidecar: class names and input convention; its ``outputs`` are set here (pt2: indices 0, 1;
            onnx: names "logits", "features") from what the module returns.
        example: an input to trace with; default (2, 3, 128, 160) random.

    Returns:
        (model path, sidecar path).
    """
    out = Path(out)
    if out.suffix not in (".pt2", ".onnx"):
        raise TeacherFormatError(f"{out}: export to a .pt2 or .onnx file")
    # torch.export.save cannot serialise channels_last weights: export a contiguous copy
    module = copy.deepcopy(module).to(memory_format=torch.contiguous_format).eval()
    x = example if example is not None else torch.rand(2, 3, 128, 160)
    with torch.no_grad():
        result = module(x)
    has_features = isinstance(result, (tuple, list)) and len(result) > 1
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    with warnings.catch_warnings(), atomic_path(out) as tmp:  # a failed or killed export leaves no model file
        # torch's and onnxscript's own deprecations inside the exporters: nothing a caller can act on
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        logits_key, features_key = _export(module, x, tmp, has_features, dims)
    final = dataclasses.replace(sidecar, logits=logits_key, features=features_key)
    final.write(sidecar_path(out))
    return out, sidecar_path(out)


def _export(module: nn.Module, x: torch.Tensor, out: Path, has_features: bool,
            dims: dict[int, object]) -> tuple[int | str, int | str | None]:
    """Write the model file; returns the sidecar's (logits, features) output keys."""
    if out.suffix == ".pt2":
        program = torch.export.export(module, (x,), dynamic_shapes=(dims,))
        write_serialised(out, lambda fh: torch.export.save(program, fh))
        return 0, (1 if has_features else None)
    try:
        import onnxscript  # noqa: F401 - the dynamo ONNX exporter needs it
    except ImportError:
        raise MissingDependencyError("exporting to ONNX needs onnx and onnxscript; install them with "
                                     "`pip install 'autolabel[onnx]'`") from None
    names = list(OUTPUT_NAMES[:2 if has_features else 1])
    # the exporter warns that torchvision's ops cannot be registered: autolabel uses none of them
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        torch.onnx.export(module, (x,), str(out), input_names=["images"], output_names=names,
                          dynamic_shapes=(dims,), dynamo=True, verbose=False, external_data=False)
    finally:
        registration.setLevel(level)
    return "logits", ("features" if has_features else None)


class _NormalisedTeacher(nn.Module):
    """The built-in network on normalised input, returning logits (and features)."""

    def __init__(self, net: nn.Module, with_features: bool) -> None:
        super().__init__()
        self.net = net
        self.with_features = with_features

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.net.forward_normalised(x)
        return (out.logits, out.features) if self.with_features else out.logits


def export_builtin_teacher(teacher: Teacher, out: Path, with_features: bool = True) -> tuple[Path, Path]:
    """Export an autolabel teacher; ``with_features=False`` leaves out the decoder features
    (the refiner then learns on probabilities, as with most third-party models)."""
    sidecar = TeacherSidecar(classes=list(teacher.classes), channels="RGB", pixel_max=1.0, mean=MEAN, std=STD)
    net = _NormalisedTeacher(teacher.copy().to("cpu").net, with_features)
    return export_module(net, out, sidecar)
