"""Label propagation methods and the recursion that carries labels away from annotated frames.

Methods (``METHODS``), each one recursive step ``Psi`` from frame ``src`` to a neighbour ``dst``:

* ``motion-only`` (Zhu et al.): warp the previous label along the flow (nearest neighbour); content
  entering from outside the frame takes the nearest border label.
* ``semantic-only`` (Tao et al.): the teacher's argmax where its confidence > 0.9, ignore elsewhere.
* ``warp-refine`` (paper Eq. 8): a warp-inpaint step, then the refinement network Omega
  (``models.refiner``) cleans the label using both images, the trust mask and the teacher's
  features; confidence is Omega's max softmax probability.
* ``warp-inpaint`` (paper Eq. 5-6): keep the warped label where the photometric error is below
  ``tau``, the pixel came from inside the frame and forward/backward flows agree; take the
  teacher's label everywhere else. Two guards make it robust to a teacher weaker than the
  paper's: an untrusted pixel takes the teacher's label only where the teacher's probability is
  at least ``inpaint_confidence`` (0.9; else the warp, border-filled outside the frame, stays), and
  the teacher overrides even a trusted warp where its probability is at least
  ``override_confidence`` (0.98) - drift inside colour-consistent regions. ``inpaint_confidence=0,
  override_confidence=1`` is exactly Eq. 5 (README: what the guards gain on CamVid dense).

Recursion: from every annotated frame a label travels up to ``K`` frames in both directions; a
chain stops at the next annotated frame (whose own annotation then takes over). So each frame gets
at most two candidates: one from the nearest annotated frame before it (forward chain) and one from
the nearest after it (backward chain).

**Fusion rule** for a frame reached by both: per pixel, the candidate with the higher confidence
wins; on equal confidence the one from the nearer annotated frame, and on equal distance the
forward one. The frame's distance is the smaller of the two. Annotated frames keep their
annotation (distance 0, confidence 1); frames out of reach get the ignore label and distance -1.

Confidence: 1 for annotated pixels; motion-only halves it wherever the forward/backward check
fails or the content came from outside the frame; warp-inpaint carries it along trusted pixels and takes the teacher's probability where it
inpaints; semantic-only uses the teacher's probability.

The recursion runs as two sweeps over time (backward, then forward) with bounded memory: the
backward sweep parks its candidates in a :class:`CandidateBuffer` (the store, in production),
the forward sweep fuses and emits frames in order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from autolabel.models.refiner import Refiner, RefinerInput
from autolabel.models.warping import (
    backward_warp,
    fb_consistency,
    photometric_error,
    warp_labels,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator

from autolabel.errors import ConfigError
from autolabel.registry import Registry

MAX_DISTANCE = 127  # the store keeps each frame's distance to its keyframe as int8


class PropagationConfig(BaseModel):
    """Settings of one propagation run."""

    model_config = ConfigDict(frozen=True)

    method: str = "warp-inpaint"
    max_distance: int = Field(10, description="K: frames to propagate in each direction")
    tau: float = Field(40.0, gt=0, description="photometric-error threshold (RGB Euclidean, 0-255 scale)")
    semantic_threshold: float = Field(0.9, ge=0, le=1, description="semantic-only: minimum teacher confidence")
    fb_check: bool = Field(True, description="warp-inpaint: also require forward/backward flow agreement")
    inpaint_confidence: float = Field(
        0.9, ge=0, le=1,
        description="warp-inpaint: teacher probability needed to replace an untrusted warped label "
                    "(0 = always, the paper's Eq. 5)")
    override_confidence: float = Field(
        0.98, ge=0, le=1,
        description="warp-inpaint: teacher probability at which it replaces even a trusted warped label "
                    "(1 = never, the paper's Eq. 5)")
    device: str = "cpu"

    @field_validator("max_distance")
    @classmethod
    def _k_positive(cls, k: int) -> int:
        if not 1 <= k <= MAX_DISTANCE:
            raise ConfigError(f"--max-distance (K) must be 1..{MAX_DISTANCE} frames (distances are stored "
                              f"as int8), got {k}")
        return k

    @field_validator("method")
    @classmethod
    def _known(cls, method: str) -> str:
        METHODS.get(method)
        return method


class SequenceInputs(Protocol):
    """What propagation reads from a sequence, one frame at a time."""

    num_frames: int
    height: int
    width: int
    annotated: np.ndarray          # bool (T,)
    num_classes: int
    ignore_index: int

    def annotation(self, t: int) -> np.ndarray: ...          # uint8 (H, W)
    def frame(self, t: int) -> np.ndarray: ...               # uint8 (H, W, 3)
    def flow_to_next(self, t: int) -> np.ndarray: ...        # float (2, H, W): t -> t+1 on frame t
    def flow_to_prev(self, t: int) -> np.ndarray: ...        # float (2, H, W): t -> t-1 on frame t
    def teacher(self, t: int) -> tuple[np.ndarray, np.ndarray]: ...  # uint8 labels, float conf (H, W)
    # float (F, H/4, W/4) teacher decoder features (warp-refine only; None when unavailable)
    teacher_features: Callable[[int], np.ndarray] | None


class WindowInputs:
    """Frames ``start..stop-1`` of other :class:`SequenceInputs`, renumbered from 0 (partial relabelling)."""

    def __init__(self, inputs: SequenceInputs, start: int, stop: int) -> None:
        if not 0 <= start < stop <= inputs.num_frames:
            raise ConfigError(f"window {start}..{stop} is outside the sequence of {inputs.num_frames} frames")
        self._inputs, self.start = inputs, start
        self.num_frames, self.height, self.width = stop - start, inputs.height, inputs.width
        self.annotated = np.asarray(inputs.annotated[start:stop])
        self.num_classes, self.ignore_index = inputs.num_classes, inputs.ignore_index
        features = getattr(inputs, "teacher_features", None)
        self.teacher_features = (lambda t: features(t + start)) if features is not None else None

    def annotation(self, t: int) -> np.ndarray:
        return self._inputs.annotation(t + self.start)

    def frame(self, t: int) -> np.ndarray:
        return self._inputs.frame(t + self.start)

    def flow_to_next(self, t: int) -> np.ndarray:
        return self._inputs.flow_to_next(t + self.start)

    def flow_to_prev(self, t: int) -> np.ndarray:
        return self._inputs.flow_to_prev(t + self.start)

    def teacher(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        return self._inputs.teacher(t + self.start)


def affected_windows(old: dict[int, str], new: dict[int, str], num_frames: int) -> list[tuple[int, int]] | None:
    """Frame windows ``[a, b]`` (inclusive) to propagate again after keyframes were added or changed.

    ``old`` / ``new``: annotated frame -> fingerprint of its annotation before and now. A keyframe
    n that is new or changed affects the frames strictly between its old neighbours ``a < n < b``
    (chains stop at annotated frames, so nothing beyond them changes); the window keeps ``a`` and
    ``b`` as anchors (the sequence's ends where n had no neighbour). None when a keyframe was
    removed: everything is relabelled. Overlapping windows are merged.
    """
    if set(old) - set(new):
        return None
    changed = sorted(t for t, fp in new.items() if old.get(t) != fp)
    keys = sorted(old)
    windows: list[tuple[int, int]] = []
    for n in changed:
        before = [k for k in keys if k < n]
        after = [k for k in keys if k > n]
        a, b = (before[-1] if before else 0), (after[0] if after else num_frames - 1)
        if windows and a <= windows[-1][1]:
            windows[-1] = (windows[-1][0], max(windows[-1][1], b))
        else:
            windows.append((a, b))
    return windows


@dataclass
class LabelState:
    """A propagated label: ``labels`` int64 (H, W), ``confidence`` float32 (H, W) in [0, 1]."""

    labels: torch.Tensor
    confidence: torch.Tensor


@dataclass
class Candidate:
    """One chain's result for a frame (numpy, ready to store)."""

    labels: np.ndarray      # uint8 (H, W)
    confidence: np.ndarray  # float32 (H, W)
    distance: int


class CandidateBuffer(Protocol):
    """Where the backward sweep parks its candidates until the forward sweep fuses them."""

    def put(self, t: int, candidate: Candidate) -> None: ...
    def get(self, t: int) -> Candidate | None: ...


class MemoryBuffer:
    """A CandidateBuffer in a dict (tests, short sequences)."""

    def __init__(self) -> None:
        self._items: dict[int, Candidate] = {}

    def put(self, t: int, candidate: Candidate) -> None:
        self._items[t] = candidate

    def get(self, t: int) -> Candidate | None:
        return self._items.get(t)


class PropagationMethod(ABC):
    """One recursive propagation step ``Psi`` from ``src`` to the neighbouring frame ``dst``."""

    needs_flow = True
    needs_teacher = True
    needs_refiner = False

    def __init__(self, config: PropagationConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)

    @abstractmethod
    def step(self, state: LabelState, src: int, dst: int, inputs: SequenceInputs) -> LabelState:
        """The label of ``dst`` (= src +- 1) from the label ``state`` of ``src``."""

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _flows(self, src: int, dst: int, inputs: SequenceInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(dst -> src flow on dst's pixels, src -> dst flow on src's pixels), each (1, 2, H, W)."""
        if dst == src + 1:
            to_src, to_dst = inputs.flow_to_prev(dst), inputs.flow_to_next(src)
        else:
            to_src, to_dst = inputs.flow_to_next(dst), inputs.flow_to_prev(src)
        return self._tensor(to_src).float()[None], self._tensor(to_dst).float()[None]

    def _teacher(self, t: int, inputs: SequenceInputs) -> tuple[torch.Tensor, torch.Tensor]:
        labels, conf = inputs.teacher(t)
        return self._tensor(labels).long(), self._tensor(conf).float()


METHODS: Registry[type[PropagationMethod]] = Registry("propagation method")


@METHODS.register("motion-only")
class MotionOnly(PropagationMethod):
    needs_teacher = False

    def step(self, state: LabelState, src: int, dst: int, inputs: SequenceInputs) -> LabelState:
        to_src, to_dst = self._flows(src, dst, inputs)
        # like Zhu et al., keep a label everywhere: content entering from outside the frame takes
        # the nearest border label, at half confidence
        labels = warp_labels(state.labels[None], to_src, inputs.ignore_index, outside="border")[0]
        conf = warp_labels(state.confidence[None], to_src, outside="border")[0]
        consistent = fb_consistency(to_src, to_dst)[0]  # also False where the source is outside
        return LabelState(labels, torch.where(consistent, conf, conf * 0.5))


@METHODS.register("semantic-only")
class SemanticOnly(PropagationMethod):
    needs_flow = False

    def step(self, state: LabelState, src: int, dst: int, inputs: SequenceInputs) -> LabelState:
        labels, conf = self._teacher(dst, inputs)
        keep = conf > self.config.semantic_threshold
        return LabelState(torch.where(keep, labels, torch.full_like(labels, inputs.ignore_index)), conf)


@dataclass
class WarpInpaintStep:
    """One warp-inpaint step with what the refiner needs besides the label.

    state: the warp-inpainted label of the target frame; trusted: bool (H, W) trust mask M;
    warped_image / target_image: float (3, H, W), 0-255, the source frame warped onto the target
    and the target frame.
    """

    state: LabelState
    trusted: torch.Tensor
    warped_image: torch.Tensor
    target_image: torch.Tensor


@METHODS.register("warp-inpaint")
class WarpInpaint(PropagationMethod):
    def _trust(self, src: int, dst: int,
               inputs: SequenceInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M (H, W), dst -> src flow (1, 2, H, W), warped source (1, 3, H, W), target (1, 3, H, W))."""
        to_src, to_dst = self._flows(src, dst, inputs)
        source = self._tensor(inputs.frame(src)).permute(2, 0, 1)[None].float()
        target = self._tensor(inputs.frame(dst)).permute(2, 0, 1)[None].float()
        warped, inside = backward_warp(source, to_src)
        trusted = (photometric_error(target, warped) < self.config.tau) & inside
        if self.config.fb_check:
            trusted &= fb_consistency(to_src, to_dst)
        return trusted[0], to_src, warped, target

    def trust_mask(self, src: int, dst: int, inputs: SequenceInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, dst -> src flow): M (H, W) bool = photometric error < tau & inside (& fb-consistent)."""
        trusted, to_src, _, _ = self._trust(src, dst, inputs)
        return trusted, to_src

    def step_detail(self, state: LabelState, src: int, dst: int, inputs: SequenceInputs) -> WarpInpaintStep:
        """Psi_W from ``src`` to ``dst`` with its trust mask and warped image."""
        trusted, to_src, warped, target = self._trust(src, dst, inputs)
        warped_labels = warp_labels(state.labels[None], to_src, inputs.ignore_index, outside="border")[0]
        warped_conf = warp_labels(state.confidence[None], to_src, outside="border")[0]
        teacher_labels, teacher_conf = self._teacher(dst, inputs)
        # the warp is kept where trusted, and also where the teacher is too unsure to replace it
        keep = trusted | (teacher_conf < self.config.inpaint_confidence)
        keep &= teacher_conf < self.config.override_confidence
        # a mapped teacher's "unknown" (stored as the ignore label) never replaces the warp
        keep |= teacher_labels == inputs.ignore_index
        labels = torch.where(keep, warped_labels, teacher_labels)
        conf = torch.where(keep, torch.where(trusted, warped_conf, warped_conf * 0.5), teacher_conf)
        return WarpInpaintStep(LabelState(labels, conf), trusted, warped[0], target[0])

    def step(self, state: LabelState, src: int, dst: int, inputs: SequenceInputs) -> LabelState:
        return self.step_detail(state, src, dst, inputs).state


def refiner_input(step: WarpInpaintStep, features: torch.Tensor) -> RefinerInput:
    """A batch of one for the refiner from a warp-inpaint step and the target's teacher features (F, h, w)."""
    return RefinerInput(
        labels=step.state.labels[None], confidence=step.state.confidence[None], trusted=step.trusted[None],
        warped_image=step.warped_image[None] / 255.0, target_image=step.target_image[None] / 255.0,
        features=features[None],
    )


@METHODS.register("warp-refine")
class WarpRefine(WarpInpaint):
    """Psi_R (paper Eq. 8): L^R_k = Omega(Psi_W(L^R_{k-1})); confidence = max softmax of Omega."""

    needs_refiner = True

    def __init__(self, config: PropagationConfig, refiner: Refiner | None = None) -> None:
        super().__init__(config)
        if refiner is None:
            raise ConfigError("method 'warp-refine' needs a refiner: pass --refiner CHECKPOINT "
                              "(train one with `autolabel train-refiner --store ... --teacher ... --out refiner.pt`)")
        self.refiner = refiner.to(self.device)

    def step(self, state: LabelState, src: int, dst: int, inputs: SequenceInputs) -> LabelState:
        detail = self.step_detail(state, src, dst, inputs)
        teacher_features = getattr(inputs, "teacher_features", None)
        if teacher_features is None:
            raise ConfigError("method 'warp-refine' needs the teacher's features: give the sequence inputs a teacher")
        features = self._tensor(teacher_features(dst)).float()
        probs = self.refiner.refine(refiner_input(detail, features))[0]
        conf, labels = probs.max(0)
        return LabelState(labels, conf)


def method_class(name: str) -> type[PropagationMethod]:
    """The registered method class ``name`` (what it needs: ``needs_flow``, ``needs_teacher``, ...)."""
    return METHODS.get(name)


def create_method(config: PropagationConfig, refiner: Refiner | None = None) -> PropagationMethod:
    """An instance of ``config.method``; ``refiner`` is required by (and only passed to) warp-refine."""
    cls = method_class(config.method)
    if cls.needs_refiner:
        return cls(config, refiner)  # type: ignore[call-arg]
    return cls(config)


def fuse(forward: Candidate | None, backward: Candidate | None) -> Candidate | None:
    """Fuse the candidates of the two chains that reach a frame (module docstring: fusion rule)."""
    if forward is None or backward is None:
        return forward or backward
    if forward.distance <= backward.distance:
        take_backward = backward.confidence > forward.confidence
    else:
        take_backward = backward.confidence >= forward.confidence
    return Candidate(
        labels=np.where(take_backward, backward.labels, forward.labels),
        confidence=np.where(take_backward, backward.confidence, forward.confidence),
        distance=min(forward.distance, backward.distance),
    )


def _chain(method: PropagationMethod, inputs: SequenceInputs, order: range,
           direction: int) -> Iterator[tuple[int, Candidate | None]]:
    """Walk ``order`` (one time direction); chains restart at annotated frames and end after K steps."""
    k_max = method.config.max_distance
    state: LabelState | None = None
    distance = 0
    for t in order:
        if inputs.annotated[t]:
            ann = method._tensor(inputs.annotation(t)).long()
            state, distance = LabelState(ann, torch.ones(ann.shape, device=method.device)), 0
            yield t, None
        elif state is not None and distance < k_max:
            state = method.step(state, t - direction, t, inputs)
            distance += 1
            yield t, Candidate(state.labels.to(torch.uint8).cpu().numpy(),
                               state.confidence.float().cpu().numpy(), distance)
        else:
            state = None
            yield t, None


@dataclass
class OutputFrame:
    """What propagation produces for one frame (in time order)."""

    t: int
    labels: np.ndarray      # uint8 (H, W)
    confidence: np.ndarray  # uint8 (H, W), probability x 255
    distance: int           # 0 annotated, 1..K propagated, -1 out of reach


def propagate_frames(inputs: SequenceInputs, config: PropagationConfig, buffer: CandidateBuffer | None = None,
                     on_step: Callable[[], None] | None = None,
                     refiner: Refiner | None = None) -> Iterator[OutputFrame]:
    """Run ``config.method`` over a whole sequence; frames come out in time order, one at a time.

    Args:
        inputs: the sequence's frames, annotations, flows and teacher output.
        buffer: where backward-chain candidates wait (default: in memory).
        on_step: called after each propagation step (progress).
        refiner: the trained refiner Omega (warp-refine only).
    """
    method = create_method(config, refiner)
    buffer = buffer if buffer is not None else MemoryBuffer()
    if not inputs.annotated.any():
        raise ConfigError("the sequence has no annotated frame to propagate from")
    total = inputs.num_frames
    for t, cand in _chain(method, inputs, range(total - 1, -1, -1), -1):
        if cand is not None:
            buffer.put(t, cand)
            if on_step:
                on_step()
    for t, cand in _chain(method, inputs, range(total), 1):
        if inputs.annotated[t]:
            ann = inputs.annotation(t).astype(np.uint8)
            yield OutputFrame(t, ann, np.full(ann.shape, 255, np.uint8), 0)
            continue
        if cand is not None and on_step:
            on_step()
        fused = fuse(cand, buffer.get(t))
        if fused is None:
            shape = (inputs.height, inputs.width)
            yield OutputFrame(t, np.full(shape, inputs.ignore_index, np.uint8), np.zeros(shape, np.uint8), -1)
        else:
            conf = np.clip(np.round(fused.confidence * 255), 0, 255).astype(np.uint8)
            yield OutputFrame(t, fused.labels, conf, fused.distance)


def count_steps(annotated: np.ndarray, max_distance: int) -> int:
    """How many propagation steps (both sweeps) a sequence takes: one per frame per chain reaching it."""
    steps = 0
    for order in (range(len(annotated)), range(len(annotated) - 1, -1, -1)):
        distance = None
        for t in order:
            if annotated[t]:
                distance = 0
            elif distance is not None and distance < max_distance:
                distance += 1
                steps += 1
            else:
                distance = None
    return steps


def propagate(inputs: SequenceInputs, config: PropagationConfig, refiner: Refiner | None = None) -> list[OutputFrame]:
    """All frames of :func:`propagate_frames` as a list (for short sequences and tests)."""
    return list(propagate_frames(inputs, config, refiner=refiner))
