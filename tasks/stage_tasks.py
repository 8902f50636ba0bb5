"""The pipeline's stages as Prefect tasks: one thin wrapper, named after each stage.

:func:`prefect_runner` is the runner ``autolabel.tasks.pipeline.label_sequence`` takes inside the
``label-sequence`` flow. Each stage becomes a task run named after it (``flow-estimation``,
``teacher-inference``, ``warp-inpaint``, ``refine``, ``evaluate``, ``export``, ``ingest-drive``) that
takes the store URL, the sequence id and the stage value (never arrays), retries on I/O failures
only, and has a cache key made of (task, store, sequence content hash, stage settings, checkpoint
hashes, code version). The runner asks the stage whether the store already holds its output
(:meth:`Stage.is_current`) and passes ``refresh_cache`` when it does not, so a cached record can
never stand in for missing output and a killed run resumes from the store. GPU stages hold a slot
of their worker's GPU concurrency limit (:func:`gpu_limit_name`); long stages move a progress
artifact. :func:`segment_task` runs one segment job of a long drive the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext

import autolabel
from autolabel.errors import AutolabelError
from autolabel.storage.store import SequenceStore
from autolabel.tasks.checkpoints import checkpoint_sha256
from autolabel.tasks.pipeline import AnyStage, Stage, run_stage
from autolabel.tasks.segments import SegmentJob, run_segment_job

CODE_VERSION = autolabel.__version__


def gpu_limit_name() -> str:
    """The global concurrency limit of this worker's GPU: ``$AUTOLABEL_GPU_LIMIT`` or ``gpu-<host>-<device>``."""
    explicit = os.environ.get("AUTOLABEL_GPU_LIMIT")
    if explicit:
        return explicit
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    return f"gpu-{socket.gethostname()}-{device}"


def retry_on_io(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: I/O failures (OSError) that are not autolabel's own input errors."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, AutolabelError)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """(task, store, sequence content hash, stage settings, checkpoint hashes, code version) as one key."""
    stage: Stage = parameters["stage"]
    store = SequenceStore.open(parameters["store"])
    seq_id = parameters["seq_id"]
    content = store.sequence(seq_id).content_hash if seq_id in store else "not-ingested"
    hashes = [checkpoint_sha256(c) for c in stage.checkpoints()]
    return f"{context.task.name}-{_digest([parameters['store'], seq_id, content, stage.model_dump(mode='json'), hashes, CODE_VERSION])}"


class ArtifactProgress:
    """A Prefect progress artifact per stage and sequence, updated at most every 2 s."""

    def __init__(self) -> None:
        self.total = 1
        self.done = 0
        self._last = 0.0
        self.artifact_id: Any = None

    def start(self, seq_id: str, title: str, total: int) -> None:
        self.total, self.done = max(total, 1), 0
        self.artifact_id = create_progress_artifact(progress=0.0, description=f"{seq_id}: {title}")

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.artifact_id is not None and (now - self._last >= 2.0 or self.done >= self.total):
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


@task(name="stage", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_io,
      cache_key_fn=stage_cache_key, persist_result=True)
def stage_task(store: str, seq_id: str, stage: AnyStage) -> dict[str, Any]:
    """Run one pipeline stage of one sequence (see the module docstring)."""
    if stage.uses_gpu:
        with gpu_slot(stage.device):
            return run_stage(store, seq_id, stage, ArtifactProgress())
    return run_stage(store, seq_id, stage, ArtifactProgress())


def prefect_runner(store: str, seq_id: str, stage: Stage) -> dict[str, Any]:
    """Submit ``stage`` as a task run named after it and wait; the result says if it came from the cache."""
    fresh = seq_id not in SequenceStore.open(store) or not stage.is_current(SequenceStore.open(store), seq_id)
    state = stage_task.with_options(name=stage.task_name, refresh_cache=fresh)(store, seq_id, stage,
                                                                                return_state=True)
    result = dict(state.result())
    result["cached"] = state.name == "Cached"
    return result


@task(name="segment", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_io)
def segment_task(job: SegmentJob) -> dict[str, Any]:
    """Run one segment job (``tasks.segments``); a job already written does nothing (no task cache needed)."""
    if any(stage.uses_gpu for stage in job.stages):
        with gpu_slot(job.stages[0].device):
            return run_segment_job(job, ArtifactProgress())
    return run_segment_job(job, ArtifactProgress())
