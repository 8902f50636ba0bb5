"""Training the refiner Omega on forward-backward cycle samples (paper 3.4): CE + RMI loss.

Samples are :class:`models.cycle.CycleSample` (cycled label, its confidence and trust mask, the
warped and the target image, and the annotation to recover). Each batch is augmented (scale, crop,
flip, identically for every map), the frozen teacher computes the decoder features of the target
crop, and Omega learns to map the cycled label back to the annotation. bf16 autocast on CUDA.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from autolabel.errors import ConfigError
from autolabel.models.cycle import CycleSample
from autolabel.models.metrics import confusion_matrix, mean_iou
from autolabel.models.optimisation import apply_step, poly_adamw
from autolabel.models.refiner import REFINER_ARCHS, Refiner, RefinerInput
from autolabel.models.rmi import rmi_loss
from autolabel.models.teacher import to_tensor
from autolabel.models.teacher_runtime import SemanticTeacher
from autolabel.models.training_state import EpochSampler, TrainingLoop, TrainingState

ProgressFn = Callable[[int, int, float], None]


class RefinerTrainConfig(BaseModel):
    """How to train a refiner."""

    model_config = ConfigDict(frozen=True)

    arch: Annotated[str, AfterValidator(REFINER_ARCHS.check)] = Field(
        "refine-unet-fr", description="refine-unet-fr (full-resolution head), refine-unet, or refine-tiny for tests")
    max_cycle: int = Field(6, ge=1, description="cycles of every length 1..max_cycle")
    steps: int = Field(1500, ge=1, description="training steps")
    batch_size: int = Field(8, ge=1, description="cycle samples per step")
    crop: int = Field(256, ge=32, description="square training crop (pixels)")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (AdamW, poly schedule)")
    weight_decay: float = Field(1e-4, ge=0)
    scale: tuple[float, float] = (0.75, 1.5)
    flip: bool = True
    rmi_weight: float = Field(0.5, ge=0, description="loss = CE + rmi_weight * RMI")
    rmi_radius: int = Field(3, ge=1)
    seed: int = Field(0, description="random seed")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    state_every_s: float = Field(60.0, ge=0, description="seconds between saves of the training's progress "
                                 "(OUT.train-state), which the same command goes on from after a kill")


MAPS = ("labels", "confidence", "trusted", "warped_image", "target_image", "annotation")
_NEAREST = {"labels", "trusted", "annotation"}


def augment_cycle(sample: CycleSample, cfg: RefinerTrainConfig, rng: np.random.Generator,
                  ignore_index: int) -> dict[str, np.ndarray]:
    """One random scale / crop / flip applied to every map of ``sample``.

    Returns:
        dict of the :data:`MAPS` names to (crop, crop[, 3]) uint8 arrays (``trusted`` as uint8 0/1);
        padding, where the scaled frame is smaller than the crop, is ignore in the annotation.
    """
    s = float(rng.uniform(*cfg.scale))
    h, w = sample.annotation.shape
    nh, nw = max(int(round(h * s)), 1), max(int(round(w * s)), 1)
    c = cfg.crop
    y = int(rng.integers(0, max(nh - c, 0) + 1))
    x = int(rng.integers(0, max(nw - c, 0) + 1))
    flip = cfg.flip and rng.random() < 0.5
    out: dict[str, np.ndarray] = {}
    for name in MAPS:
        arr = getattr(sample, name)
        arr = arr.astype(np.uint8) if arr.dtype == bool else arr
        interp = cv2.INTER_NEAREST if name in _NEAREST else cv2.INTER_LINEAR
        arr = cv2.resize(arr, (nw, nh), interpolation=interp)
        pad_value = ignore_index if name == "annotation" else 0
        if nh < c or nw < c:
            arr = cv2.copyMakeBorder(arr, 0, max(c - nh, 0), 0, max(c - nw, 0), cv2.BORDER_CONSTANT, value=pad_value)
        arr = arr[y:y + c, x:x + c]
        out[name] = np.ascontiguousarray(arr[:, ::-1] if flip else arr)
    return out


def batch_input(maps: dict[str, np.ndarray], features: torch.Tensor, device: torch.device) -> RefinerInput:
    """A :class:`RefinerInput` from stacked augmented maps (B, ...) and teacher features (B, F, h, w)."""
    t = lambda name: torch.from_numpy(maps[name]).to(device)  # noqa: E731
    return RefinerInput(
        labels=t("labels").long(), confidence=t("confidence").float() / 255.0, trusted=t("trusted").bool(),
        warped_image=to_tensor(maps["warped_image"], device), target_image=to_tensor(maps["target_image"], device),
        features=features,
    )


def sample_input(sample: CycleSample, teacher: SemanticTeacher, device: torch.device) -> RefinerInput:
    """A full-frame batch of one (inference on a training sample)."""
    maps = {name: getattr(sample, name)[None] for name in MAPS}
    maps["trusted"] = maps["trusted"].astype(np.uint8)
    features = teacher.predict_features(maps["target_image"]).clone()
    return batch_input(maps, features, device)


def refiner_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, cfg: RefinerTrainConfig) -> torch.Tensor:
    """CE + ``rmi_weight`` * RMI of logits (B, C, H, W) against target (B, H, W)."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    if cfg.rmi_weight > 0:
        loss = loss + cfg.rmi_weight * rmi_loss(logits, target, ignore_index, radius=cfg.rmi_radius)
    return loss


def train_refiner(refiner: Refiner, teacher: SemanticTeacher, samples: Sequence[CycleSample], cfg: RefinerTrainConfig,
                  progress: ProgressFn | None = None, state: TrainingState | None = None) -> dict[str, Any]:
    """Train ``refiner.net`` in place on cycle ``samples``; returns a summary.

    The teacher is frozen and only provides the target's decoder features. AdamW, poly(0.9)
    learning rate, bf16 autocast on CUDA. With ``state``, progress is saved there now and then and a
    run finding one goes on from its step (``resumed_from_step``); the caller removes it once the
    checkpoint is written.
    """
    if len(samples) == 0:
        raise ConfigError("no cycle samples to train the refiner on: the stores need annotated frames with "
                          "neighbouring frames (sequences of at least two frames)")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device(cfg.device)
    teacher = teacher.to(device)
    net = refiner.net.to(device).to(memory_format=torch.channels_last)
    optimizer, schedule = poly_adamw(net.parameters(), cfg.lr, cfg.weight_decay, cfg.steps)
    use_bf16 = device.type == "cuda"
    ignore = refiner.ignore_index
    loop = TrainingLoop(net, optimizer, schedule, EpochSampler(len(samples), cfg.batch_size, rng), cfg.steps, state)
    start = time.perf_counter()
    while loop.running():
        items = [augment_cycle(samples[int(i)], cfg, rng, ignore) for i in loop.sampler.next_batch()]
        maps = {name: np.stack([it[name] for it in items]) for name in MAPS}
        features = teacher.predict_features(maps["target_image"]).clone()  # out of inference mode
        x = batch_input(maps, features, device)
        target = torch.from_numpy(maps["annotation"]).to(device).long()
        net.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = net(x)
        loss = refiner_loss(logits, target, ignore, cfg)
        loop.record(apply_step(loss, optimizer, schedule), progress)
    net.eval()
    here = time.perf_counter() - start  # this run's steps only: a stopped run's are in the state
    return {**loop.summary(20), "samples": len(samples),
            "samples_per_second": round((loop.step - loop.resumed_from) * cfg.batch_size / max(here, 1e-9), 2),
            "config": cfg.model_dump(mode="json")}


def score_on_samples(refiner: Refiner, teacher: SemanticTeacher, samples: Sequence[CycleSample]) -> dict[str, float]:
    """mIoU of the cycled labels and of their refinement against the annotations (a training-fit check)."""
    c = len(refiner.classes)
    before = np.zeros((c, c + 1), np.int64)
    after = np.zeros((c, c + 1), np.int64)
    for s in samples:
        probs = refiner.refine(sample_input(s, teacher, refiner.device))
        refined = probs.argmax(1)[0].to(torch.uint8).cpu().numpy()
        before += confusion_matrix(s.annotation, s.labels, c, refiner.ignore_index)
        after += confusion_matrix(s.annotation, refined, c, refiner.ignore_index)
    return {"cycled_miou": round(mean_iou(before), 2), "refined_miou": round(mean_iou(after), 2)}

