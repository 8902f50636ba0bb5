"""Training the teacher on annotated frames: augmentation, class-balanced loss, poly schedule.

Samples come from any indexable collection of ``(rgb uint8 (H, W, 3), label uint8 (H, W))``
pairs (``storage.training_data.AnnotatedFrames`` reads them from stores); nothing here knows about
stores. bf16 autocast is used on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from autolabel.errors import ConfigError
from autolabel.models.optimisation import apply_step, poly_adamw
from autolabel.models.teacher import TEACHER_ARCHS, Teacher, to_tensor
from autolabel.models.training_state import EpochSampler, TrainingLoop, TrainingState

Sample = tuple[np.ndarray, np.ndarray]
ProgressFn = Callable[[int, int, float], None]


class TeacherTrainConfig(BaseModel):
    """How to train (or adapt) a teacher."""

    model_config = ConfigDict(frozen=True)

    arch: Annotated[str, AfterValidator(TEACHER_ARCHS.check)] = Field(
        "unet-lite", description="teacher architecture (unet-lite; unet-tiny for tests)")
    epochs: int = Field(40, ge=1, description="passes over the annotated frames")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (tests, adaptation)")
    batch_size: int = Field(8, ge=1, description="frames per step")
    crop: int = Field(256, ge=64, description="square training crop (pixels); >= 64 keeps 2x2 at 1/32 scale")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (AdamW, poly schedule)")
    weight_decay: float = Field(1e-4, ge=0)
    scale: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    blur_prob: float = Field(0.3, ge=0, le=1)
    jitter: float = Field(0.3, ge=0, lt=1, description="brightness / contrast / saturation range")
    class_balance: bool = True
    seed: int = Field(0, description="random seed")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    state_every_s: float = Field(60.0, ge=0, description="seconds between saves of the training's progress "
                                 "(OUT.train-state), which the same command goes on from after a kill")


def augment(image: np.ndarray, label: np.ndarray, cfg: TeacherTrainConfig, rng: np.random.Generator,
            ignore_index: int) -> Sample:
    """Random scale, crop (padding with ignore), flip, blur and colour jitter.

    Args:
        image: uint8 (H, W, 3); label: uint8 (H, W).

    Returns:
        uint8 (crop, crop, 3) image and uint8 (crop, crop) label.
    """
    s = float(rng.uniform(*cfg.scale))
    h, w = label.shape
    nh, nw = max(int(round(h * s)), 1), max(int(round(w * s)), 1)
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
    c = cfg.crop
    ph, pw = max(c - nh, 0), max(c - nw, 0)
    if ph or pw:
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=ignore_index)
    y = int(rng.integers(0, label.shape[0] - c + 1))
    x = int(rng.integers(0, label.shape[1] - c + 1))
    image, label = image[y:y + c, x:x + c], label[y:y + c, x:x + c]
    if cfg.flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if rng.random() < cfg.blur_prob:
        image = cv2.GaussianBlur(np.ascontiguousarray(image), (5, 5), float(rng.uniform(0.3, 1.5)))
    if cfg.jitter > 0:
        img = image.astype(np.float32)
        j = cfg.jitter
        img = img * rng.uniform(1 - j, 1 + j)                                    # brightness
        mean = img.mean()
        img = (img - mean) * rng.uniform(1 - j, 1 + j) + mean                    # contrast
        grey = img.mean(axis=2, keepdims=True)
        img = (img - grey) * rng.uniform(1 - j, 1 + j) + grey                    # saturation
        image = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def class_weights(samples: Sequence[Sample], num_classes: int, ignore_index: int) -> np.ndarray:
    """ENet class weights ``1 / ln(1.02 + p_c)`` from the label histogram, normalised to mean 1.

    Classes absent from every label get weight 0 (there is nothing to learn them from).
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    for _, label in samples:
        valid = label[label != ignore_index]
        counts += np.bincount(valid.ravel(), minlength=num_classes)[:num_classes]
    if counts.sum() == 0:
        raise ConfigError("the annotated frames hold no labelled pixel: nothing to train on")
    p = counts / counts.sum()
    weights = np.where(counts > 0, 1.0 / np.log(1.02 + p), 0.0)
    return (weights / weights[counts > 0].mean()).astype(np.float32)


def train_teacher(teacher: Teacher, samples: Sequence[Sample], cfg: TeacherTrainConfig,
                  progress: ProgressFn | None = None, state: TrainingState | None = None) -> dict[str, Any]:
    """Train ``teacher.net`` in place on ``samples``; returns a summary (steps, loss, seconds).

    Loss: cross-entropy with ENet class weights (when ``class_balance``), ignore index excluded.
    Optimiser: AdamW with a poly(0.9) learning-rate schedule. bf16 autocast on CUDA. With ``state``,
    progress is saved there now and then and a run finding one goes on from its step
    (``resumed_from_step`` in the summary); the caller removes it once the checkpoint is written.
    """
    if len(samples) == 0:
        raise ConfigError("no annotated frames to train on: check the stores and their annotation policy")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device(cfg.device)
    net = teacher.net.to(device).to(memory_format=torch.channels_last)
    num_classes = len(teacher.classes)
    weight = None
    if cfg.class_balance:
        weight = torch.from_numpy(class_weights(samples, num_classes, teacher.ignore_index)).to(device)
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer, schedule = poly_adamw(net.parameters(), cfg.lr, cfg.weight_decay, total)
    use_bf16 = device.type == "cuda"
    loop = TrainingLoop(net, optimizer, schedule, EpochSampler(len(samples), cfg.batch_size, rng), total, state)
    net.train()
    while loop.running():
        items = [augment(*samples[int(i)], cfg, rng, teacher.ignore_index) for i in loop.sampler.next_batch()]
        x = to_tensor(np.stack([i[0] for i in items]), device)
        y = torch.from_numpy(np.stack([i[1] for i in items])).to(device).long()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = net(x).logits
        loss = F.cross_entropy(logits.float(), y, weight=weight, ignore_index=teacher.ignore_index)
        loop.record(apply_step(loss, optimizer, schedule), progress)
    net.eval()
    return {**loop.summary(10), "samples": len(samples), "config": cfg.model_dump(mode="json")}


def adapt_teacher(teacher: Teacher, samples: Sequence[Sample], steps: int, cfg: TeacherTrainConfig | None = None,
                  progress: ProgressFn | None = None) -> Teacher:
    """A copy of ``teacher`` fine-tuned for ``steps`` steps on ``samples`` (one sequence's annotations).

    Uses a third of the training learning rate and a narrower scale range (0.75-1.5: the frames to
    label have the annotations' scale); the original teacher is left unchanged.
    """
    if steps < 1:
        return teacher
    base = cfg or TeacherTrainConfig(**teacher.train_info.get("config", {}))
    tuned = teacher.copy()
    adapt_cfg = base.model_copy(update={"max_steps": steps, "lr": base.lr / 3, "scale": (0.75, 1.5),
                                        "batch_size": min(base.batch_size, max(len(samples), 1)),
                                        "device": str(teacher.device)})
    train_teacher(tuned, samples, adapt_cfg, progress)
    tuned.train_info = {**teacher.train_info, "adapted_steps": steps}
    return tuned
