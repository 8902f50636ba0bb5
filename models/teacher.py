"""The semantic teacher g_psi: a compact encoder-decoder segmentation network in plain torch.

Architectures are registered by name (``TEACHER_ARCHS``): ``unet-lite`` for real use and
``unet-tiny`` for tests. A :class:`Teacher` bundles the network with its class set and loads
from / saves to a checkpoint that ``torch.load(weights_only=True)`` reads.

The network returns class logits at full resolution and its last decoder features (1/4
resolution), which the refiner (warp-refine) concatenates into its own decoder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autolabel.errors import ClassSetMismatchError
from autolabel.registry import Registry
from autolabel.models._checks import check_shape
from autolabel.models.layers import conv_bn_relu
from autolabel.models.checkpoints import (
    file_sha256,
    load_checkpoint,
    load_weights,
    portable_state_dict,
    save_checkpoint,
)

__all__ = ["TEACHER_ARCHS", "Teacher", "TeacherOutput", "argmax_labels", "file_sha256", "to_tensor"]

CHECKPOINT_FORMAT = "autolabel.teacher"
CHECKPOINT_VERSION = 1
# ImageNet statistics: a common, fixed input normalisation
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

TEACHER_ARCHS: Registry[type[nn.Module]] = Registry("teacher architecture")


@dataclass
class TeacherOutput:
    """logits (B, C, H, W) at input resolution; features (B, F, H/4, W/4) from the decoder."""

    logits: torch.Tensor
    features: torch.Tensor


class UNetLite(nn.Module):
    """Encoder (1/2 .. 1/32) with a global-context branch, U-Net decoder back to 1/4.

    Args:
        num_classes: output classes C.
        widths: channels at 1/2, 1/4, 1/8, 1/16, 1/32.
        feature_channels: F, channels of the 1/4-resolution decoder features.
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (24, 32, 64, 96, 128),
                 feature_channels: int = 64) -> None:
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.num_classes = num_classes
        self.feature_channels = feature_channels
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.stem = conv_bn_relu(3, w0, stride=2)
        self.enc1 = nn.Sequential(conv_bn_relu(w0, w1, 2), conv_bn_relu(w1, w1))
        self.enc2 = nn.Sequential(conv_bn_relu(w1, w2, 2), conv_bn_relu(w2, w2))
        self.enc3 = nn.Sequential(conv_bn_relu(w2, w3, 2), conv_bn_relu(w3, w3))
        self.enc4 = nn.Sequential(conv_bn_relu(w3, w4, 2), conv_bn_relu(w4, w4, dilation=2))
        self.context = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(w4, w4, 1), nn.ReLU(inplace=True))
        self.dec3 = conv_bn_relu(w4 + w3, w3)
        self.dec2 = conv_bn_relu(w3 + w2, w2)
        self.dec1 = nn.Sequential(conv_bn_relu(w2 + w1, feature_channels), conv_bn_relu(feature_channels, feature_channels))
        self.head = nn.Conv2d(feature_channels, num_classes, 1)

    @staticmethod
    def _up_cat(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([x, skip], dim=1)

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """Args: images (B, 3, H, W) RGB in [0, 1]. Returns :class:`TeacherOutput`."""
        check_shape(images, ["B", "3", "H", "W"], "images")
        return self.forward_normalised((images - self.mean) / self.std)

    def forward_normalised(self, x: torch.Tensor) -> TeacherOutput:
        """Args: x (B, 3, H, W) already normalised with ``MEAN`` / ``STD`` (what exports take)."""
        h, w = x.shape[-2:]
        features = self.features_normalised(x)
        logits = F.interpolate(self.head(features), size=(h, w), mode="bilinear", align_corners=False)
        return TeacherOutput(logits, features)

    def features_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder features (B, F, H/4, W/4) of normalised ``x`` (B, 3, H, W), without the class head."""
        s1 = self.stem(x)
        s2 = self.enc1(s1)
        s3 = self.enc2(s2)
        s4 = self.enc3(s3)
        s5 = self.enc4(s4)
        s5 = s5 + self.context(s5)
        d = self.dec3(self._up_cat(s5, s4))
        d = self.dec2(self._up_cat(d, s3))
        return self.dec1(self._up_cat(d, s2))


@TEACHER_ARCHS.register("unet-lite")
class UNetLiteDefault(UNetLite):
    """About 1 M parameters; ~0.7 GMAC at 480x360."""


@TEACHER_ARCHS.register("unet-tiny")
class UNetTiny(UNetLite):
    """A test-size model: real forward passes in milliseconds."""

    def __init__(self, num_classes: int, feature_channels: int = 8) -> None:
        super().__init__(num_classes, widths=(4, 8, 8, 8, 8), feature_channels=feature_channels)


def argmax_labels(probs: torch.Tensor, unknown: int | None = None, ignore_index: int = 255
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (B, C, H, W) -> argmax labels uint8 (B, H, W) and their probability
    float32 (B, H, W); channel ``unknown`` (where given) becomes ``ignore_index``."""
    conf, labels = probs.max(1)
    if unknown is not None:
        labels = torch.where(labels == unknown, torch.full_like(labels, ignore_index), labels)
    return labels.to(torch.uint8).cpu().numpy(), conf.cpu().numpy()


def to_tensor(frames: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 frames (B, H, W, 3) or (H, W, 3) -> float (B, 3, H, W) in [0, 1] on ``device``."""
    t = torch.as_tensor(frames)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    check_shape(t, ["B", "H", "W", "3"], "frames")
    return t.to(device).permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)


class Teacher:
    """A trained teacher: network + class names (+ palette and ignore index) + how it was made."""

    def __init__(self, net: nn.Module, arch: str, arch_kwargs: dict[str, Any], classes: list[str],
                 palette: list[list[int]], ignore_index: int, train_info: dict[str, Any] | None = None) -> None:
        self.net = net
        self.arch = arch
        self.arch_kwargs = arch_kwargs
        self.classes = classes
        self.palette = palette
        self.ignore_index = ignore_index
        self.train_info = train_info or {}

    @classmethod
    def create(cls, arch: str, classes: list[str], palette: list[list[int]], ignore_index: int = 255,
               **arch_kwargs: Any) -> Teacher:
        net = TEACHER_ARCHS.get(arch)(num_classes=len(classes), **arch_kwargs)
        return cls(net, arch, arch_kwargs, list(classes), [list(c) for c in palette], ignore_index)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def feature_kind(self) -> str:
        """What the refiner takes from this teacher: its decoder ``"features"``."""
        return "features"

    @property
    def feature_channels(self) -> int:
        return int(self.net.feature_channels)

    def to(self, device: str | torch.device) -> Teacher:
        """Move to ``device``; the weights go channels_last, like the frames :func:`to_tensor` makes
        (faster convolutions on CPU as on CUDA, identical results)."""
        self.net.to(device).to(memory_format=torch.channels_last)
        return self

    def copy(self) -> Teacher:
        return Teacher(copy.deepcopy(self.net), self.arch, dict(self.arch_kwargs), list(self.classes),
                       [list(c) for c in self.palette], self.ignore_index, dict(self.train_info))

    def check_classes(self, names: list[str], ignore_index: int, where: str) -> None:
        """Raise ClassSetMismatchError unless the teacher predicts exactly ``names``."""
        if list(names) != self.classes or ignore_index != self.ignore_index:
            raise ClassSetMismatchError(
                f"teacher predicts classes {self.classes} but {where} holds {list(names)}; train a teacher "
                "on stores with this class set (`autolabel train-teacher --store ...`) or map its classes onto "
                "the store's (--teacher-map map.json)"
            )

    @torch.inference_mode()
    def predict(self, frames: np.ndarray | torch.Tensor) -> TeacherOutput:
        """Class probabilities and decoder features of uint8 frames (B, H, W, 3).

        Returns:
            TeacherOutput with ``logits`` replaced by softmax probabilities (B, C, H, W).
        """
        self.net.eval()
        x = to_tensor(frames, self.device)
        use_bf16 = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = self.net(x)
        return TeacherOutput(out.logits.float().softmax(1), out.features.float())

    @torch.inference_mode()
    def predict_features(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The decoder features float (B, F, H/4, W/4) of uint8 frames (B, H, W, 3), as :meth:`predict`
        gives them, without the class head, its upsampling and the softmax (what the refiner needs)."""
        self.net.eval()
        x = to_tensor(frames, self.device)
        use_bf16 = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            features = self.net.features_normalised((x - self.net.mean) / self.net.std)
        return features.float()

    def predict_labels(self, frames: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Argmax labels uint8 (B, H, W) and their probability float32 (B, H, W)."""
        labels, conf, _ = self.predict_labels_and_features(frames)
        return labels, conf

    def predict_labels_and_features(self, frames: np.ndarray | torch.Tensor
                                    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
        """:meth:`predict_labels` and the features :meth:`predict_features` gives (B, F, H/4, W/4),
        from one forward pass (the teacher stage keeps them for warp-refine's refiner)."""
        out = self.predict(frames)
        labels, conf = argmax_labels(out.logits)
        return labels, conf, out.features

    # --- checkpoints ---

    def state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "arch": self.arch,
            "arch_kwargs": self.arch_kwargs, "classes": self.classes, "palette": self.palette,
            "ignore_index": self.ignore_index, "train": self.train_info,
            "state_dict": portable_state_dict(self.net),
        }

    def save(self, path: Path) -> str:
        """Write the checkpoint atomically; returns its sha256."""
        return save_checkpoint(self.state(), path)

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu") -> Teacher:
        """Load a checkpoint written by :meth:`save` (``weights_only=True``: no code runs)."""
        state = load_checkpoint(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "teacher", "autolabel train-teacher")
        teacher = cls.create(state["arch"], state["classes"], state["palette"], state["ignore_index"],
                             **state["arch_kwargs"])
        load_weights(teacher.net, state["state_dict"], path, state["arch"])
        teacher.train_info = state.get("train", {})
        return teacher.to(device)
