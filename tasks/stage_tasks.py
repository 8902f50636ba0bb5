"""Prefect tasks: thin wrappers over the stage functions of ``tasks/``.

Each task takes a store URL and a sequence id (never arrays), retries on I/O failures only, and
has a cache key made of (store, sequence content hash, stage settings, checkpoint hash, code
version). The flows pass ``refresh_cache=True`` whenever the store says a stage is not done, so a
cached record can never stand in for output that is missing; a killed run therefore resumes
from the store's stage status. GPU stages hold a slot of the global concurrency limit of their
worker's GPU (:func:`gpu_limit_name`) while they run; long stages move a progress artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext

import autolabel
from autolabel.errors import AutolabelError, InputDataError
from models.optical_flow import FlowConfig
from models.propagation import PropagationConfig, count_steps
from models.refiner import Refiner
from models.teacher import Teacher, file_sha256
from storage.annotation import AnnotationPolicy
from storage.ingest import IngestOptions, ingest
from storage.readers import read_dataset
from storage.stages import TEACHER, flow_stage, results_stage
from storage.store import SequenceStore
from tasks.flow_estimation import estimate_flow
from tasks.propagate import label_sequence
from tasks.summary import sequence_summary
from tasks.teacher_inference import infer_teacher

CODE_VERSION = autolabel.__version__


def gpu_limit_name() -> str:
    """The global concurrency limit of this worker's GPU: ``$AUTOLABEL_GPU_LIMIT`` or ``gpu-<host>-<device>``."""
    explicit = os.environ.get("AUTOLABEL_GPU_LIMIT")
    if explicit:
        return explicit
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    return f"gpu-{socket.gethostname()}-{device}"


def worker_name() -> str:
    """Who runs this: ``$AUTOLABEL_WORKER_NAME`` (set by deploy/start-workers.sh) or ``local-<host>``."""
    return os.environ.get("AUTOLABEL_WORKER_NAME") or f"local-{socket.gethostname()}"


def retry_on_io(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: I/O failures (OSError) that are not autolabel's own input errors."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, AutolabelError)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """(task, store, sequence content hash, settings, checkpoint hashes, code version) as one key."""
    store = SequenceStore.open(parameters["store"])
    content = store.sequence(parameters["seq_id"]).content_hash
    settings = {k: v for k, v in parameters.items() if k not in ("store", "seq_id")}
    for name in ("teacher", "refiner"):
        if settings.get(name):
            settings[name] = file_sha256(Path(settings[name]))
    return f"{context.task.name}-{_digest([parameters['store'], content, settings, CODE_VERSION])}"


class StageProgress:
    """A Prefect progress artifact for one stage of one sequence, updated at most every 2 s."""

    def __init__(self, seq_id: str, stage: str, total: int) -> None:
        self.total = max(total, 1)
        self.done = 0
        self._last = 0.0
        self.artifact_id = create_progress_artifact(progress=0.0, description=f"{seq_id}: {stage}")

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self._last >= 2.0 or self.done >= self.total:
            self._last = now
            update_progress_artifact(self.artifact_id, progress=min(100.0, 100.0 * self.done / self.total))


@contextmanager
def gpu_slot(device: str) -> Iterator[None]:
    """Hold one slot of this worker's GPU concurrency limit: for CUDA work, and on any worker that
    deploy/start-workers.sh started (it sets ``$AUTOLABEL_GPU_LIMIT``)."""
    if not device.startswith("cuda") and not os.environ.get("AUTOLABEL_GPU_LIMIT"):
        yield
        return
    with concurrency(gpu_limit_name(), occupy=1, strict=bool(os.environ.get("AUTOLABEL_GPU_LIMIT"))):
        yield


def _stage_result(stage: str, computed: bool, start: float, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "computed": computed, "seconds": round(time.perf_counter() - start, 2),
            "worker": worker_name(), **extra}


TASK_OPTIONS: dict[str, Any] = {
    "retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_on_io,
    "cache_key_fn": stage_cache_key, "persist_result": True,
}


@task(name="ingest-drive", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_io)
def ingest_drive(inbox: str, layout: str, store: str, seq_id: str, annotation: AnnotationPolicy) -> dict[str, Any]:
    """Ingest one drive of ``inbox`` into ``store`` if it is new or its files changed.

    Raises InputDataError naming the file when the drive cannot be read (its run fails alone).
    """
    start = time.perf_counter()
    dataset = read_dataset(layout, Path(inbox))
    report = ingest(dataset, store, IngestOptions(annotation=annotation, sequences=[seq_id], replace_changed=True))
    if report.failed:
        raise InputDataError(f"drive {seq_id!r} of inbox {inbox}: {report.failed[0].error}")
    if not report.outcomes:
        raise InputDataError(f"drive {seq_id!r} is not in inbox {inbox} (layout {layout!r})")
    return _stage_result("ingest", report.outcomes[0].status == "ingested", start)


@task(name="flow-estimation", **TASK_OPTIONS)
def flow_estimation(store: str, seq_id: str, flow: FlowConfig) -> dict[str, Any]:
    """Forward and backward optical flow of every frame pair (skips when stored with these settings)."""
    start = time.perf_counter()
    st = SequenceStore.open(store, mode="r+")
    progress = StageProgress(seq_id, f"flow {flow.stored_name}", st.sequence(seq_id).num_frames - 1)
    computed = estimate_flow(st, seq_id, flow, None, progress.advance)
    return _stage_result(flow_stage(flow.stored_name), computed, start)


@task(name="teacher-inference", **TASK_OPTIONS)
def teacher_inference(store: str, seq_id: str, teacher: str, adapt_steps: int, device: str) -> dict[str, Any]:
    """The teacher's labels and confidence for every frame (GPU stage)."""
    start = time.perf_counter()
    st = SequenceStore.open(store, mode="r+")
    progress = StageProgress(seq_id, "teacher", st.sequence(seq_id).num_frames)
    with gpu_slot(device):
        model = Teacher.load(Path(teacher), device)
        computed = infer_teacher(st, seq_id, model, file_sha256(Path(teacher)), adapt_steps=adapt_steps,
                                 on_frame=progress.advance)
    return _stage_result(TEACHER, computed, start)


def _propagate(store: str, seq_id: str, propagation: PropagationConfig, flow_name: str,
               teacher: str | None, refiner: str | None) -> bool:
    """Run one propagation method over the sequence (skips when its results are current)."""
    st = SequenceStore.open(store, mode="r+")
    seq = st.sequence(seq_id)
    progress = StageProgress(seq_id, propagation.method, count_steps(seq.annotated, propagation.max_distance))
    refiner_model = refiner_hash = feature_teacher = None
    if refiner is not None:
        refiner_model = Refiner.load(Path(refiner), propagation.device)
        refiner_hash = file_sha256(Path(refiner))
        teacher_hash = file_sha256(Path(teacher)) if teacher else ""
        refiner_model.check_compatible(st.classes.names, teacher_hash, f"store {store!r}")
        feature_teacher = Teacher.load(Path(teacher), propagation.device) if teacher else None
    return label_sequence(st, seq_id, propagation, flow_name, on_step=progress.advance, refiner=refiner_model,
                          refiner_sha256=refiner_hash, feature_teacher=feature_teacher)


@task(name="warp-inpaint", **TASK_OPTIONS)
def warp_inpaint(store: str, seq_id: str, propagation: PropagationConfig, flow_name: str,
                 teacher: str) -> dict[str, Any]:
    """Psi_W: warp along the flow, inpaint untrusted pixels from the teacher (GPU stage)."""
    start = time.perf_counter()
    config = propagation.model_copy(update={"method": "warp-inpaint"})
    with gpu_slot(config.device):
        computed = _propagate(store, seq_id, config, flow_name, teacher, None)
    return _stage_result(results_stage("warp-inpaint"), computed, start)


@task(name="refine", **TASK_OPTIONS)
def refine(store: str, seq_id: str, propagation: PropagationConfig, flow_name: str, teacher: str,
           refiner: str) -> dict[str, Any]:
    """Psi_R: warp-inpaint then the refiner at every step (GPU stage)."""
    start = time.perf_counter()
    config = propagation.model_copy(update={"method": "warp-refine"})
    with gpu_slot(config.device):
        computed = _propagate(store, seq_id, config, flow_name, teacher, refiner)
    return _stage_result(results_stage("warp-refine"), computed, start)


@task(name="evaluate", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_io)
def evaluate_sequence(store: str, seq_id: str, methods: list[str], max_distance: int) -> dict[str, Any]:
    """Dashboard rows of one sequence per method: mIoU where ground truth exists, else coverage."""
    seq = SequenceStore.open(store).sequence(seq_id)
    return {m: sequence_summary(seq, m, max_distance) for m in methods}


def stage_done(store: str, seq_id: str, stage: str) -> bool:
    """Whether the store marks ``stage`` done for ``seq_id`` (cheap: one metadata read)."""
    return SequenceStore.open(store).sequence(seq_id).stage_done(stage)
