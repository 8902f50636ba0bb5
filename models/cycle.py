"""Forward-backward cycles: the refiner's training data, made from annotated frames alone.

For an annotated frame ``t``, a cycle of length ``l`` in direction ``s`` (+1 or -1) runs the
warp-inpaint step Psi_W from ``t`` to ``t + s*l`` one frame at a time and back to ``t`` (flows of
both directions, the teacher's labels on every frame visited). The cycled label carries the noise
of ``2l`` propagation steps - drift, dis-occlusion duplicates, bad merges - but its correct answer
is the annotation of ``t``, so the refiner learns to denoise without any extra labels (paper 3.4).

Only ``inputs.annotation(t)`` of the annotated start frame is read; no other frame's label.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from autolabel.errors import ConfigError
from autolabel.models.propagation import LabelState, SequenceInputs, WarpInpaint, WarpInpaintStep


@dataclass
class CycleSample:
    """One training sample for the refiner (numpy, compact).

    labels: uint8 (H, W) cycled label; confidence: uint8 (H, W) x255; trusted: bool (H, W) trust mask
    of the last step; warped_image: uint8 (H, W, 3) frame t+-1 warped onto t; target_image: uint8
    (H, W, 3) frame t; annotation: uint8 (H, W) the label to recover; t / length / direction: where from.
    """

    labels: np.ndarray
    confidence: np.ndarray
    trusted: np.ndarray
    warped_image: np.ndarray
    target_image: np.ndarray
    annotation: np.ndarray
    t: int
    length: int
    direction: int


def cycle_path(t: int, length: int, direction: int) -> list[int]:
    """Frames visited by a cycle: ``[t, t+s, ..., t+s*l, ..., t+s, t]``."""
    out = [t + direction * i for i in range(length + 1)]
    return out + out[-2::-1]


def run_cycle(method: WarpInpaint, inputs: SequenceInputs, t: int, length: int, direction: int) -> WarpInpaintStep:
    """Psi_W along :func:`cycle_path` starting from the annotation of ``t``; the last step's detail."""
    if length < 1 or direction not in (1, -1):
        raise ConfigError(f"a cycle needs length >= 1 and direction +1 or -1, got {length}, {direction}")
    far = t + direction * length
    if not 0 <= far < inputs.num_frames:
        raise ConfigError(f"a cycle of length {length} from frame {t} leaves the sequence of {inputs.num_frames} frames")
    ann = method._tensor(inputs.annotation(t)).long()
    state = LabelState(ann, torch.ones(ann.shape, device=method.device))
    path = cycle_path(t, length, direction)
    detail: WarpInpaintStep | None = None
    for src, dst in zip(path[:-1], path[1:]):
        detail = method.step_detail(state, src, dst, inputs)
        state = detail.state
    assert detail is not None
    return detail


def cycle_sample(method: WarpInpaint, inputs: SequenceInputs, t: int, length: int, direction: int) -> CycleSample:
    """:func:`run_cycle` packed as a :class:`CycleSample`."""
    d = run_cycle(method, inputs, t, length, direction)
    to_u8 = lambda x: x.round().clamp(0, 255).to(torch.uint8).cpu().numpy()  # noqa: E731
    return CycleSample(
        labels=d.state.labels.to(torch.uint8).cpu().numpy(),
        confidence=to_u8(d.state.confidence * 255),
        trusted=d.trusted.cpu().numpy(),
        warped_image=to_u8(d.warped_image).transpose(1, 2, 0).copy(),
        target_image=to_u8(d.target_image).transpose(1, 2, 0).copy(),
        annotation=np.asarray(inputs.annotation(t), dtype=np.uint8),
        t=t, length=length, direction=direction,
    )


def cycle_plan(annotated: np.ndarray, max_cycle: int) -> Iterator[tuple[int, int, int]]:
    """Every (t, length, direction) with ``t`` annotated, 1 <= length <= max_cycle, inside the sequence."""
    n = len(annotated)
    for t in np.flatnonzero(annotated):
        for length in range(1, max_cycle + 1):
            for direction in (1, -1):
                if 0 <= t + direction * length < n:
                    yield int(t), length, direction
