"""A long drive labelled as segment jobs on many workers, with the labels one job would give.

:func:`segment_phases` turns a drive and :class:`~autolabel.tasks.pipeline.LabelSettings` into
jobs (:class:`SegmentJob`), phase by phase: every segment's flow and teacher output (*prepare*);
every segment's propagation for each method (*propagate*, which reads the flow and teacher output
around its frames, some of them its neighbours'); the methods' quality estimates, their probes
dealt to up to one job per segment, each job stepping its part of every method's probes together
(*estimate*: probes start at keyframes anywhere in the drive, so its jobs share probes, not
frames); every segment's evaluation of its frames (*evaluate*). Jobs of one phase are independent and may run anywhere at
once (:func:`run_segment_job`); each writes only its segment's frames (or its evaluation row), and
the last to finish a stage publishes it (``storage.segmented``). Then the drive's own pipeline runs
(:func:`~autolabel.tasks.pipeline.label_sequence`): every stage before the export is current and
skipped, the export runs, and the drive is marked labelled - only once every segment is.

A job runner takes a phase's jobs and returns when all are done (raising when one failed): here
(:func:`run_jobs_here`), in local worker processes (:class:`LocalPool`), or as runs of the
``label-segment`` deployment on the work pool (``flows``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

from autolabel.models.segments import Segment, plan_key, plan_segments
from autolabel.progress import Progress, QuietProgress
from autolabel.runtime import configure_process
from autolabel.storage.store import SequenceStore, StoreLayout
from autolabel.tasks.pipeline import (
    AnyStage,
    LabelSettings,
    StageRunner,
    label_sequence,
    sequence_stages,
    worker_name,
)
from pydantic import BaseModel, ConfigDict

log = logging.getLogger("autolabel.segments")

PHASES = {"prepare": ("flow", "teacher"), "propagate": ("propagate",), "estimate": ("estimate",),
          "evaluate": ("evaluate",)}


class SegmentJob(BaseModel):
    """One segment's stages of one phase (a pool job: everything in it is plain data)."""

    model_config = ConfigDict(frozen=True)

    store: str
    seq_id: str
    phase: str
    segment: tuple[int, int, int, int, int]  # index, start, stop, span_start, span_stop
    segments: int
    plan_key: str
    stages: list[AnyStage]

    @property
    def name(self) -> str:
        index, start, stop = self.segment[:3]
        if any(stage.whole_drive for stage in self.stages):  # a part of a whole-drive stage, e.g. one method's estimate
            what = "+".join(stage.output.replace("/", "-") for stage in self.stages)
            return f"{self.seq_id}-{what}-part{index + 1}of{self.segments}"
        return f"{self.seq_id}-{self.phase}-{index:03d}-{start}-{stop}"


def drive_segments(seq_frames: int, annotated: Any, frames_per_segment: int) -> list[Segment]:
    """The segments of a drive of ``seq_frames`` frames on the store's shard grid."""
    return plan_segments(annotated, StoreLayout().shard_length(seq_frames) or 1, frames_per_segment)


def segment_phases(store_url: str, seq_id: str, settings: LabelSettings,
                   workers: int | None = None) -> list[list[SegmentJob]]:
    """The jobs of each phase, in phase order (one list per phase with work left; none when all is current).

    ``workers``: how many workers take the jobs, when known; a whole-drive stage is then split into
    at most that many parts (each part costs a job's start: loading the nets, opening the inputs).
    """
    store = SequenceStore.open(store_url)
    seq = store.sequence(seq_id)
    segments = drive_segments(seq.num_frames, seq.annotated, settings.segment_frames)
    key = plan_key(seq.content_hash, segments)
    stages = [s for s in sequence_stages(settings) if s.segmentable]
    phases: list[list[SegmentJob]] = []
    for phase, kinds in PHASES.items():
        # once a phase has work, every later one has too: its stages read what that phase rewrites,
        # so they are stale by the time they run even where they look current now (a job whose
        # stage is current when it runs does nothing)
        chosen = [s for s in stages if s.kind in kinds and (phases or not s.is_current(store, seq_id))]
        per_segment = [s for s in chosen if not s.whole_drive]
        jobs = [SegmentJob(store=store_url, seq_id=seq_id, phase=phase, segments=len(segments), plan_key=key,
                           stages=per_segment, segment=(s.index, s.start, s.stop, s.span_start, s.span_stop))
                for s in segments] if per_segment else []
        # a whole-drive stage (the estimate of one method) is split into parts of its work, not into
        # frames (up to one per segment); stages split alike share their jobs: part k of warp-refine's
        # estimate steps warp-inpaint's part k beside it (EstimateStage.also), and warp-inpaint's own
        # stage, next in the job, finds its part done
        by_parts: dict[int, list[AnyStage]] = {}
        for stage in (s for s in chosen if s.whole_drive):
            by_parts.setdefault(stage.parts(store, seq_id, min(len(segments), workers or len(segments))),
                                []).append(stage)
        jobs += [SegmentJob(store=store_url, seq_id=seq_id, phase=phase, segments=parts, plan_key=key,
                            stages=together, segment=(part, 0, seq.num_frames, 0, seq.num_frames))
                 for parts, together in by_parts.items() for part in range(parts)]
        if jobs:
            phases.append(jobs)
    return phases


def run_segment_job(job: SegmentJob, progress: Progress | None = None) -> dict[str, Any]:
    """Run one job's stages for its segment, here; returns what each stage did."""
    store = SequenceStore.open(job.store, mode="r+")
    segment = Segment(*job.segment)
    done = []
    for stage in job.stages:
        start = time.perf_counter()
        result = stage.run_segment(store, job.seq_id, segment, job.plan_key, job.segments,
                                   progress or QuietProgress())
        done.append({"stage": stage.output, "seconds": round(time.perf_counter() - start, 2), **result})
    return {"job": job.name, "worker": worker_name(), "stages": done}


JobRunner = Callable[[list[SegmentJob]], list[dict[str, Any]]]


def run_jobs_here(progress: Progress | None = None) -> JobRunner:
    """Jobs one after the other in this process."""
    return lambda jobs: [run_segment_job(job, progress) for job in jobs]


def _threads_then_run(job: SegmentJob, threads: int) -> dict[str, Any]:
    configure_process(threads)
    return run_segment_job(job)


class LocalPool:
    """A job runner over ``workers`` local processes (started once, reused for every phase and drive).

    The machine's cores are shared among them; ``progress`` advances once per finished job (the
    jobs' own progress stays in their processes). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, workers: int, progress: Progress | None = None) -> None:
        self.workers, self.progress = workers, progress or QuietProgress()
        self.threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, jobs: list[SegmentJob]) -> list[dict[str, Any]]:
        if not jobs:
            return []
        if self._pool is None:
            # spawn, not fork: a forked child inherits zarr's event-loop thread's locks and hangs on them
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"))
        self.progress.start(jobs[0].seq_id, f"{jobs[0].phase}: segment jobs on {self.workers} processes", len(jobs))
        futures = [self._pool.submit(_threads_then_run, job, self.threads) for job in jobs]
        for future in as_completed(futures):
            future.result()  # a failed job fails the drive now
            self.progress.advance()
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def is_segmented(num_frames: int, settings: LabelSettings) -> bool:
    """Whether a drive of ``num_frames`` is labelled in segments with ``settings``."""
    return 0 < settings.segment_frames < num_frames


def label_drive_in_segments(store_url: str, seq_id: str, settings: LabelSettings, run_jobs: JobRunner,
                            runner: StageRunner | None = None, marker: dict[str, Any] | None = None,
                            workers: int | None = None) -> dict[str, Any]:
    """Label ``seq_id`` through segment jobs (``run_jobs``, on ``workers`` workers when known), then
    finish it as one drive (module docstring).

    Returns :func:`~autolabel.tasks.pipeline.label_sequence`'s result with the jobs' results under
    ``segments``.
    """
    jobs_done: list[dict[str, Any]] = []
    for jobs in segment_phases(store_url, seq_id, settings, workers):
        log.info("%s: %s phase, %d segment jobs", seq_id, jobs[0].phase, len(jobs))
        jobs_done.extend(run_jobs(jobs))
    result = label_sequence(store_url, seq_id, settings, runner=runner, marker=marker)
    return {**result, "segments": jobs_done}


__all__ = ["JobRunner", "LocalPool", "SegmentJob", "drive_segments", "is_segmented", "label_drive_in_segments",
           "run_jobs_here", "run_segment_job", "segment_phases"]
