"""The per-sequence labelling pipeline, written once.

    ingest (if the drive comes from an inbox) -> flow -> teacher -> propagate (each method)
    -> evaluate -> export (if asked)

:func:`sequence_stages` lists the stages a request needs; each stage is a small pydantic value
(so a Prefect task can take it as a parameter and hash it into a cache key) that owns its
currency check (:meth:`Stage.is_current`: does the store hold this stage's output made with
exactly these settings?) and its work (:meth:`Stage.run`, which skips when current).
:func:`label_sequence` runs them in order through a *runner*: :func:`run_stage` calls the stage
directly (the CLI), ``autolabel.flows.label_sequence`` submits each as a Prefect task. Nothing
else in the code chains the stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from autolabel.models.optical_flow import FlowConfig
from autolabel.progress import Progress, QuietProgress
from autolabel.models.propagation import PropagationConfig, count_frame_steps, count_steps, method_class
from autolabel.models.quality import EstimateConfig, estimate_plan, probe_steps, split_probes
from autolabel.models.segments import Segment
from autolabel.models.teacher import Teacher
from autolabel.storage import feature_scratch
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.export import export_is_current, export_sequence
from autolabel.storage.ids import select_ids
from autolabel.storage.ingest import IngestOptions, ingest
from autolabel.storage.integrity import check_sequence
from autolabel.storage.readers import read_dataset
from autolabel.storage.stages import (
    INGEST,
    LABELLED,
    TEACHER,
    estimate_stage,
    flow_stage,
    results_stage,
)
from autolabel.storage.store import SequenceStore
from autolabel.tasks.checkpoints import checkpoint_sha256, load_refiner, load_teacher, teacher_files, teacher_sha256
from autolabel.tasks.evaluate import (
    SequenceEvaluation,
    evaluate_segment,
    evaluate_sequence,
    evaluation_is_current,
)
from autolabel.tasks.flow_estimation import estimate_flow, estimate_flow_segment, flow_is_current
from autolabel.tasks.estimate import (
    estimate_is_current,
    estimate_methods,
    estimate_part,
    estimate_parts,
    propagate_and_estimate,
    resumed_steps,
)
from autolabel.tasks.propagate import propagate_methods, propagate_segment_methods, results_are_current
from autolabel.tasks.teacher_inference import infer_teacher, infer_teacher_segment, teacher_is_current
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from autolabel.errors import (
    AutolabelError,
    ConfigError,
    InputDataError,
    describe_os_error,
)

DEVICES = ("cpu", "cuda")
log = logging.getLogger("autolabel.pipeline")


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; anything else is a ConfigError listing those."""
    if device.split(":")[0] not in DEVICES or (":" in device and not device.split(":", 1)[1].isdigit()):
        raise ConfigError(f"unknown device {device!r}; use one of cpu, cuda, cuda:N")
    return device


def check_device_available(device: str) -> str:
    """``device`` if this machine has it, else a ConfigError saying what to use (checked where work runs:
    a deployment's settings name the GPU workers' device, and the parent may run on a CPU machine)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"--device {device}: CUDA is not available here ({why}); use --device cpu, "
                              "or run on a GPU worker")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


# --- what to do ----------------------------------------------------------------------------------


class DriveSource(BaseModel):
    """Where a drive is ingested from before labelling (an inbox folder of a dataset layout)."""

    model_config = ConfigDict(frozen=True)

    inbox: str
    layout: str = "apollo"
    annotation: AnnotationPolicy = AnnotationPolicy()


class LabelSettings(BaseModel):
    """How to label a sequence: one method, one K, one device, the checkpoints and each stage's settings.

    The method and K are ``propagation.method`` and ``propagation.max_distance``; the device is
    ``device`` and is handed to the flow and propagation settings (setting another device there is
    an error).
    """

    model_config = ConfigDict(frozen=True)

    propagation: PropagationConfig = Field(PropagationConfig(method="warp-refine"),
                                           description="method, K (max_distance) and its settings")
    flow: FlowConfig = FlowConfig()
    teacher: str | None = Field(None, description="teacher: checkpoint .pt, torch.export .pt2 or .onnx with its "
                                                  "JSON sidecar (on every worker)")
    teacher_map: str | None = Field(None, description="JSON mapping of the teacher's classes onto the store's "
                                                      "(unmapped -> unknown)")
    refiner: str | None = Field(None, description="refiner checkpoint path (warp-refine)")
    adapt_steps: int = Field(0, ge=0, description="fine-tune the teacher on each sequence's annotations first")
    device: str = Field("cpu", description="cpu, cuda or cuda:N, for every stage")
    estimate: EstimateConfig = Field(EstimateConfig(), description="quality estimate without ground truth (cycles)")
    compare_with_warp_inpaint: bool = Field(
        True, description="warp-refine: also store warp-inpaint, so its gain can be shown")
    export_dir: str | None = Field(None, description="write index / colour / overlay PNGs of the method here")
    teacher_feature_scratch_mb: int | None = Field(
        None, ge=0, description="warp-refine: keep the features the teacher stage computes for the refiner "
                                "in a temporary file of at most this many MB, instead of computing them "
                                "again (None: 2048 on CPU, 0 on CUDA, where a second pass is cheaper)")
    segment_frames: int = Field(
        0, ge=0, description="split drives longer than this many frames into segments labelled as separate jobs "
                             "(whole shards; 0: one job per drive)")
    parallel_flow_pairs: int = Field(
        64, ge=2, description="flows: sequences with at least this many frame pairs compute their flow in pieces "
                              "on dask")
    dask_address: str | None = Field(None, description="flows: existing Dask scheduler for the flow pieces "
                                                        "(default: $AUTOLABEL_DASK_ADDRESS, else a LocalCluster)")

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        return check_device(device)

    @model_validator(mode="after")
    def _one_device_and_checkpoints(self) -> Self:
        for name in ("propagation", "flow"):
            config = getattr(self, name)
            if "device" in config.model_fields_set and config.device != self.device:
                raise ConfigError(f"{name}.device is {config.device!r} but the device is {self.device!r}; "
                                  "set the device once (LabelSettings.device, --device)")
            object.__setattr__(self, name, config.model_copy(update={"device": self.device}))
        cls = method_class(self.method)
        if cls.needs_teacher and not self.teacher:
            raise ConfigError(f"method {self.method!r} needs a teacher checkpoint: pass --teacher CHECKPOINT "
                              "(train one with `autolabel train-teacher --store ... --out teacher.pt`)")
        if self.teacher_map and not self.teacher:
            raise ConfigError("a class mapping (--teacher-map) needs a teacher (--teacher)")
        if self.segment_frames and self.adapt_steps:
            raise ConfigError("--segment-frames needs --adapt-steps 0: each segment job would adapt its own copy of "
                              "the teacher")
        if cls.needs_refiner and not self.refiner:
            raise ConfigError(f"method {self.method!r} needs a refiner checkpoint: pass --refiner CHECKPOINT "
                              "(train one with `autolabel train-refiner --store ... --teacher ... --out refiner.pt`)")
        return self

    @property
    def method(self) -> str:
        return self.propagation.method

    @property
    def max_distance(self) -> int:
        return self.propagation.max_distance

    @property
    def methods(self) -> list[str]:
        """Methods stored for each sequence: warp-refine runs after (and is compared with) warp-inpaint."""
        if self.method == "warp-refine" and self.compare_with_warp_inpaint:
            return ["warp-inpaint", "warp-refine"]
        return [self.method]

    @property
    def needs_flow(self) -> bool:
        return any(method_class(m).needs_flow for m in self.methods)

    @property
    def needs_teacher(self) -> bool:
        return any(method_class(m).needs_teacher for m in self.methods)

    @property
    def teacher_feature_scratch_bytes(self) -> int:
        """Bytes of teacher features the teacher stage keeps for warp-refine (0: none)."""
        if not method_class(self.method).needs_refiner or self.adapt_steps:
            return 0
        mb = self.teacher_feature_scratch_mb
        if mb is None:
            mb = 0 if self.device.startswith("cuda") else 2048
        return mb * 2**20

    def digest(self) -> str:
        """A short hash of the settings (idempotency keys, change detection)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


# --- the stages ------------------------------------------------------------------------------------


class Stage(BaseModel, ABC):
    """One stage of the pipeline for one sequence: its settings, currency check and work."""

    model_config = ConfigDict(frozen=True)

    kind: str
    TASK: ClassVar[str] = ""
    uses_gpu: ClassVar[bool] = False

    @property
    def task_name(self) -> str:
        """The Prefect task name this stage runs under (``flow-estimation``, ``refine`` ...)."""
        return self.TASK

    @property
    @abstractmethod
    def title(self) -> str:
        """What the stage is, for progress and logs (e.g. ``flow dis-fast``, ``warp-refine``)."""

    @property
    @abstractmethod
    def output(self) -> str:
        """The store stage it writes (``flow/dis-fast``, ``teacher``, ``results/warp-refine`` ...)."""

    @abstractmethod
    def is_current(self, store: SequenceStore, seq_id: str) -> bool:
        """Whether the store already holds this stage's output made with exactly these settings."""

    @abstractmethod
    def run(self, store: SequenceStore, seq_id: str, progress: Progress) -> dict[str, Any]:
        """Do the work unless current; returns at least ``{"computed": bool}``."""

    @property
    def device(self) -> str:
        return "cpu"

    segmentable: ClassVar[bool] = False
    whole_drive: ClassVar[bool] = False  # segmentable, but its jobs cover the whole drive, not segments

    def parts(self, store: SequenceStore, seq_id: str, segments: int) -> int:
        """How many jobs share a whole-drive stage's work on a drive cut into ``segments``."""
        return 1

    def run_segment(self, store: SequenceStore, seq_id: str, segment: Segment, plan_key: str, segments: int,
                    progress: Progress) -> dict[str, Any]:
        """Do this stage's work for the frames ``segment`` owns (``models.segments``); per-drive stages cannot."""
        raise ConfigError(f"stage {self.title!r} runs on a whole drive, not per segment")

    def checkpoints(self) -> list[str]:
        """Checkpoint files whose content the output depends on (hashed into cache keys)."""
        return []


class IngestStage(Stage):
    kind: Literal["ingest"] = "ingest"
    source: DriveSource
    TASK: ClassVar[str] = "ingest-drive"

    @property
    def title(self) -> str:
        return "ingest"

    @property
    def output(self) -> str:
        return INGEST

    def _drive(self, seq_id: str) -> Any:
        dataset = read_dataset(self.source.layout, Path(self.source.inbox))
        for drive in dataset.sequences:
            if drive.id == seq_id:
                return dataset, drive
        raise InputDataError(f"drive {seq_id!r} is not in inbox {self.source.inbox} (layout {self.source.layout!r})")

    def is_current(self, store: SequenceStore, seq_id: str) -> bool:
        if seq_id not in store:
            return False
        stored = store.sequence(seq_id).source_fingerprint
        return stored is not None and stored == self._drive(seq_id)[1].fingerprint()

    def run(self, store: SequenceStore, seq_id: str, progress: Progress) -> dict[str, Any]:
        dataset, drive = self._drive(seq_id)
        progress.start(seq_id, self.title, len(drive))
        report = ingest(dataset, store.url, IngestOptions(annotation=self.source.annotation, sequences=[seq_id],
                                                          replace_changed=True))
        if report.failed:
            raise InputDataError(f"drive {seq_id!r} of inbox {self.source.inbox}: {report.failed[0].error}")
        return {"computed": report.outcomes[0].status == "ingested"}


class FlowStage(Stage):
    kind: Literal["flow"] = "flow"
    flow: FlowConfig
    TASK: ClassVar[str] = "flow-estimation"

    @property
    def title(self) -> str:
        return f"flow {self.flow.stored_name}"

    @property
    def output(self) -> str:
        return flow_stage(self.flow.stored_name)

    def is_current(self, store: SequenceStore, seq_id: str) -> bool:
        return flow_is_current(store.sequence(seq_id), self.flow)

    def run(self, store: SequenceStore, seq_id: str, progress: Progress) -> dict[str, Any]:
        progress.start(seq_id, self.title, store.sequence(seq_id).num_frames - 1)
        return {"computed": estimate_flow(store, seq_id, self.flow, None, progress.advance)}

    segmentable: ClassVar[bool] = True

    def run_segment(self, store: SequenceStore, seq_id: str, segment: Segment, plan_key: str, segments: int,
                    progress: Progress) -> dict[str, Any]:
        a, b = segment.pairs(store.sequence(seq_id).num_frames)
        progress.start(seq_id, f"{self.title} [{segment.start}:{segment.stop}]", max(b - a, 0))
        return {"computed": estimate_flow_segment(store, seq_id, self.flow, segment, plan_key, segments,
                                                  progress.advance)}


class TeacherStage(Stage):
    kind: Literal["teacher"] = "teacher"
    teacher: str
    teacher_map: str | None = None
    adapt_steps: int = 0
    on_device: str = "cpu"
    keep_features_bytes: int = 0  # for warp-refine's refiner in this process (storage.feature_scratch)
    TASK: ClassVar[str] = "teacher-inference"
    uses_gpu: ClassVar[bool] = True

    @property
    def title(self) -> str:
        return "teacher"

    @property
    def output(self) -> str:
        return TEACHER

    @property
    def device(self) -> str:
        return self.on_device

    def checkpoints(self) -> list[str]:
        return teacher_files(self.teacher, self.teacher_map)

    def is_current(self, store: SequenceStore, seq_id: str) -> bool:
        return teacher_is_current(store.sequence(seq_id), teacher_sha256(self.teacher, self.teacher_map),
                                  self.adapt_steps)

    def run(self, store: SequenceStore, seq_id: str, progress: Progress) -> dict[str, Any]:
        progress.start(seq_id, self.title, store.sequence(seq_id).num_frames)
        computed = infer_teacher(store, seq_id,
                                 load_teacher(self.teacher, self.device, self.teacher_map, store.classes.names),
                                 teacher_sha256(self.teacher, self.teacher_map), adapt_steps=self.adapt_steps,
                                 on_frame=progress.advance, keep_features_bytes=self.keep_features_bytes)
        return {"computed": computed}

    segmentable: ClassVar[bool] = True

    def run_segment(self, store: SequenceStore, seq_id: str, segment: Segment, plan_key: str, segments: int,
                    progress: Progress) -> dict[str, Any]:
        if self.adapt_steps > 0:
            raise ConfigError("a drive labelled in segments cannot adapt the teacher per sequence (--adapt-steps); "
                              "use --adapt-steps 0 or --segment-frames 0")
        progress.start(seq_id, f"{self.title} [{segment.start}:{segment.stop}]", segment.frames)
        computed = infer_teacher_segment(store, seq_id,
                                         load_teacher(self.teacher, self.device, self.teacher_map, store.classes.names),
                                         teacher_sha256(self.teacher, self.teacher_map), segment, plan_key, segments,
                                         on_frame=progress.advance, keep_features_bytes=self.keep_features_bytes)
        return {"computed": computed}


class MethodStage(Stage, ABC):
    """What a propagation method's stages share: the method, its inputs and checkpoints, and
    ``also``, a second method run in the same pass where its output is due too."""

    propagation: PropagationConfig
    also: PropagationConfig | None = None
    flow_name: str | None = None
    teacher: str | None = None
    teacher_map: str | None = None
    refiner: str | None = None
    uses_gpu: ClassVar[bool] = True

    @property
    def device(self) -> str:
        return self.propagation.device

    def checkpoints(self) -> list[str]:
        return [*(teacher_files(self.teacher, self.teacher_map) if self.teacher else []),
                *([self.refiner] if self.refiner else [])]

    def _refiner_hash(self) -> str | None:
        return checkpoint_sha256(self.refiner) if self.refiner else None

    def _networks(self, store: SequenceStore, needed: bool = True) -> tuple[Any, Any]:
        """(refiner, the teacher computing its features) for warp-refine when ``needed``, else (None, None)."""
        if self.refiner is None or self.teacher is None or not needed:
            return None, None
        return (load_refiner(self.refiner, self.device, store.classes.names, self.teacher, f"store {store.url!r}",
                             self.teacher_map),
                load_teacher(self.teacher, self.device, self.teacher_map, store.classes.names))

    @abstractmethod
    def _output_of(self, method: str) -> str:
        """The store stage this kind of stage writes for ``method``."""

    @property
    def output(self) -> str:
        return self._output_of(self.propagation.method)

    def _outcome(self, computed: list[bool]) -> dict[str, Any]:
        """Whether this stage's method computed, and where ``also`` ran, whether its output did."""
        if len(computed) < 2 or self.also is None:
            return {"computed": computed[0]}
        return {"computed": computed[0], "also": self._output_of(self.also.method), "also_computed": computed[1]}


class PropagateStage(MethodStage):
    """One method's results; with ``also``, another method's written in the same pass when both are
    due (warp-inpaint beside warp-refine: each step's inputs read once, one trust check for both),
    which that method's own stage then finds current."""

    kind: Literal["propagate"] = "propagate"
    # where set, the estimate of each method propagated over the whole drive is made in the same pass
    # (its held-out probes resume from the propagation's chains); the estimate stage then finds it current
    estimate: EstimateConfig | None = None

    @property
    def task_name(self) -> str:
        return "refine" if self.propagation.method == "warp-refine" else self.propagation.method

    @property
    def title(self) -> str:
        return self.propagation.method

    def _output_of(self, method: str) -> str:
        return results_stage(method)

    def is_current(self, store: SequenceStore, seq_id: str) -> bool:
        return results_are_current(store.sequence(seq_id), self.propagation, self.flow_name, self._refiner_hash())

    def _configs(self, store: SequenceStore, seq_id: str) -> list[PropagationConfig]:
        """This stage's method, then ``also`` where its results are due too."""
        also = self.also
        if also is None or results_are_current(store.sequence(seq_id), also, self.flow_name, self._refiner_hash()):
            return [self.propagation]
        return [self.propagation, also]

    def run(self, store: SequenceStore, seq_id: str, progress: Progress) -> dict[str, Any]:
        seq = store.sequence(seq_id)
        configs = self._configs(store, seq_id)
        refiner, feature_teacher = self._networks(store)
        probing = resumed_steps(seq, configs, self.flow_name, self.estimate, refiner, self._refiner_hash()) \
            if self.estimate is not None else 0
        progress.start(seq_id, " + ".join(c.method for c in configs) + (" + estimate" if probing else ""),
                       count_steps(seq.annotated, self.propagation.max_distance) * len(configs) + probing)
        if self.estimate is None:
            computed = propagate_methods(store, seq_id, configs, self.flow_name, on_step=progress.advance,
                                         refiner=refiner, refiner_sha256=self._refiner_hash(),
                                         feature_teacher=feature_teacher)
            return self._outcome(computed)
        computed, estimated = propagate_and_estimate(store, seq_id, configs, self.flow_name, self.estimate,
                                                     on_step=progress.advance, refiner=refiner,
                                                     refiner_sha256=self._refiner_hash(),
                                                     feature_teacher=feature_teacher)
        return {**self._outcome(computed),
                "estimated": [estimate_stage(c.method) for c, done in zip(configs, estimated) if done]}

    segmentable: ClassVar[bool] = True

    def run_segment(self, store: SequenceStore, seq_id: str, segment: Segment, plan_key: str, segments: int,
                    progress: Progress) -> dict[str, Any]:
        seq = store.sequence(seq_id)
        window = seq.annotated[segment.span_start:segment.span_stop]
        owned = (segment.start - segment.span_start, segment.stop - segment.span_start)
        configs = self._configs(store, seq_id)
        progress.start(seq_id, f"{' + '.join(c.method for c in configs)} [{segment.start}:{segment.stop}]",
                       count_frame_steps(window, self.propagation.max_distance, owned) * len(configs))
        refiner, feature_teacher = self._networks(store)
        computed = propagate_segment_methods(store, seq_id, configs, self.flow_name, segment, plan_key, segments,
                                             on_step=progress.advance, refiner=refiner,
                                             refiner_sha256=self._refiner_hash(), feature_teacher=feature_teacher)
        return self._outcome(computed)


class EstimateStage(MethodStage):
    """Calibrate a method's confidence on its keyframes' probes (:mod:`tasks.estimate`); with
    ``also``, that method's too, its probes stepped beside these."""

    kind: Literal["estimate"] = "estimate"
    estimate: EstimateConfig = EstimateConfig()
    TASK: ClassVar[str] = "estimate"

    @property
    def title(self) -> str:
        return f"estimate {self.propagation.method}"

    def _output_of(self, method: str) -> str:
        return estimate_stage(method)

    def is_current(self, store: SequenceStore, seq_id: str) -> bool:
        return estimate_is_current(store.sequence(seq_id), self.propagation.method, self.estimate)

    def _configs(self, store: SequenceStore, seq_id: str) -> list[PropagationConfig]:
        """This stage's method, then ``also`` where its results are stored and its estimate is due."""
        seq, also = store.sequence(seq_id), self.also
        if also is None or estimate_is_current(seq, also.method, self.estimate) \
                or not results_are_current(seq, also, self.flow_name, self._refiner_hash()):
            return [self.propagation]
        return [self.propagation, also]

    def run(self, store: SequenceStore, seq_id: str, progress: Progress) -> dict[str, Any]:
        seq = store.sequence(seq_id)
        current = self.is_current(store, seq_id)
        configs = self._configs(store, seq_id)
        due = [c for c in configs if not estimate_is_current(seq, c.method, self.estimate)]
        progress.start(seq_id, "estimate " + " + ".join(c.method for c in configs),
                       len(due) * probe_steps(estimate_plan(seq.annotated, self.estimate,
                                                            self.propagation.max_distance)))
        refiner, feature_teacher = self._networks(store, needed=not current)
        computed = estimate_methods(store, seq_id, configs, self.flow_name, self.estimate, refiner=refiner,
                                    feature_teacher=feature_teacher, on_step=progress.advance)
        return self._outcome(computed)

    segmentable: ClassVar[bool] = True
    whole_drive: ClassVar[bool] = True  # its probes start at keyframes anywhere: jobs share probes, not frames

    def parts(self, store: SequenceStore, seq_id: str, segments: int) -> int:
        return estimate_parts(store.sequence(seq_id), self.propagation, self.estimate, segments)

    def run_segment(self, store: SequenceStore, seq_id: str, segment: Segment, plan_key: str, segments: int,
                    progress: Progress) -> dict[str, Any]:
        """Part ``segment.index`` of ``segments`` of the probes (:func:`~tasks.estimate.estimate_part`);
        with ``also``, that method's part too, its probes stepped beside these."""
        seq = store.sequence(seq_id)
        current = self.is_current(store, seq_id)
        configs = self._configs(store, seq_id)
        due = [c for c in configs if not estimate_is_current(seq, c.method, self.estimate)]
        plan = estimate_plan(seq.annotated, self.estimate, self.propagation.max_distance)
        mine = split_probes(plan, segments)[segment.index] if plan else []
        progress.start(seq_id, f"estimate {' + '.join(c.method for c in configs)} [{segment.index + 1}/{segments}]",
                       len(due) * probe_steps([plan[i] for i in mine]))
        refiner, feature_teacher = self._networks(store, needed=not current)
        computed = estimate_part(store, seq_id, configs, self.flow_name, self.estimate, segment.index,
                                 segments, plan_key, refiner=refiner, feature_teacher=feature_teacher,
                                 on_step=progress.advance)
        return self._outcome(computed)


class EvaluateStage(Stage):
    kind: Literal["evaluate"] = "evaluate"
    methods: list[str]
    max_distance: int
    TASK: ClassVar[str] = "evaluate"

    @property
    def title(self) -> str:
        return "evaluate"

    @property
    def output(self) -> str:
        return "evaluation"

    def is_current(self, store: SequenceStore, seq_id: str) -> bool:
        return evaluation_is_current(store.sequence(seq_id), self.methods, self.max_distance)

    def run(self, store: SequenceStore, seq_id: str, progress: Progress) -> dict[str, Any]:
        current = self.is_current(store, seq_id)
        progress.start(seq_id, self.title, 0 if current else store.sequence(seq_id).num_frames * len(self.methods))
        rows = evaluate_sequence(store, seq_id, self.methods, self.max_distance, progress.advance)
        return {"computed": not current, "evaluation": {r.method: r.model_dump() for r in rows}}

    segmentable: ClassVar[bool] = True

    def run_segment(self, store: SequenceStore, seq_id: str, segment: Segment, plan_key: str, segments: int,
                    progress: Progress) -> dict[str, Any]:
        progress.start(seq_id, f"{self.title} [{segment.start}:{segment.stop}]", segment.frames * len(self.methods))
        return {"computed": evaluate_segment(store, seq_id, self.methods, self.max_distance, segment, plan_key,
                                             segments, progress.advance)}


class ExportStage(Stage):
    kind: Literal["export"] = "export"
    method: str
    out_dir: str
    TASK: ClassVar[str] = "export"

    @property
    def title(self) -> str:
        return f"export {self.method}"

    @property
    def output(self) -> str:
        return "export"

    def is_current(self, store: SequenceStore, seq_id: str) -> bool:
        return export_is_current(store.sequence(seq_id), self.method, Path(self.out_dir))

    def run(self, store: SequenceStore, seq_id: str, progress: Progress) -> dict[str, Any]:
        with store.lease(seq_id, "export"):  # one writer of this sequence's export folder
            seq = store.sequence(seq_id)
            if self.is_current(store, seq_id):
                return {"computed": False, "exported": str(Path(self.out_dir) / seq_id)}
            progress.start(seq_id, self.title, seq.num_frames)
            export_sequence(seq, self.method, Path(self.out_dir), with_overlay=True, on_frame=progress.advance)
        return {"computed": True, "exported": str(Path(self.out_dir) / seq_id)}


AnyStage = IngestStage | FlowStage | TeacherStage | PropagateStage | EstimateStage | EvaluateStage | ExportStage


def sequence_stages(settings: LabelSettings, source: DriveSource | None = None) -> list[Stage]:
    """The stages that label one sequence with ``settings``, in order."""
    stages: list[Stage] = []
    if source is not None:
        stages.append(IngestStage(source=source))
    flow_name = settings.flow.stored_name if settings.needs_flow else None
    if settings.needs_flow:
        stages.append(FlowStage(flow=settings.flow))
    if settings.needs_teacher:
        assert settings.teacher is not None  # LabelSettings checks it
        stages.append(TeacherStage(teacher=settings.teacher, teacher_map=settings.teacher_map,
                                   adapt_steps=settings.adapt_steps,
                                   on_device=settings.device,
                                   keep_features_bytes=settings.teacher_feature_scratch_bytes))
    # the method itself first: where warp-inpaint is stored for comparison, warp-refine's stage writes
    # it in the same pass (PropagateStage.also) and warp-inpaint's own stage finds it current
    methods = [settings.method, *(m for m in settings.methods if m != settings.method)]
    for method in methods:
        cls = method_class(method)
        inputs = {"propagation": settings.propagation.model_copy(update={"method": method}),
                  "flow_name": flow_name if cls.needs_flow else None,
                  "teacher": settings.teacher if cls.needs_teacher else None,
                  "teacher_map": settings.teacher_map if cls.needs_teacher else None,
                  "refiner": settings.refiner if cls.needs_refiner else None}
        others = [settings.propagation.model_copy(update={"method": m}) for m in settings.methods if m != method]
        also = others[0] if method == settings.method and len(others) == 1 else None
        stages.append(PropagateStage(also=also, estimate=settings.estimate if settings.estimate.enabled else None,
                                     **inputs))
        if settings.estimate.enabled:
            stages.append(EstimateStage(estimate=settings.estimate, also=also, **inputs))
    stages.append(EvaluateStage(methods=settings.methods, max_distance=settings.max_distance))
    if settings.export_dir:
        stages.append(ExportStage(method=settings.method, out_dir=settings.export_dir))
    return stages


# --- running them ----------------------------------------------------------------------------------


def worker_name() -> str:
    """Who runs this: ``$AUTOLABEL_WORKER_NAME`` (set by deploy/start-workers.sh) or ``local-<host>``."""
    return os.environ.get("AUTOLABEL_WORKER_NAME") or f"local-{socket.gethostname()}"


def run_stage(store_url: str, seq_id: str, stage: Stage, progress: Progress | None = None) -> dict[str, Any]:
    """Run one stage here and now; the result names the output stage, whether it computed and how long."""
    start = time.perf_counter()
    store = SequenceStore.open(store_url, mode="r+")
    result = stage.run(store, seq_id, progress or QuietProgress())
    return {"stage": stage.output, "seconds": round(time.perf_counter() - start, 2), "worker": worker_name(),
            "cached": False, **result}


StageRunner = Callable[[str, str, Stage], dict[str, Any]]


def direct_runner(progress: Progress | None = None) -> StageRunner:
    """A runner calling each stage in this process (the CLI's)."""
    return lambda store, seq_id, stage: run_stage(store, seq_id, stage, progress)


def label_sequence(store_url: str, seq_id: str, settings: LabelSettings, source: DriveSource | None = None,
                   runner: StageRunner | None = None, marker: dict[str, Any] | None = None) -> dict[str, Any]:
    """Label one sequence: every stage of :func:`sequence_stages` through ``runner`` (default: here).

    Marks the sequence ``labelled`` (with the worker, the settings digest and ``marker``) at the
    end. Raises an AutolabelError naming the sequence on bad input; nothing else is touched.
    """
    runner = runner or direct_runner()
    check_device_available(settings.device)
    if seq_id in (store := SequenceStore.open(store_url, mode="r+")):
        for stage in check_sequence(store, seq_id):  # missing chunks: damaged ingest data raises
            log.warning("sequence %s: %s had missing chunks; computing it again", seq_id, stage)
    try:
        results = [runner(store_url, seq_id, stage) for stage in sequence_stages(settings, source)]
    finally:  # the teacher features kept for warp-refine (where the stages ran here)
        feature_scratch.release(str(store_url), seq_id)
    evaluation = next(r["evaluation"] for r in results if r["stage"] == "evaluation")
    exported = next((r["exported"] for r in results if r["stage"] == "export"), None)
    SequenceStore.open(store_url, mode="r+").mark_stage_done(
        seq_id, LABELLED, {"worker": worker_name(), "settings_digest": settings.digest(), **(marker or {})})
    return {"sequence": seq_id, "worker": worker_name(), "stages": results, "evaluation": evaluation,
            "exported": exported, "settings_digest": settings.digest()}


def stale_reason(store: SequenceStore, seq_id: str, settings: LabelSettings,
                 source_fingerprint: str | None = None) -> str | None:
    """Why ``seq_id`` must be (re)labelled with ``settings``, or None when every stage is current.

    A drive not in the store yet is new; one whose inbox files changed (``source_fingerprint``)
    must be ingested again; otherwise the first stage that is not current names the reason.
    """
    if seq_id not in store:
        return "new drive"
    seq = store.sequence(seq_id)
    if seq.source_fingerprint is not None and source_fingerprint is not None \
            and seq.source_fingerprint != source_fingerprint:
        return "drive content changed"
    for stage in sequence_stages(settings):
        try:
            current = stage.is_current(store, seq_id)
        except AutolabelError as exc:  # a checkpoint that is gone, say: the run will report it
            return f"{stage.title}: {exc}"
        if not current:
            return f"{stage.title} not done, or done with other settings or checkpoints"
    return None


# --- a whole store, here (the CLI) ------------------------------------------------------------------


@dataclass
class SequenceOutcome:
    id: str
    status: Literal["labelled", "skipped", "failed"]
    seconds: float = 0.0
    error: str | None = None
    result: dict[str, Any] | None = None


@dataclass
class LabelReport:
    store: str
    method: str
    outcomes: list[SequenceOutcome] = field(default_factory=list)
    skipped_groups: dict[str, str] = field(default_factory=dict)  # unusable groups in the store, and why

    @property
    def failed(self) -> list[SequenceOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def check_checkpoints(store: SequenceStore, settings: LabelSettings) -> None:
    """Fail before any work when the teacher or refiner does not fit the store (or each other)."""
    where = f"store {store.url!r}"
    if settings.teacher:
        teacher = load_teacher(settings.teacher, settings.device, settings.teacher_map, store.classes.names)
        teacher.check_classes(store.classes.names, store.classes.ignore_index, where)
        class_map = getattr(teacher, "class_map", None)
        if class_map is not None and class_map.unreached:
            log.warning("no class of teacher %s maps to %s of %s: inpainting never fills them (only warps and the "
                        "refiner can)", settings.teacher, ", ".join(class_map.unreached), where)
        if settings.adapt_steps > 0 and not isinstance(teacher, Teacher):
            raise ConfigError(f"teacher {settings.teacher}: per-sequence adaptation (--adapt-steps) fine-tunes a "
                              "built-in checkpoint (.pt) on its own classes; use --adapt-steps 0 with exported or "
                              "mapped teachers")
    if settings.refiner and settings.teacher:
        load_refiner(settings.refiner, settings.device, store.classes.names, settings.teacher, where,
                     settings.teacher_map)


def label_store(store_url: str, settings: LabelSettings, sequences: list[str] | None = None,
                progress: Progress | None = None, jobs: int = 1) -> LabelReport:
    """Label the (selected) sequences of a store one after the other, here.

    One failing sequence never stops the others; a sequence whose stages were all current
    already is ``skipped``. A drive longer than ``settings.segment_frames`` (when set) is labelled
    as segment jobs (``tasks.segments``) on ``jobs`` local worker processes (1: in this process).
    """
    from autolabel.tasks.segments import LocalPool, run_jobs_here  # segments build on this module

    check_device_available(settings.device)
    store = SequenceStore.open(store_url, mode="r+")
    ids = select_ids(store.sequence_ids(), sequences, f"store {store_url!r}")
    check_checkpoints(store, settings)
    report = LabelReport(store=store_url, method=settings.method, skipped_groups=store.bad_groups())
    runner = direct_runner(progress)
    with LocalPool(jobs, progress) as pool:
        for seq_id in ids:
            _label_one(store_url, store, seq_id, settings, report, runner,
                       pool if jobs > 1 else run_jobs_here(progress), jobs)
    return report


def _label_one(store_url: str, store: SequenceStore, seq_id: str, settings: LabelSettings, report: LabelReport,
               runner: StageRunner, run_jobs: Callable[[list[Any]], list[dict[str, Any]]], workers: int) -> None:
    """Label one sequence of :func:`label_store` (in segments when it is long); records the outcome."""
    from autolabel.tasks.segments import is_segmented, label_drive_in_segments

    start = time.perf_counter()
    try:
        if seq_id in store and is_segmented(store.sequence(seq_id).num_frames, settings):
            result = label_drive_in_segments(store_url, seq_id, settings, run_jobs, runner, workers=workers)
        else:
            result = label_sequence(store_url, seq_id, settings, runner=runner)
    except AutolabelError as exc:
        report.outcomes.append(SequenceOutcome(seq_id, "failed", time.perf_counter() - start, str(exc)))
        return
    except OSError as exc:  # disk full, file size limit, permissions: name it, go on with the others
        # zarr's writes name no file; a file that is named lies outside the store (--export's PNGs)
        outside = exc.filename and not Path(os.path.abspath(exc.filename)).is_relative_to(os.path.abspath(store_url))
        report.outcomes.append(SequenceOutcome(seq_id, "failed", time.perf_counter() - start,
                                               f"cannot write{'' if outside else ' to the store'}: "
                                               f"{describe_os_error(exc)}"))
        return
    except Exception as exc:  # noqa: BLE001 - a damaged chunk (codec error) fails only its sequence
        report.outcomes.append(SequenceOutcome(
            seq_id, "failed", time.perf_counter() - start,
            f"{type(exc).__name__}: {exc}; if stored data is damaged, `autolabel verify {store_url}` "
            "says where and how to repair it"))
        return
    stages = [*result["stages"], *(s for job in result.get("segments", []) for s in job["stages"])]
    computed = any(s["computed"] and s["stage"].split("/")[0] not in ("evaluation", "export") for s in stages)
    report.outcomes.append(SequenceOutcome(seq_id, "labelled" if computed else "skipped",
                                           time.perf_counter() - start, result=result))


__all__ = ["AnyStage", "DriveSource", "LabelSettings", "SequenceEvaluation", "Stage", "label_sequence",
           "label_store", "run_stage", "sequence_stages", "stale_reason"]
