"""Refiner training from stores: make the flow and teacher stages, generate cycles, train Omega.

Cycles start only at annotated frames and read only their annotations (``Sequence.annotation``),
so the ground truth that non-annotated frames may hold for evaluation is never seen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from autolabel.errors import ClassSetMismatchError, ConfigError
from autolabel.models.cycle import CycleSample, cycle_plan, cycle_sample
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import PropagationConfig, WarpInpaint
from autolabel.models.quality import annotation_fingerprint
from autolabel.models.refiner import Refiner
from autolabel.models.refiner_training import RefinerTrainConfig, score_on_samples, train_refiner
from autolabel.models.teacher_runtime import SemanticTeacher
from autolabel.models.checkpoints import check_checkpoint_path
from autolabel.models.training_state import TrainingState, run_settings, state_path_for
from autolabel.storage.stages import TEACHER
from autolabel.storage.store import SequenceStore
from autolabel.storage.ids import select_ids
from autolabel.tasks.checkpoints import load_teacher, teacher_sha256
from autolabel.progress import Progress, QuietProgress
from autolabel.tasks.pipeline import FlowStage, TeacherStage
from autolabel.tasks.propagate import StoreSequenceInputs


class RefinerRequest(BaseModel):
    """Everything ``autolabel train-refiner`` needs."""

    model_config = ConfigDict(frozen=True)

    stores: list[str] = Field(min_length=1)
    teacher: Path
    teacher_map: Path | None = Field(None, description="JSON mapping of the teacher's classes onto the stores'")
    out: Path
    train: RefinerTrainConfig = RefinerTrainConfig()
    propagation: PropagationConfig = PropagationConfig(method="warp-inpaint")
    flow: FlowConfig = FlowConfig()
    adapt_steps: int = Field(0, ge=0, description="teacher adaptation per sequence (as for labelling)")
    max_samples: int | None = Field(None, ge=1, description="use at most this many cycles of each store (random, seeded)")
    sequences: list[str] | None = None


def collect_cycles(request: RefinerRequest, teacher: SemanticTeacher, teacher_hash: str,
                   progress: Progress | None = None,
                   on_sample: Callable[[int, int], None] | None = None) -> list[CycleSample]:
    """All cycle samples of the request's stores (flow and teacher stages computed where missing)."""
    progress = progress or QuietProgress()
    method = WarpInpaint(request.propagation)
    plan: list[tuple[SequenceStore, str, int, int, int]] = []
    classes = None
    every_id: list[str] = []
    rng = np.random.default_rng(request.train.seed)
    flow_stage = FlowStage(flow=request.flow)
    teacher_stage = TeacherStage(teacher=str(request.teacher),
                                 teacher_map=str(request.teacher_map) if request.teacher_map else None,
                                 adapt_steps=request.adapt_steps,
                                 on_device=request.train.device)
    for url in request.stores:
        store = SequenceStore.open(url, mode="r+")
        if classes is not None and store.classes != classes:
            raise ClassSetMismatchError(f"store {url!r} has classes {store.classes.names}, the first store "
                                        f"{classes.names}; train one refiner per class set")
        classes = store.classes
        teacher.check_classes(store.classes.names, store.classes.ignore_index, f"store {url!r}")
        store_plan: list[tuple[SequenceStore, str, int, int, int]] = []
        every_id.extend(store.sequence_ids())
        ids = select_ids(store.sequence_ids(), request.sequences, f"store {url!r}", must_match=False)
        for seq_id in ids:
            seq = store.sequence(seq_id)
            cycles = list(cycle_plan(seq.annotated, request.train.max_cycle))
            if not cycles:
                continue  # single frames (e.g. CamVid train keyframes) have no neighbours
            flow_stage.run(store, seq_id, progress)
            # teacher output of this checkpoint is reused whatever its adaptation (labelling may have
            # adapted it per sequence); otherwise it is computed with ``adapt_steps``
            if seq.stages.get(TEACHER, {}).get("settings", {}).get("checkpoint_sha256") != teacher_hash:
                teacher_stage.run(store, seq_id, progress)
            store_plan.extend((store, seq_id, t, length, d) for t, length, d in cycles)
        if request.max_samples is not None and len(store_plan) > request.max_samples:
            keep = np.sort(rng.choice(len(store_plan), request.max_samples, replace=False))
            store_plan = [store_plan[int(i)] for i in keep]
        plan.extend(store_plan)
    select_ids(every_id, request.sequences, f"stores {request.stores}")  # a pattern matching nothing is an error
    if not plan:
        raise ConfigError(f"no annotated frame with neighbouring frames in {request.stores}: the refiner trains on "
                          "cycles through video, so give it stores of sequences (not single keyframes)")
    samples: list[CycleSample] = []
    inputs: StoreSequenceInputs | None = None
    for i, (store, seq_id, t, length, direction) in enumerate(plan):
        if inputs is None or inputs.seq.id != seq_id or inputs.seq.store is not store:
            inputs = StoreSequenceInputs(store.sequence(seq_id), request.flow.stored_name, need_teacher=True)
        samples.append(cycle_sample(method, inputs, t, length, direction))
        if on_sample is not None:
            on_sample(i + 1, len(plan))
    return samples


def train_refiner_from_stores(request: RefinerRequest, progress: Progress | None = None,
                              on_sample: Callable[[int, int], None] | None = None,
                              on_step: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """Generate cycles, train a refiner, save it to ``request.out``; returns the training summary."""
    check_checkpoint_path(request.out, "refiner")
    first = SequenceStore.open(request.stores[0])
    teacher = load_teacher(request.teacher, request.train.device, request.teacher_map, first.classes.names)
    teacher_hash = teacher_sha256(request.teacher, request.teacher_map)
    samples = collect_cycles(request, teacher, teacher_hash, progress, on_sample)
    torch.manual_seed(request.train.seed)  # the initial weights too: the same --seed, the same checkpoint
    refiner = Refiner.create(request.train.arch, teacher.classes, teacher.feature_channels, teacher_hash,
                             teacher.ignore_index, teacher.feature_kind)
    state = TrainingState(state_path_for(request.out), run_settings(request.train, {
        "stores": list(request.stores), "sequences": request.sequences, "teacher_sha256": teacher_hash,
        "flow": request.flow.stored_name, "adapt_steps": request.adapt_steps, "max_samples": request.max_samples,
        "samples": len(samples)}), request.train.state_every_s)
    info = train_refiner(refiner, teacher, samples, request.train, on_step, state)
    info["fit"] = score_on_samples(refiner, teacher, samples)
    info["cycles"] = {str(k): int(v) for k, v in zip(*np.unique([s.length for s in samples], return_counts=True))}
    info["stores"] = list(request.stores)
    # the keyframes whose cycles it learnt from: their own cycles would flatter it (quality estimates skip them)
    info["keyframes"] = sorted({annotation_fingerprint(s.annotation) for s in samples})
    info["flow"] = request.flow.stored_name
    refiner.train_info = info
    info["sha256"] = refiner.save(request.out)
    state.remove()
    return info
