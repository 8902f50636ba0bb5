"""Label a store: for each sequence, flow -> teacher inference -> propagation, failures isolated."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from autolabel.errors import AutolabelError, ConfigError
from models.optical_flow import FlowConfig, FlowEstimator
from models.propagation import PropagationConfig, count_steps, method_class
from models.refiner import Refiner
from models.teacher import Teacher, file_sha256
from storage.ids import select_ids
from storage.store import SequenceStore
from tasks.flow_estimation import estimate_flow
from tasks.propagate import label_sequence
from tasks.teacher_inference import infer_teacher


class LabelRequest(BaseModel):
    """Everything ``autolabel label`` needs."""

    model_config = ConfigDict(frozen=True)

    propagation: PropagationConfig = PropagationConfig()
    flow: FlowConfig = FlowConfig()
    teacher: Path | None = None
    refiner: Path | None = None
    adapt_steps: int = Field(0, ge=0)
    sequences: list[str] | None = None


@dataclass
class LabelOutcome:
    id: str
    status: Literal["labelled", "skipped", "failed"]
    seconds: float = 0.0
    error: str | None = None


@dataclass
class LabelReport:
    store: str
    method: str
    outcomes: list[LabelOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[LabelOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


class LabelProgress(Protocol):
    def stage(self, seq_id: str, stage: str, total: int) -> None: ...
    def advance(self) -> None: ...


class _Quiet:
    def stage(self, seq_id: str, stage: str, total: int) -> None:
        pass

    def advance(self) -> None:
        pass


def load_teacher_for(request: LabelRequest, store: SequenceStore) -> tuple[Teacher | None, str | None]:
    """The teacher the method needs (checked against the store's classes), and its sha256."""
    method = method_class(request.propagation.method)
    if not method.needs_teacher:
        return None, None
    if request.teacher is None:
        raise ConfigError(f"method {request.propagation.method!r} needs a teacher: pass --teacher CHECKPOINT "
                          "(train one with `autolabel train-teacher --store ... --out teacher.pt`)")
    teacher = Teacher.load(request.teacher, request.propagation.device)
    teacher.check_classes(store.classes.names, store.classes.ignore_index, f"store {store.url!r}")
    return teacher, file_sha256(request.teacher)


def load_refiner_for(request: LabelRequest, store: SequenceStore,
                     teacher_hash: str | None) -> tuple[Refiner | None, str | None]:
    """The refiner warp-refine needs (checked against the store's classes and the teacher), and its sha256."""
    if not method_class(request.propagation.method).needs_refiner:
        return None, None
    if request.refiner is None:
        raise ConfigError(f"method {request.propagation.method!r} needs a refiner: pass --refiner CHECKPOINT "
                          "(train one with `autolabel train-refiner --store ... --teacher ... --out refiner.pt`)")
    refiner = Refiner.load(request.refiner, request.propagation.device)
    refiner.check_compatible(store.classes.names, teacher_hash or "", f"store {store.url!r}")
    return refiner, file_sha256(request.refiner)


def prepare_sequence(store: SequenceStore, seq_id: str, flow: FlowConfig | None, estimator: FlowEstimator | None,
                     teacher: Teacher | None, teacher_hash: str | None, adapt_steps: int,
                     progress: LabelProgress) -> None:
    """The stages propagation reads: flow (when ``flow`` is given) and teacher output (when a teacher is).

    Both skip when their stored output already has the same settings.
    """
    seq = store.sequence(seq_id)
    if flow is not None:
        progress.stage(seq_id, f"flow {flow.stored_name}", seq.num_frames - 1)
        estimate_flow(store, seq_id, flow, estimator, progress.advance)
    if teacher is not None and teacher_hash is not None:
        progress.stage(seq_id, "teacher", seq.num_frames)
        infer_teacher(store, seq_id, teacher, teacher_hash, adapt_steps=adapt_steps, on_frame=progress.advance)


def label_store(store_url: str, request: LabelRequest, progress: LabelProgress | None = None) -> LabelReport:
    """Label every (selected) sequence; one failing sequence never stops the others."""
    progress = progress or _Quiet()
    store = SequenceStore.open(store_url, mode="r+")
    teacher, teacher_hash = load_teacher_for(request, store)
    refiner, refiner_hash = load_refiner_for(request, store, teacher_hash)
    method = method_class(request.propagation.method)
    ids = select_ids(store.sequence_ids(), request.sequences, f"store {store_url!r}")
    report = LabelReport(store=store_url, method=request.propagation.method)
    estimator: FlowEstimator | None = None
    try:
        for seq_id in ids:
            start = time.perf_counter()
            try:
                seq = store.sequence(seq_id)
                flow_name = request.flow.stored_name if method.needs_flow else None
                if method.needs_flow and estimator is None and request.flow.backend != "exact":
                    estimator = FlowEstimator(request.flow)
                prepare_sequence(store, seq_id, request.flow if method.needs_flow else None, estimator,
                                 teacher, teacher_hash, request.adapt_steps, progress)
                progress.stage(seq_id, request.propagation.method,
                               count_steps(seq.annotated, request.propagation.max_distance))
                done = label_sequence(store, seq_id, request.propagation, flow_name, on_step=progress.advance,
                                      refiner=refiner, refiner_sha256=refiner_hash, feature_teacher=teacher)
                report.outcomes.append(LabelOutcome(seq_id, "labelled" if done else "skipped",
                                                    time.perf_counter() - start))
            except AutolabelError as exc:
                report.outcomes.append(LabelOutcome(seq_id, "failed", time.perf_counter() - start, str(exc)))
    finally:
        if estimator is not None:
            estimator.close()
    return report
