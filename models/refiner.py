"""The refinement network Omega: denoises a warp-inpainted label with the images and the teacher.

Input (all at the target frame's resolution H x W):

* the warp-inpainted label as one-hot (C channels) and its confidence (1),
* the trust mask of the warp (1): photometric / flow checks passed,
* the previous frame warped onto the target (3) and the target frame (3), RGB in [0, 1],
* the teacher's decoder features of the target frame (F channels at H/4 x W/4), concatenated into
  the decoder at 1/4 resolution.

Output: refined class logits (B, C, H, W). A pix2pix-style U-Net (encoder 1/2 .. 1/8, decoder with
skips back to 1/2, logits upsampled) plus a learnt residual on the input one-hot label, so an
untrained net starts close to "keep the label" and learns corrections.

Architectures are registered by name (``REFINER_ARCHS``); :class:`Refiner` bundles a net with its
class set and the sha256 of the teacher whose features it was trained on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autolabel.errors import CheckpointError, ClassSetMismatchError
from autolabel.registry import Registry
from autolabel.models._checks import check_same_hw, check_shape
from autolabel.models.checkpoints import load_checkpoint, load_weights, portable_state_dict, save_checkpoint
from autolabel.models.layers import FoldingSequential, conv_bn_relu
from autolabel.models.teacher import MEAN, STD

CHECKPOINT_FORMAT = "autolabel.refiner"
CHECKPOINT_VERSION = 1

TEACHER_INPUTS = ("features", "probabilities")

REFINER_ARCHS: Registry[type[nn.Module]] = Registry("refiner architecture")


@dataclass
class RefinerInput:
    """One batch of refiner inputs.

    labels: int64 (B, H, W) warp-inpainted labels (ignore index allowed: all-zero one-hot);
    confidence: float (B, H, W) in [0, 1]; trusted: bool (B, H, W);
    warped_image, target_image: float (B, 3, H, W) RGB in [0, 1];
    features: float (B, F, h, w) teacher decoder features, or for a teacher without them its mapped
        class probabilities (B, C + 1, h, w) (any h, w; resized to H/4 x W/4).
    """

    labels: torch.Tensor
    confidence: torch.Tensor
    trusted: torch.Tensor
    warped_image: torch.Tensor
    target_image: torch.Tensor
    features: torch.Tensor


class RefinerUNet(nn.Module):
    """Encoder 1/2, 1/4, 1/8; decoder to 1/4 (teacher features joined here) and 1/2; residual on labels.

    Args:
        num_classes: C.
        feature_channels: F of the teacher's decoder features.
        widths: channels at 1/2, 1/4, 1/8.
        feature_proj: channels the teacher features are projected to before joining the decoder.
    """

    def __init__(self, num_classes: int, feature_channels: int, widths: tuple[int, int, int] = (24, 48, 64),
                 feature_proj: int = 32, full_res_channels: int = 0) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.num_classes = num_classes
        self.feature_channels = feature_channels
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        cin = num_classes + 2 + 6
        self.enc1 = nn.Sequential(conv_bn_relu(cin, w1, 2), conv_bn_relu(w1, w1))
        self.enc2 = nn.Sequential(conv_bn_relu(w1, w2, 2), conv_bn_relu(w2, w2))
        self.enc3 = nn.Sequential(conv_bn_relu(w2, w3, 2), conv_bn_relu(w3, w3, dilation=2))
        self.proj = FoldingSequential(nn.Conv2d(feature_channels, feature_proj, 1, bias=False),
                                      nn.BatchNorm2d(feature_proj), nn.ReLU(inplace=True))
        self.fuse2 = FoldingSequential(nn.Conv2d(w3 + w2 + feature_proj, w2, 1, bias=False),
                                       nn.BatchNorm2d(w2), nn.ReLU(inplace=True), conv_bn_relu(w2, w2))
        self.fuse1 = FoldingSequential(nn.Conv2d(w2 + w1, w1, 1, bias=False), nn.BatchNorm2d(w1),
                                       nn.ReLU(inplace=True), conv_bn_relu(w1, w1))
        self.head = nn.Conv2d(w1, num_classes, 1)
        # optional full-resolution head: the 1/2-res decoder joined with the full-res label and image
        self.full_res = None
        if full_res_channels > 0:
            self.full_res = nn.Sequential(
                conv_bn_relu(w1 + num_classes + 3 + 2, full_res_channels),
                nn.Conv2d(full_res_channels, num_classes, 1))
        # how strongly the input label votes for itself; learnt
        self.label_gain = nn.Parameter(torch.tensor(4.0))

    def _input(self, x: RefinerInput, dtype: torch.dtype) -> torch.Tensor:
        """The network's input (B, C + 8, H, W), laid out channels_last as the convolutions want it:
        one-hot label (C; all zero where ignored), confidence, trust, both images normalised."""
        b, h, w = x.labels.shape
        c = self.num_classes
        nhwc = torch.zeros((b, h, w, c + 8), dtype=dtype, device=x.labels.device)
        valid = x.labels < c
        nhwc[..., :c].scatter_(-1, torch.where(valid, x.labels, 0)[..., None], valid[..., None].to(dtype))
        nhwc[..., c] = x.confidence
        nhwc[..., c + 1] = x.trusted
        inp = nhwc.permute(0, 3, 1, 2)  # a (B, C + 8, H, W) view, channels_last in memory
        inp[:, c + 2:c + 5] = (x.warped_image - self.mean) / self.std
        inp[:, c + 5:] = (x.target_image - self.mean) / self.std
        return inp

    def forward(self, x: RefinerInput) -> torch.Tensor:
        """Returns refined logits (B, C, H, W)."""
        check_shape(x.labels, ["B", "H", "W"], "labels")
        check_shape(x.target_image, ["B", "3", "H", "W"], "target_image")
        check_shape(x.warped_image, ["B", "3", "H", "W"], "warped_image")
        check_shape(x.features, ["B", str(self.feature_channels), "h", "w"], "features")
        check_same_hw(x.target_image, x.warped_image, ("target_image", "warped_image"))
        check_same_hw(x.target_image, x.labels[:, None], ("target_image", "labels"))
        h, w = x.labels.shape[-2:]
        dtype = x.target_image.dtype
        inp = self._input(x, dtype)
        onehot = inp[:, :self.num_classes]
        s1 = self.enc1(inp)
        s2 = self.enc2(s1)
        s3 = self.enc3(s2)
        feats = F.interpolate(x.features.to(dtype), size=s2.shape[-2:], mode="bilinear", align_corners=False)
        up3 = F.interpolate(s3, size=s2.shape[-2:], mode="bilinear", align_corners=False)
        d2 = self.fuse2(torch.cat([up3, s2, self.proj(feats)], dim=1))
        up2 = F.interpolate(d2, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        d1 = self.fuse1(torch.cat([up2, s1], dim=1))
        logits = F.interpolate(self.head(d1), size=(h, w), mode="bilinear", align_corners=False)
        if self.full_res is not None:
            up1 = F.interpolate(d1, size=(h, w), mode="bilinear", align_corners=False)
            detail = torch.cat([up1, onehot, inp[:, self.num_classes:self.num_classes + 2], inp[:, -3:]], dim=1)
            logits = logits + self.full_res(detail)
        return logits + self.label_gain * onehot


@REFINER_ARCHS.register("refine-unet")
class RefinerDefault(RefinerUNet):
    """About 0.2 M parameters; ~1.3 GMAC at 480x360."""


@REFINER_ARCHS.register("refine-unet-fr")
class RefinerFullRes(RefinerUNet):
    """refine-unet plus a full-resolution head (thin structures); ~2.3 GMAC at 480x360."""

    def __init__(self, num_classes: int, feature_channels: int) -> None:
        super().__init__(num_classes, feature_channels, full_res_channels=16)


@REFINER_ARCHS.register("refine-tiny")
class RefinerTiny(RefinerUNet):
    """A test-size refiner."""

    def __init__(self, num_classes: int, feature_channels: int) -> None:
        super().__init__(num_classes, feature_channels, widths=(4, 8, 8), feature_proj=4)


class Refiner:
    """A trained refiner: network + class names + the teacher it was trained with + how it was made."""

    def __init__(self, net: RefinerUNet, arch: str, classes: list[str], ignore_index: int,
                 teacher_sha256: str, train_info: dict[str, Any] | None = None,
                 teacher_input: str = "features") -> None:
        self.net = net
        self.arch = arch
        self.classes = classes
        self.ignore_index = ignore_index
        self.teacher_sha256 = teacher_sha256
        self.train_info = train_info or {}
        self.teacher_input = teacher_input

    @classmethod
    def create(cls, arch: str, classes: list[str], feature_channels: int, teacher_sha256: str,
               ignore_index: int = 255, teacher_input: str = "features") -> Refiner:
        """``teacher_input``: ``"features"`` (decoder features) or ``"probabilities"`` (mapped class
        probabilities with the unknown channel, for teachers without features)."""
        if teacher_input not in TEACHER_INPUTS:
            raise CheckpointError(f"teacher_input must be one of {TEACHER_INPUTS}, not {teacher_input!r}")
        net = REFINER_ARCHS.get(arch)(num_classes=len(classes), feature_channels=feature_channels)
        return cls(net, arch, list(classes), ignore_index, teacher_sha256, teacher_input=teacher_input)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> Refiner:
        """Move to ``device``; the weights go channels_last on every device (oneDNN's convolutions run
        ~25 % faster so on a CPU; on CUDA with bf16 autocast in :meth:`refine`)."""
        self.net.to(device).to(memory_format=torch.channels_last)
        return self

    def copy(self) -> Refiner:
        return Refiner(copy.deepcopy(self.net), self.arch, list(self.classes), self.ignore_index,
                       self.teacher_sha256, dict(self.train_info), self.teacher_input)

    def check_compatible(self, classes: list[str], teacher_sha256: str, where: str,
                         teacher_input: str = "features") -> None:
        """Raise unless this refiner predicts ``classes`` and was trained on this teacher's output
        of kind ``teacher_input`` (decoder features or class probabilities)."""
        if list(classes) != self.classes:
            raise ClassSetMismatchError(
                f"refiner predicts classes {self.classes} but {where} holds {list(classes)}; train a refiner "
                "on stores with this class set (`autolabel train-refiner --store ...`)")
        if teacher_input != self.teacher_input:
            raise CheckpointError(
                f"the refiner learnt on the teacher's {self.teacher_input} but the teacher given offers "
                f"{teacher_input} (a teacher {'with' if teacher_input == 'features' else 'without'} a features "
                "output); retrain the refiner with this teacher (`autolabel train-refiner --teacher ...`)")
        if teacher_sha256 != self.teacher_sha256:
            raise CheckpointError(
                f"the refiner was trained with the features of teacher sha256 {self.teacher_sha256[:12]}..., but the "
                f"teacher given is {teacher_sha256[:12]}...; pass that teacher or retrain the refiner with "
                "`autolabel train-refiner --teacher ...`")

    def refine(self, x: RefinerInput) -> torch.Tensor:
        """Refined class probabilities (B, C, H, W) (inference; bf16 autocast on CUDA)."""
        self.net.eval()
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.device.type == "cuda"):
            logits = self.net(x)
        return logits.float().softmax(1)

    def state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "arch": self.arch,
            "classes": self.classes, "ignore_index": self.ignore_index,
            "feature_channels": self.net.feature_channels, "teacher_sha256": self.teacher_sha256,
            "teacher_input": self.teacher_input,
            "train": self.train_info,
            "state_dict": portable_state_dict(self.net),
        }

    def save(self, path: Path) -> str:
        """Write the checkpoint atomically; returns its sha256."""
        return save_checkpoint(self.state(), path)

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu") -> Refiner:
        """Load a checkpoint written by :meth:`save` (``weights_only=True``: no code runs)."""
        state = load_checkpoint(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "refiner", "autolabel train-refiner")
        refiner = cls.create(state["arch"], state["classes"], state["feature_channels"], state["teacher_sha256"],
                             state["ignore_index"], state.get("teacher_input", "features"))
        load_weights(refiner.net, state["state_dict"], path, state["arch"])
        refiner.train_info = state.get("train", {})
        return refiner.to(device)
