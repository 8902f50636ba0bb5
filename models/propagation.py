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

The recursion runs gap by gap (the frames between two annotated frames are reached by the forward
chain of the one before and the backward chain of the one after): the chains of consecutive gaps
advance together as one batch (:func:`propagate_frames`), so memory holds one group of gaps and
networks see batches, and frames are emitted in time order.
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
    sampling,
    warp_labels,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator

from autolabel.errors import ConfigError
from autolabel.models.prefetch import PrefetchingInputs
from autolabel.registry import Registry

MAX_DISTANCE = 127  # the store keeps each frame's distance to its keyframe as int8
# chains per batch when not set: on a CPU one chain at a time is fastest (measured: warp-refine at
# 480x360 propagates 14.3 frames/s one at a time, 12.7 four at a time, on 2 cores); a GPU needs many
AUTO_BATCH = {"cpu": 1, "cuda": 16}


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
    batch_size: int = Field(0, ge=0, description="chains propagated together as one batch (0 = automatic: "
                                                 f"{AUTO_BATCH['cpu']} on CPU, {AUTO_BATCH['cuda']} on CUDA); "
                                                 "labels do not depend on it")
    prefetch: bool = Field(True, description="read the next step's flows, frames and teacher output on a "
                                             "background thread while the current step computes; labels "
                                             "do not depend on it")

    def chains_per_batch(self) -> int:
        """``batch_size``, or the automatic choice for ``device``."""
        return self.batch_size or AUTO_BATCH["cuda" if self.device.startswith("cuda") else "cpu"]

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
    # float (F, H/4, W/4) teacher decoder features, array or tensor (warp-refine only; None when unavailable)
    teacher_features: Callable[[int], np.ndarray | torch.Tensor] | None


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
        batch = getattr(inputs, "teacher_features_batch", None)
        self.teacher_features_batch = (lambda ts: batch([t + start for t in ts])) if batch is not None else None

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

    def step_batch(self, states: list[LabelState], srcs: list[int], dsts: list[int],
                   inputs: SequenceInputs) -> list[LabelState]:
        """:meth:`step` for several chains at once (one step each); methods with a network batch it."""
        return [self.step(state, src, dst, inputs) for state, src, dst in zip(states, srcs, dsts)]

    def step_reads(self, src: int, dst: int) -> list[tuple[str, int]]:
        """The reads of :class:`SequenceInputs` one step from ``src`` to ``dst`` makes (prefetched)."""
        reads = []
        if self.needs_flow:
            reads += ([("flow_to_prev", dst), ("flow_to_next", src)] if dst == src + 1
                      else [("flow_to_next", dst), ("flow_to_prev", src)])
        if self.needs_teacher:
            reads.append(("teacher", dst))
        return reads

    def _tensor(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(array, torch.Tensor):  # e.g. teacher features computed here: no copy through numpy
            return array.to(self.device)
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
        grid = sampling(to_src)
        labels = warp_labels(state.labels[None], to_src, inputs.ignore_index, outside="border", grid=grid)[0]
        conf = warp_labels(state.confidence[None], to_src, outside="border", grid=grid)[0]
        consistent = fb_consistency(to_src, to_dst, grid=grid)[0]  # also False where the source is outside
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


class StepMemo:
    """The last step's trust check, shared by methods stepping the same chains together
    (:func:`propagate_frames_together`): warp-inpaint and warp-refine need the same masks and warps."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: tuple | None = None


def share_trust(methods: list[PropagationMethod]) -> None:
    """Let the warping methods among ``methods``, stepped together, make each step's trust check once."""
    memo = StepMemo()
    for method in methods:
        if isinstance(method, WarpInpaint):
            method.memo = memo


@METHODS.register("warp-inpaint")
class WarpInpaint(PropagationMethod):
    memo: StepMemo | None = None  # set by propagate_frames_together

    def _pair_flows(self, srcs: list[int], dsts: list[int],
                    inputs: SequenceInputs) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._flows(src, dst, inputs) for src, dst in zip(srcs, dsts)]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def step_reads(self, src: int, dst: int) -> list[tuple[str, int]]:
        return [*super().step_reads(src, dst), ("frame", src), ("frame", dst)]

    def _frames(self, ts: list[int], inputs: SequenceInputs) -> torch.Tensor:
        """float (B, 3, H, W), 0-255."""
        return torch.stack([self._tensor(inputs.frame(t)).permute(2, 0, 1) for t in ts]).float()

    def _trust(self, srcs: list[int], dsts: list[int], inputs: SequenceInputs) \
            -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(M (B, H, W), dst -> src flows (B, 2, H, W), warped sources (B, 3, H, W), targets (B, 3, H, W),
        the flows' :func:`~models.warping.sampling`). Computed once per step where methods share a
        :class:`StepMemo` (the same inputs, chains and checks give the same tensors)."""
        key = (id(inputs), tuple(srcs), tuple(dsts), self.config.tau, self.config.fb_check)
        if self.memo is not None and self.memo.key == key:
            return self.memo.value  # type: ignore[return-value]
        to_src, to_dst = self._pair_flows(srcs, dsts, inputs)
        source, target = self._frames(srcs, inputs), self._frames(dsts, inputs)
        grid = sampling(to_src)  # one sampling grid for every warp of this step
        warped, inside = backward_warp(source, to_src, grid=grid)
        trusted = (photometric_error(target, warped) < self.config.tau) & inside
        if self.config.fb_check:
            trusted &= fb_consistency(to_src, to_dst, grid=grid)
        if self.memo is not None:
            self.memo.key, self.memo.value = key, (trusted, to_src, warped, target, grid)
        return trusted, to_src, warped, target, grid

    def trust_mask(self, src: int, dst: int, inputs: SequenceInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, dst -> src flow): M (H, W) bool = photometric error < tau & inside (& fb-consistent)."""
        trusted, to_src, _, _, _ = self._trust([src], [dst], inputs)
        return trusted[0], to_src

    def step_details(self, states: list[LabelState], srcs: list[int], dsts: list[int],
                     inputs: SequenceInputs) -> WarpInpaintStep:
        """Psi_W for B chains at once: a :class:`WarpInpaintStep` whose tensors have a batch dimension."""
        trusted, to_src, warped, target, grid = self._trust(srcs, dsts, inputs)
        labels_in = torch.stack([s.labels for s in states])
        conf_in = torch.stack([s.confidence for s in states])
        warped_labels = warp_labels(labels_in, to_src, inputs.ignore_index, outside="border", grid=grid)
        warped_conf = warp_labels(conf_in, to_src, outside="border", grid=grid)
        teacher = [self._teacher(t, inputs) for t in dsts]
        teacher_labels = torch.stack([t[0] for t in teacher])
        teacher_conf = torch.stack([t[1] for t in teacher])
        # the warp is kept where trusted, and also where the teacher is too unsure to replace it
        keep = trusted | (teacher_conf < self.config.inpaint_confidence)
        keep &= teacher_conf < self.config.override_confidence
        # a mapped teacher's "unknown" (stored as the ignore label) never replaces the warp
        keep |= teacher_labels == inputs.ignore_index
        labels = torch.where(keep, warped_labels, teacher_labels)
        conf = torch.where(keep, torch.where(trusted, warped_conf, warped_conf * 0.5), teacher_conf)
        return WarpInpaintStep(LabelState(labels, conf), trusted, warped, target)

    def step_detail(self, state: LabelState, src: int, dst: int, inputs: SequenceInputs) -> WarpInpaintStep:
        """Psi_W from ``src`` to ``dst`` with its trust mask and warped image (no batch dimension)."""
        d = self.step_details([state], [src], [dst], inputs)
        return WarpInpaintStep(LabelState(d.state.labels[0], d.state.confidence[0]), d.trusted[0],
                               d.warped_image[0], d.target_image[0])

    def step(self, state: LabelState, src: int, dst: int, inputs: SequenceInputs) -> LabelState:
        return self.step_detail(state, src, dst, inputs).state

    def step_batch(self, states: list[LabelState], srcs: list[int], dsts: list[int],
                   inputs: SequenceInputs) -> list[LabelState]:
        d = self.step_details(states, srcs, dsts, inputs)
        return [LabelState(d.state.labels[i], d.state.confidence[i]) for i in range(len(states))]


def refiner_input(step: WarpInpaintStep, features: torch.Tensor) -> RefinerInput:
    """The refiner's batch from a batched warp-inpaint step and the targets' teacher features (B, F, h, w)."""
    return RefinerInput(
        labels=step.state.labels, confidence=step.state.confidence, trusted=step.trusted,
        warped_image=step.warped_image / 255.0, target_image=step.target_image / 255.0, features=features,
    )


def teacher_features(inputs: SequenceInputs, ts: list[int]) -> np.ndarray | torch.Tensor:
    """float (B, F, h, w) teacher features of frames ``ts``: one batched call where the inputs offer it
    (a tensor, in whatever memory format and on whatever device the teacher gave it, or an array)."""
    batch = getattr(inputs, "teacher_features_batch", None)
    if batch is not None:
        return batch(ts)
    single = getattr(inputs, "teacher_features", None)
    if single is None:
        raise ConfigError("method 'warp-refine' needs the teacher's features: give the sequence inputs a teacher")
    parts = [single(t) for t in ts]
    return torch.stack(parts) if isinstance(parts[0], torch.Tensor) else np.stack(parts)


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

    def step_batch(self, states: list[LabelState], srcs: list[int], dsts: list[int],
                   inputs: SequenceInputs) -> list[LabelState]:
        detail = self.step_details(states, srcs, dsts, inputs)
        features = self._tensor(teacher_features(inputs, dsts)).float()
        probs = self.refiner.refine(refiner_input(detail, features))
        conf, labels = probs.max(1)
        return [LabelState(labels[i], conf[i]) for i in range(len(states))]

    def step(self, state: LabelState, src: int, dst: int, inputs: SequenceInputs) -> LabelState:
        return self.step_batch([state], [src], [dst], inputs)[0]


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


@dataclass(frozen=True)
class Chain:
    """A label travelling from annotated frame ``key`` in ``direction`` (+1 / -1) over ``length`` frames."""

    key: int
    direction: int
    length: int

    def frame(self, i: int) -> int:
        """The frame the chain reaches at step ``i`` (0 = its keyframe)."""
        return self.key + self.direction * i


def gap_chains(annotated: np.ndarray, max_distance: int) -> list[list[Chain]]:
    """Per gap between annotated frames (before the first, between each pair, after the last), the
    chains that reach into it: the forward chain of the keyframe before, the backward one of the
    keyframe after, each up to ``max_distance`` frames and never onto an annotated frame."""
    keys = [int(k) for k in np.flatnonzero(annotated)]
    bounds = [-1, *keys, len(annotated)]
    gaps: list[list[Chain]] = []
    for left, right in zip(bounds[:-1], bounds[1:]):
        span = right - left - 1
        chains = []
        if left >= 0 and span > 0:
            chains.append(Chain(left, 1, min(max_distance, span)))
        if right < len(annotated) and span > 0:
            chains.append(Chain(right, -1, min(max_distance, span)))
        gaps.append(chains)
    return gaps


# told, after a group of chains ran: the methods, the inputs, the chains and per method each
# chain's final state (a probe of the estimate resumes from them, models.quality.ProbeAnswers)
OnChains = Callable[[list["PropagationMethod"], SequenceInputs, list[Chain], list[list[LabelState]]], None]


def _run_chains(methods: list[PropagationMethod], inputs: SequenceInputs, chains: list[Chain],
                on_step: Callable[[], None] | None
                ) -> tuple[list[dict[tuple[int, int], Candidate]], list[list[LabelState]]]:
    """Step ``chains`` in lockstep (one batch per step) with each method; per method, candidates by
    (frame, direction), and per method each chain's final state."""
    outs: list[dict[tuple[int, int], Candidate]] = [{} for _ in methods]
    states: list[list[LabelState]] = [[] for _ in methods]
    for chain in chains:
        ann = methods[0]._tensor(inputs.annotation(chain.key)).long()
        for m, method in enumerate(methods):
            states[m].append(LabelState(ann, torch.ones(ann.shape, device=method.device)))
    steps = max((c.length for c in chains), default=0)
    prefetch = getattr(inputs, "prefetch", None)  # a PrefetchingInputs reads the next step meanwhile

    def reads(i: int) -> list[tuple[str, int]]:
        wanted = [r for c in chains if c.length >= i for method in methods
                  for r in method.step_reads(c.frame(i - 1), c.frame(i))]
        return list(dict.fromkeys(wanted))

    if prefetch is not None and steps:
        prefetch(reads(1))
    for i in range(1, steps + 1):
        active = [j for j, c in enumerate(chains) if c.length >= i]
        if prefetch is not None:
            prefetch(reads(i + 1))
        srcs, dsts = [chains[j].frame(i - 1) for j in active], [chains[j].frame(i) for j in active]
        for m, method in enumerate(methods):
            new = method.step_batch([states[m][j] for j in active], srcs, dsts, inputs)
            for j, state in zip(active, new):
                states[m][j] = state
                outs[m][(chains[j].frame(i), chains[j].direction)] = Candidate(
                    state.labels.to(torch.uint8).cpu().numpy(), state.confidence.float().cpu().numpy(), i)
                if on_step is not None:
                    on_step()
    return outs, states


@dataclass
class OutputFrame:
    """What propagation produces for one frame (in time order)."""

    t: int
    labels: np.ndarray      # uint8 (H, W)
    confidence: np.ndarray  # uint8 (H, W), probability x 255
    distance: int           # 0 annotated, 1..K propagated, -1 out of reach


def _chains_for(gaps: list[list[Chain]], start: int, stop: int) -> list[list[Chain]]:
    """The chains cut to what frames ``start..stop-1`` need: a forward chain up to ``stop - 1`` (it must
    still walk through earlier frames), a backward one down to ``start``; chains that reach none go."""
    cut: list[list[Chain]] = []
    for chains in gaps:
        kept = []
        for c in chains:
            length = min(c.length, stop - 1 - c.key) if c.direction > 0 else min(c.length, c.key - start)
            reach = (c.key + c.length >= start) if c.direction > 0 else (c.key - c.length <= stop - 1)
            if length > 0 and reach:
                kept.append(Chain(c.key, c.direction, length))
        cut.append(kept)
    return cut


def propagate_frames(inputs: SequenceInputs, config: PropagationConfig, on_step: Callable[[], None] | None = None,
                     refiner: Refiner | None = None, batch_size: int = 1,
                     frames: tuple[int, int] | None = None) -> Iterator[OutputFrame]:
    """Run ``config.method`` over a whole sequence; frames come out in time order, one at a time.

    The chains of consecutive gaps between annotated frames advance together, up to ``batch_size``
    chains per batch (warping, teacher features and the refiner see them as one batch); memory
    holds the candidates of one group of gaps, whatever the sequence's length.

    Args:
        inputs: the sequence's frames, annotations, flows and teacher output.
        on_step: called after each propagation step of each chain (progress).
        refiner: the trained refiner Omega (warp-refine only).
        batch_size: chains stepped together (>= 1; a gap has up to two).
        frames: only frames ``start..stop-1`` come out (a segment's own), and chains run only as
            far as those frames need; their labels are the ones the whole sequence gives them.
    """
    for out in propagate_frames_together(inputs, [config], on_step, refiner, batch_size, frames):
        yield out[0]


def propagate_frames_together(inputs: SequenceInputs, configs: list[PropagationConfig],
                              on_step: Callable[[], None] | None = None, refiner: Refiner | None = None,
                              batch_size: int = 1, frames: tuple[int, int] | None = None,
                              on_chains: OnChains | None = None) -> Iterator[list[OutputFrame]]:
    """:func:`propagate_frames` of several methods in one pass: per frame, one output per config.

    The methods step the same chains together, so each step's inputs are read once and the
    warping methods (warp-inpaint, warp-refine) share its trust check (a :class:`StepMemo`); each
    method's outputs are exactly what :func:`propagate_frames` gives it alone. The configs must
    agree on K (``max_distance``): the chains are the same. ``on_chains`` is told each group of
    chains with their final states once they ran (:data:`OnChains`; frame indices are ``inputs``').
    """
    if batch_size < 1:
        raise ConfigError(f"the propagation batch size must be >= 1, got {batch_size}")
    if not configs:
        raise ConfigError("propagate at least one method")
    if len({c.max_distance for c in configs}) > 1:
        raise ConfigError("methods propagated together need the same K (max_distance), got "
                          f"{[c.max_distance for c in configs]}")
    methods = [create_method(config, refiner if method_class(config.method).needs_refiner else None)
               for config in configs]
    share_trust(methods)
    if not inputs.annotated.any():
        raise ConfigError("the sequence has no annotated frame to propagate from")
    first, end = frames if frames is not None else (0, inputs.num_frames)
    if not 0 <= first < end <= inputs.num_frames:
        raise ConfigError(f"frames {first}..{end} are outside the sequence of {inputs.num_frames} frames")
    gaps = _chains_for(gap_chains(inputs.annotated, configs[0].max_distance), first, end)
    if not all(config.prefetch for config in configs):
        yield from _fused_frames(methods, inputs, gaps, batch_size, first, end, on_step, on_chains)
        return
    with PrefetchingInputs(inputs) as reading:
        yield from _fused_frames(methods, reading, gaps, batch_size, first, end, on_step, on_chains)


def _fused_frames(methods: list[PropagationMethod], inputs: SequenceInputs, gaps: list[list[Chain]],
                  batch_size: int, first: int, end: int, on_step: Callable[[], None] | None,
                  on_chains: OnChains | None) -> Iterator[list[OutputFrame]]:
    """:func:`propagate_frames_together`' loop: groups of gaps stepped as batches, frames ``first..end-1``
    fused, one output per method."""
    keys = [int(k) for k in np.flatnonzero(inputs.annotated)]
    shape = (inputs.height, inputs.width)
    g = t = 0
    while g < len(gaps):
        group = [g]
        while (g + len(group) < len(gaps)
               and sum(len(gaps[x]) for x in group) + len(gaps[g + len(group)]) <= batch_size):
            group.append(g + len(group))
        chains = [c for x in group for c in gaps[x]]
        candidates, states = _run_chains(methods, inputs, chains, on_step)
        if on_chains is not None:
            on_chains(methods, inputs, chains, states)
        last = group[-1]
        stop = keys[last] if last < len(keys) else inputs.num_frames - 1  # up to the group's closing keyframe
        while t <= stop:
            if not first <= t < end:
                t += 1
                continue
            if inputs.annotated[t]:
                ann = inputs.annotation(t).astype(np.uint8)
                yield [OutputFrame(t, ann, np.full(ann.shape, 255, np.uint8), 0) for _ in methods]
            else:
                yield [_fused_output(t, shape, inputs.ignore_index, found) for found in candidates]
            t += 1
        g = last + 1


def _fused_output(t: int, shape: tuple[int, int], ignore_index: int,
                  candidates: dict[tuple[int, int], Candidate]) -> OutputFrame:
    """Frame ``t``'s output from one method's chain candidates (module docstring: fusion rule)."""
    fused = fuse(candidates.get((t, 1)), candidates.get((t, -1)))
    if fused is None:
        return OutputFrame(t, np.full(shape, ignore_index, np.uint8), np.zeros(shape, np.uint8), -1)
    conf = np.clip(np.round(fused.confidence * 255), 0, 255).astype(np.uint8)
    return OutputFrame(t, fused.labels, conf, fused.distance)


def count_frame_steps(annotated: np.ndarray, max_distance: int, frames: tuple[int, int]) -> int:
    """Propagation steps of :func:`propagate_frames` restricted to ``frames`` (progress of a segment)."""
    return sum(c.length for gap in _chains_for(gap_chains(np.asarray(annotated, bool), max_distance), *frames)
               for c in gap)


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
