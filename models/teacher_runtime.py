"""Teachers beyond the built-in checkpoint: ``torch.export`` programs, ONNX models, class mappings.

Every teacher the stages use answers the same calls as :class:`models.teacher.Teacher`:
``classes``, ``ignore_index``, ``predict(frames) -> TeacherOutput``, ``predict_labels``,
``check_classes``, ``feature_kind`` and ``feature_channels``.

* :class:`ExportedTeacher` runs a ``.pt2`` (``torch.export.load``: no pickled Python classes) or
  an ``.onnx`` model (onnxruntime, CPU or CUDA provider) on frames batched as (B, 3, H, W),
  normalised and padded as its sidecar (:mod:`models.teacher_sidecar`) says.
* :class:`MappedTeacher` puts any teacher's probabilities onto the store's classes through a
  :class:`ClassMap`, with one extra *unknown* channel; argmax *unknown* becomes the ignore label,
  so inpainting never copies it.

``feature_kind`` is ``"features"`` when the teacher gives decoder features (the built-in one,
or an export that names a features output) and ``"probabilities"`` otherwise: the refiner then
takes the mapped class probabilities (C + 1 channels, 1/4 resolution) in their place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from autolabel.errors import ClassSetMismatchError, MissingDependencyError, TeacherFormatError
from autolabel.models.checkpoints import why_unreadable
from autolabel.models.teacher import Teacher, TeacherOutput, argmax_labels, to_tensor
from autolabel.models.teacher_sidecar import ClassMap, TeacherSidecar, sidecar_path

FEATURES = "features"
PROBABILITIES = "probabilities"
EXPORT_SUFFIXES = (".pt2", ".onnx")


class SemanticTeacher(Protocol):
    """What the teacher, propagation and refiner stages call on a teacher."""

    classes: list[str]
    ignore_index: int

    @property
    def feature_kind(self) -> str: ...

    @property
    def feature_channels(self) -> int: ...

    def predict(self, frames: np.ndarray | torch.Tensor) -> TeacherOutput: ...

    def predict_features(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor: ...

    def predict_labels(self, frames: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]: ...

    def predict_labels_and_features(self, frames: np.ndarray | torch.Tensor
                                    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]: ...

    def check_classes(self, names: list[str], ignore_index: int, where: str) -> None: ...


class _Pt2Runner:
    """A ``torch.export`` program: outputs as a list, or a dict when the program returns one."""

    def __init__(self, path: Path, device: torch.device) -> None:
        reason = why_unreadable(path, "torch.export.save")
        if reason is not None:  # before torch.export.load, which logs a traceback of its own
            raise TeacherFormatError(f"{path}: cannot load the torch.export program: {reason}; write it again "
                                     "(`autolabel export-teacher`, or torch.export.save)")
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001 - zip, schema and version errors all mean 'unusable'
            raise TeacherFormatError(f"{path}: cannot load the torch.export program ({type(exc).__name__}: "
                                     f"{exc}); write it with torch.export.save") from exc
        self.module = program.module().to(device)
        self.device = device

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor] | dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = self.module(x.to(self.device))
        if isinstance(out, torch.Tensor):
            return [out]
        if isinstance(out, dict):
            return dict(out)
        return list(out)


class _OnnxRunner:
    """An ONNX model under onnxruntime; CUDA provider on a CUDA device, else CPU."""

    def __init__(self, path: Path, device: torch.device) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError(f"{path}: ONNX teachers need onnxruntime; install it with "
                                         "`pip install 'autolabel[onnx]'`") from None
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MissingDependencyError(f"{path}: the device is {device} but onnxruntime has no CUDA provider; "
                                             "install onnxruntime-gpu or label with --device cpu")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise TeacherFormatError(f"{path}: cannot load the ONNX model ({type(exc).__name__}: {exc})") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise TeacherFormatError(f"{path}: the model takes {len(inputs)} inputs; a teacher takes one image "
                                     "batch (B, 3, H, W)")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = device

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        values = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})
        return {name: torch.from_numpy(v).to(self.device) for name, v in zip(self.output_names, values)}


def _select(outputs: list[torch.Tensor] | dict[str, torch.Tensor], key: int | str, path: Path,
            what: str) -> torch.Tensor:
    if isinstance(outputs, dict):
        names = list(outputs)
        if isinstance(key, int):
            if key >= len(names):
                raise TeacherFormatError(f"{path}: outputs.{what} is index {key} but the model has "
                                         f"{len(names)} outputs {names}")
            return outputs[names[key]]
        if key not in outputs:
            raise TeacherFormatError(f"{path}: outputs.{what} names {key!r} but the model's outputs are {names}; "
                                     "fix the sidecar")
        return outputs[key]
    if isinstance(key, str):
        raise TeacherFormatError(f"{path}: outputs.{what} names {key!r} but the model returns {len(outputs)} "
                                 "unnamed outputs; give an index (0, 1, ...) in the sidecar")
    if key >= len(outputs):
        raise TeacherFormatError(f"{path}: outputs.{what} is index {key} but the model returns {len(outputs)} outputs")
    return outputs[key]


class ExportedTeacher:
    """A teacher exported to ``.pt2`` or ``.onnx`` with its sidecar (``model.json``).

    Args:
        path: the model file; the sidecar is ``<path>.json`` (``model.onnx.json``) unless given.
        device: where it runs (onnxruntime: CUDA provider on ``cuda``).
    """

    ignore_index = 255

    def __init__(self, path: Path, device: str | torch.device = "cpu", sidecar: Path | None = None) -> None:
        self.path = Path(path)
        if self.path.suffix not in EXPORT_SUFFIXES:
            raise TeacherFormatError(f"{path}: an exported teacher is a .pt2 (torch.export) or .onnx file")
        if not self.path.is_file():
            raise TeacherFormatError(f"{path}: teacher model not found")
        self.sidecar_file = Path(sidecar) if sidecar is not None else sidecar_path(self.path)
        if not self.sidecar_file.is_file():
            raise TeacherFormatError(f"{path}: its sidecar {self.sidecar_file} is missing; write one (class names, "
                                     "input normalisation, outputs) as the README's 'Bring your own teacher' shows")
        self.sidecar = TeacherSidecar.read(self.sidecar_file)
        self.classes = list(self.sidecar.classes)
        self._device = torch.device(device)
        runner = _Pt2Runner if self.path.suffix == ".pt2" else _OnnxRunner
        self._run = runner(self.path, self._device)
        s = self.sidecar
        self._mean = torch.tensor(s.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(s.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._feature_channels: int | None = None
        if s.features is not None:  # learn F from one small forward pass; checks the outputs early
            probe = np.zeros((1, 2 * max(s.size_multiple, 32), 2 * max(s.size_multiple, 32), 3), np.uint8)
            self._feature_channels = int(self.predict(probe).features.shape[1])  # type: ignore[union-attr]

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> ExportedTeacher:
        if torch.device(device) != self._device:
            return ExportedTeacher(self.path, device, self.sidecar_file)
        return self

    @property
    def feature_kind(self) -> str:
        return FEATURES if self.sidecar.features is not None else PROBABILITIES

    @property
    def feature_channels(self) -> int:
        return self._feature_channels if self._feature_channels is not None else len(self.classes) + 1

    def check_classes(self, names: list[str], ignore_index: int, where: str) -> None:
        if list(names) != self.classes:
            raise ClassSetMismatchError(
                f"teacher {self.path} predicts classes {self.classes} but {where} holds {list(names)}; give a class "
                "mapping (--teacher-map map.json) from the teacher's classes onto the store's")

    def _prepare(self, frames: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, int, int]:
        s = self.sidecar
        x = to_tensor(frames, "cpu").contiguous()  # (B, 3, H, W) RGB in [0, 1]
        if s.channels == "BGR":
            x = x.flip(1)
        x = (x * s.pixel_max - self._mean) / self._std
        h, w = x.shape[-2:]
        m = s.size_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x.contiguous(), h, w

    def predict(self, frames: np.ndarray | torch.Tensor) -> TeacherOutput:
        """Softmax probabilities (B, C_teacher, H, W) and features (B, F, ~H/4, ~W/4) or ``None``."""
        x, h, w = self._prepare(frames)
        outputs = self._run(x)
        logits = _select(outputs, self.sidecar.logits, self.path, "logits").float()
        if logits.dim() != 4 or logits.shape[0] != x.shape[0] or logits.shape[1] != len(self.classes):
            raise TeacherFormatError(f"{self.path}: the logits output has shape {tuple(logits.shape)}; expected "
                                     f"(B={x.shape[0]}, C={len(self.classes)} as the sidecar's classes, h, w)")
        hp, wp = x.shape[-2:]
        if logits.shape[-2:] != (hp, wp):
            logits = F.interpolate(logits, size=(hp, wp), mode="bilinear", align_corners=False)
        probs = logits[..., :h, :w].softmax(1)
        features = None
        if self.sidecar.features is not None:
            feats = _select(outputs, self.sidecar.features, self.path, "features").float()
            if feats.dim() != 4 or feats.shape[0] != x.shape[0]:
                raise TeacherFormatError(f"{self.path}: the features output has shape {tuple(feats.shape)}; "
                                         "expected (B, F, h, w)")
            fh, fw = feats.shape[-2:]
            features = feats[..., :max(1, -(-fh * h // hp)), :max(1, -(-fw * w // wp))]
        return TeacherOutput(probs.to(self._device), features.to(self._device) if features is not None else None)

    def predict_features(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The features output (B, F, ~H/4, ~W/4); the sidecar must name one (else wrap in MappedTeacher)."""
        features = self.predict(frames).features
        if features is None:
            raise TeacherFormatError(f"{self.path}: the sidecar names no features output")
        return features

    def predict_labels(self, frames: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return argmax_labels(self.predict(frames).logits)

    def predict_labels_and_features(self, frames: np.ndarray | torch.Tensor
                                    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
        """Labels and confidence (B, H, W) and the features output (or None) of one run."""
        out = self.predict(frames)
        return (*argmax_labels(out.logits), out.features)


class MappedTeacher:
    """Any teacher seen through a :class:`ClassMap`: the store's classes plus *unknown*.

    ``predict`` returns probabilities (B, C + 1, H, W) (last channel: unknown) and the base's
    features, or, when it has none, those probabilities average-pooled to 1/4 resolution.
    """

    def __init__(self, base: Any, class_map: ClassMap, ignore_index: int = 255) -> None:
        if list(base.classes) != class_map.teacher_classes:
            raise ClassSetMismatchError(f"the class mapping {class_map.source} is for classes "
                                        f"{class_map.teacher_classes}, the teacher has {list(base.classes)}")
        self.base = base
        self.class_map = class_map
        self.classes = list(class_map.store_classes)
        self.ignore_index = ignore_index
        self._matrix = torch.from_numpy(class_map.matrix)

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def feature_kind(self) -> str:
        return FEATURES if getattr(self.base, "feature_kind", FEATURES) == FEATURES else PROBABILITIES

    @property
    def feature_channels(self) -> int:
        return self.base.feature_channels if self.feature_kind == FEATURES else len(self.classes) + 1

    def to(self, device: str | torch.device) -> MappedTeacher:
        return MappedTeacher(self.base.to(device), self.class_map, self.ignore_index)

    def check_classes(self, names: list[str], ignore_index: int, where: str) -> None:
        if list(names) != self.classes:
            raise ClassSetMismatchError(f"the class mapping {self.class_map.source} maps onto {self.classes} but "
                                        f"{where} holds {list(names)}; write a mapping for this store")

    def predict(self, frames: np.ndarray | torch.Tensor) -> TeacherOutput:
        out = self.base.predict(frames)
        probs = torch.einsum("kc,bchw->bkhw", self._matrix.to(out.logits.device), out.logits)
        features = out.features
        if self.feature_kind == PROBABILITIES or features is None:
            features = F.avg_pool2d(probs, 4, ceil_mode=True)
        return TeacherOutput(probs, features)

    def predict_features(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """What the refiner takes: the base's features (B, F, h, w), or the mapped probabilities at
        1/4 resolution (B, C + 1, H/4, W/4) for a base without features."""
        if self.feature_kind == FEATURES and hasattr(self.base, "predict_features"):
            return self.base.predict_features(frames)
        return self.predict(frames).features

    def predict_labels(self, frames: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Argmax over the store's classes and unknown; unknown -> ``ignore_index``. uint8 / float32 (B, H, W)."""
        labels, conf, _ = self.predict_labels_and_features(frames)
        return labels, conf

    def predict_labels_and_features(self, frames: np.ndarray | torch.Tensor
                                    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """:meth:`predict_labels` and what :meth:`predict_features` gives, from one run of the base."""
        out = self.predict(frames)
        return (*argmax_labels(out.logits, len(self.classes), self.ignore_index), out.features)


def open_teacher(path: Path, device: str | torch.device = "cpu", class_map: Path | None = None,
                 store_classes: list[str] | None = None) -> Teacher | MappedTeacher:
    """The teacher at ``path`` (``.pt`` checkpoint, ``.pt2`` or ``.onnx``), mapped when needed.

    A built-in checkpoint without a mapping stays a :class:`Teacher` (trainable: per-sequence
    adaptation works); exports are always wrapped in a :class:`MappedTeacher` (the identity when
    their classes are the store's) so a missing features output turns into probabilities.
    """
    path = Path(path)
    base: Any = ExportedTeacher(path, device) if path.suffix in EXPORT_SUFFIXES else Teacher.load(path, device)
    if class_map is None:
        if isinstance(base, Teacher):
            return base
        if store_classes is not None and list(store_classes) != base.classes:
            base.check_classes(store_classes, 255, "the store")
        return MappedTeacher(base, ClassMap.identity(base.classes))
    if store_classes is None:
        raise ValueError("a class mapping needs the store's classes")
    mapping = ClassMap.read(class_map, list(base.classes), list(store_classes), f"teacher {path}")
    return MappedTeacher(base, mapping, getattr(base, "ignore_index", 255))
