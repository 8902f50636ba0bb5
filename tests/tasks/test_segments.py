"""A long drive labelled as segment jobs (in worker processes) stores exactly what one job stores."""

from __future__ import annotations

import shutil
from typing import Any
from pathlib import Path

import numpy as np
import pytest

from autolabel.errors import ConfigError, StoreError
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import PropagationConfig
from autolabel.models.quality import EstimateConfig
from autolabel.models.segments import Segment, plan_segments
from autolabel.storage.segmented import SegmentedStage
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig
from autolabel.tasks.pipeline import LabelSettings, label_store
from autolabel.tasks.segments import (
    label_drive_in_segments,
    LocalPool,
    run_jobs_here,
    run_segment_job,
    segment_phases,
)
from tests.conftest import drives_with_checkpoints


class TestPlanSegments:
    def test_covers_every_frame_once_on_shard_boundaries(self) -> None:
        annotated = np.zeros(200, bool)
        annotated[[10, 31, 52, 73, 94, 115, 136, 157, 178, 199]] = True
        segments = plan_segments(annotated, 16, 64)
        assert segments[0].start == 0 and segments[-1].stop == 200
        assert all(a.stop == b.start for a, b in zip(segments, segments[1:]))
        assert all(s.start % 16 == 0 for s in segments)
        assert [s.index for s in segments] == list(range(len(segments)))
        for s in segments:  # the span reaches the keyframes around the owned frames
            assert s.span_start <= s.start and s.span_stop >= s.stop
            assert s.span_start == 0 or annotated[s.span_start]
            assert s.span_stop == 200 or annotated[s.span_stop - 1]

    def test_prefers_a_boundary_on_a_keyframe(self) -> None:
        annotated = np.zeros(128, bool)
        annotated[[0, 48, 127]] = True
        first = plan_segments(annotated, 16, 64)[0]
        assert first.stop == 48  # 48 is a keyframe and a shard boundary near 64: no span overlap
        assert plan_segments(annotated, 16, 64)[1].span_start == 48

    def test_short_drive_is_one_segment(self) -> None:
        assert plan_segments(np.ones(40, bool), 16, 64) == [Segment(0, 0, 40, 0, 40)]

    def test_drive_without_keyframes_spans_everything(self) -> None:
        segments = plan_segments(np.zeros(100, bool), 16, 32)
        assert all((s.span_start, s.span_stop) == (0, 100) for s in segments)

    def test_bad_arguments(self) -> None:
        with pytest.raises(ConfigError, match="must be >= 1"):
            plan_segments(np.ones(10, bool), 0, 8)
        with pytest.raises(ConfigError, match=r"\(T,\)"):
            plan_segments(np.ones((2, 5), bool), 4, 8)


@pytest.fixture(scope="module")
def drive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 100-frame drive (sharded: 16 frames per shard), keyframes every 21 frames, teacher, refiner."""
    return drives_with_checkpoints(tmp_path_factory.mktemp("segments"),
                                   [SyntheticConfig(width=64, height=48, frames=100, seed=5)], 21)


def settings_for(drive: dict[str, Path], segment_frames: int) -> LabelSettings:
    return LabelSettings(propagation=PropagationConfig(method="warp-refine", max_distance=10),
                         flow=FlowConfig(backend="dis-fast"), teacher=str(drive["teacher"]),
                         refiner=str(drive["refiner"]), segment_frames=segment_frames)


ARRAYS = ["flow/dis-fast/fw", "flow/dis-fast/bw", "teacher/labels", "teacher/confidence",
          *[f"results/{m}/{a}" for m in ("warp-inpaint", "warp-refine") for a in ("labels", "confidence", "distance")]]


def stored(store: str, seq_id: str) -> dict[str, np.ndarray]:
    seq = SequenceStore.open(store).sequence(seq_id)
    return {name: np.asarray(seq.array(name)[:]) for name in ARRAYS}


def _never(seq: Any) -> bool:
    return False


class TestSegmentedDrive:
    def test_segments_in_worker_processes_store_what_one_job_stores(self, drive: dict[str, Path],
                                                                    tmp_path: Path) -> None:
        one, split = str(tmp_path / "one.zarr"), str(tmp_path / "split.zarr")
        shutil.copytree(drive["store"], one)
        shutil.copytree(drive["store"], split)
        seq_id = SequenceStore.open(one).sequence_ids()[0]
        report = label_store(one, settings_for(drive, 0))
        assert not report.failed
        settings = settings_for(drive, 32)
        phases = segment_phases(split, seq_id, settings)
        assert [p[0].phase for p in phases] == ["prepare", "propagate", "estimate", "evaluate"]
        assert len(phases[0]) >= 3  # 100 frames in segments of about 32
        assert len(phases[1]) == len(phases[3]) == len(phases[0])
        # the estimate is split into one part per segment (8 probes: 4 keyframe pairs, both ways), each
        # part reading the whole drive; a job runs part k of warp-refine's and of warp-inpaint's
        n = len(phases[0])
        assert [([s.output for s in job.stages], job.segment[:3], job.segments) for job in phases[2]] == [
            (["estimate/warp-refine", "estimate/warp-inpaint"], (part, 0, 100), n) for part in range(n)]
        # a propagate job writes warp-refine and, in the same pass, warp-inpaint
        assert [[s.output for s in job.stages] for job in phases[1]] == \
            [["results/warp-refine", "results/warp-inpaint"]] * n
        assert phases[1][0].stages[0].also is not None and phases[1][0].stages[1].also is None
        names = [job.name for p in phases for job in p]
        assert len(set(names)) == len(names)
        assert "synth-0005-estimate-warp-refine+estimate-warp-inpaint-part1of" in " ".join(names)
        split_report = label_store(split, settings, jobs=2)  # two local worker processes take the jobs
        assert [o.status for o in split_report.outcomes] == ["labelled"], split_report.failed
        result = split_report.outcomes[0].result
        # two workers: the estimate in two parts, warp-refine's stage stepping warp-inpaint's probes beside
        # its own (its own stage, next in the job, finds its part done)
        assert len(result["segments"]) == sum(map(len, phases)) - len(phases[2]) + 2
        estimates = [r["stages"] for r in result["segments"] if "-estimate-" in r["job"]]
        assert [[(s["stage"], s["computed"], s.get("also_computed")) for s in stages] for stages in estimates] == \
            [[("estimate/warp-refine", True, True), ("estimate/warp-inpaint", False, None)]] * 2
        assert all(r["worker"] for r in result["segments"])
        # the drive's own pipeline afterwards finds every stage current: nothing recomputed
        assert [s["stage"] for s in result["stages"] if s["computed"]] == []
        seq = SequenceStore.open(split).sequence(seq_id)
        assert seq.stages["evaluation/warp-refine"]["segments"] == len(phases[3])  # published by the segments
        expected, got = stored(one, seq_id), stored(split, seq_id)
        for name in ARRAYS:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        seq = SequenceStore.open(split).sequence(seq_id)
        assert seq.stage_done("labelled") and "segmented" not in seq.attrs
        whole = SequenceStore.open(one).sequence(seq_id).stages
        for stage in ("flow/dis-fast", "teacher", "results/warp-refine"):
            assert seq.stages[stage]["settings"] == whole[stage]["settings"]
        assert seq.stages["results/warp-refine"]["reached"] == whole["results/warp-refine"]["reached"]
        # the estimates fitted on probes that several jobs ran are those of one job
        for method in ("warp-inpaint", "warp-refine"):
            assert seq.stages[f"estimate/{method}"]["calibration"] == whole[f"estimate/{method}"]["calibration"]
            assert seq.stages[f"estimate/{method}"]["calibration"]["probes"] >= 4
        # the drive's evaluation is the one-job evaluation
        assert result["evaluation"] == label_store(one, settings_for(drive, 0)).outcomes[0].result["evaluation"]

    def test_known_workers_bound_the_estimate_parts(self, drive: dict[str, Path]) -> None:
        settings = settings_for(drive, 32).model_copy(update={"compare_with_warp_inpaint": False})
        seq_id = SequenceStore.open(str(drive["store"])).sequence_ids()[0]
        by_workers = {w: segment_phases(str(drive["store"]), seq_id, settings, workers=w)[2] for w in (None, 1, 2)}
        assert len(by_workers[None]) == len(segment_phases(str(drive["store"]), seq_id, settings)[0]) >= 3
        assert [(job.segment[0], job.segments) for job in by_workers[1]] == [(0, 1)]  # one worker: one job
        assert [(job.segment[0], job.segments) for job in by_workers[2]] == [(0, 2), (1, 2)]

    def test_a_local_pool_runs_a_phase_in_worker_processes(self, drive: dict[str, Path], tmp_path: Path) -> None:
        split = str(tmp_path / "split.zarr")
        shutil.copytree(drive["store"], split)
        seq_id = SequenceStore.open(split).sequence_ids()[0]
        prepare = segment_phases(split, seq_id, settings_for(drive, 32))[0]
        with LocalPool(2) as pool:
            done = pool(prepare)
        assert [d["job"] for d in done] == [job.name for job in prepare]
        assert SequenceStore.open(split).sequence(seq_id).stage_done("teacher")

    def test_stage_is_published_only_when_every_segment_is_written(self, drive: dict[str, Path],
                                                                   tmp_path: Path) -> None:
        split = str(tmp_path / "split.zarr")
        shutil.copytree(drive["store"], split)
        seq_id = SequenceStore.open(split).sequence_ids()[0]
        prepare = segment_phases(split, seq_id, settings_for(drive, 32))[0]
        for job in prepare[:-1]:
            run_segment_job(job)
        seq = SequenceStore.open(split).sequence(seq_id)
        assert not seq.stage_done("flow/dis-fast") and not seq.stage_done("teacher")
        assert set(seq.attrs["segmented"]) == {"flow/dis-fast", "teacher"}
        again = run_segment_job(prepare[0])  # a job run twice (a retry) does nothing the second time
        assert not any(s["computed"] for s in again["stages"])
        run_segment_job(prepare[-1])
        seq = SequenceStore.open(split).sequence(seq_id)
        assert seq.stage_done("flow/dis-fast") and seq.stage_done("teacher") and not seq.attrs.get("segmented")

    def test_estimate_is_published_when_its_last_part_is(self, drive: dict[str, Path], tmp_path: Path) -> None:
        split = str(tmp_path / "split.zarr")
        shutil.copytree(drive["store"], split)
        seq_id = SequenceStore.open(split).sequence_ids()[0]
        settings = settings_for(drive, 32).model_copy(update={"compare_with_warp_inpaint": False})
        prepare, propagate, estimate, _ = segment_phases(split, seq_id, settings)
        for job in [*prepare, *propagate]:
            run_segment_job(job)
        assert len(estimate) >= 3 and all(job.phase == "estimate" for job in estimate)
        for job in estimate[:-1]:
            run_segment_job(job)
        seq = SequenceStore.open(split).sequence(seq_id)
        assert not seq.stage_done("estimate/warp-refine") and "estimate/warp-refine" in seq.attrs["segmented"]
        again = run_segment_job(estimate[0])  # a retried part does nothing the second time
        assert not any(s["computed"] for s in again["stages"])
        run_segment_job(estimate[-1])
        seq = SequenceStore.open(split).sequence(seq_id)
        assert seq.stage_done("estimate/warp-refine") and seq.stages["estimate/warp-refine"]["segments"] == len(estimate)
        assert seq.stages["estimate/warp-refine"]["calibration"]["probes"] >= 4

    def test_stages_an_earlier_phase_makes_stale_run_as_segment_jobs(self, drive: dict[str, Path],
                                                                     tmp_path: Path) -> None:
        """Adding the estimate to a labelled drive: its evaluation (current until the estimate is
        published) is rescored by the segments, not by the drive's own run on one worker."""
        split = str(tmp_path / "split.zarr")
        shutil.copytree(drive["store"], split)
        seq_id = SequenceStore.open(split).sequence_ids()[0]
        without = settings_for(drive, 32).model_copy(update={"estimate": EstimateConfig(enabled=False)})
        assert [o.status for o in label_store(split, without).outcomes] == ["labelled"]
        settings = settings_for(drive, 32)
        phases = segment_phases(split, seq_id, settings)
        assert [jobs[0].phase for jobs in phases] == ["estimate", "evaluate"]
        report = label_store(split, settings)
        result = report.outcomes[0].result
        assert [s["stage"] for s in result["stages"] if s["computed"]] == []
        seq = SequenceStore.open(split).sequence(seq_id)
        assert seq.stages["evaluation/warp-refine"]["segments"] == len(phases[1])
        assert seq.stages["evaluation/warp-refine"]["evaluation"]["estimated_miou"] is not None

    def test_late_writer_of_a_replaced_version_fails(self, drive: dict[str, Path], tmp_path: Path) -> None:
        split = str(tmp_path / "split.zarr")
        shutil.copytree(drive["store"], split)
        store = SequenceStore.open(split, mode="r+")
        seq_id = store.sequence_ids()[0]
        old = SegmentedStage.open(store, seq_id, "teacher", "key-a", 2, lambda group: None, published=_never)
        SegmentedStage.open(store, seq_id, "teacher", "key-b", 2, lambda group: None, published=_never)  # other settings
        with pytest.raises(StoreError, match="replaced or published by another run"):
            old.finish(0, {}, lambda infos: {})

    def test_a_job_that_looks_after_the_last_segment_was_published_opens_nothing(
            self, drive: dict[str, Path], tmp_path: Path) -> None:
        """The race a job's second stage can lose (its segment written by the first stage's pass, the
        other job publishing the last one between its look and its open): no orphan version is made."""
        split = str(tmp_path / "split.zarr")
        shutil.copytree(drive["store"], split)
        store = SequenceStore.open(split, mode="r+")
        seq_id = store.sequence_ids()[0]

        def published(seq: Any) -> bool:
            return seq.stages.get("results/x", {}).get("settings") == "s"

        for index in (0, 1):  # two jobs write their segments; the second publishes
            shared = SegmentedStage.open(store, seq_id, "results/x", "key", 2, lambda group: None, published=published)
            assert shared is not None and not shared.is_done(index)
            shared.finish(index, {}, lambda infos: {"settings": "s"})
        seq = store.sequence(seq_id)
        assert published(seq) and "segmented" not in seq.attrs
        late = SegmentedStage.open(store, seq_id, "results/x", "key", 2, lambda group: None, published=published)
        assert late is None
        assert "segmented" not in store.sequence(seq_id).attrs  # no version recorded that nobody finishes

    def test_per_sequence_adaptation_is_refused(self, drive: dict[str, Path]) -> None:
        with pytest.raises(ConfigError, match="--adapt-steps 0"):
            LabelSettings(propagation=PropagationConfig(method="warp-inpaint"), teacher=str(drive["teacher"]),
                          adapt_steps=5, segment_frames=32)

    def test_short_drive_in_one_segment_matches_too(self, drive: dict[str, Path], tmp_path: Path) -> None:
        split = str(tmp_path / "split.zarr")
        shutil.copytree(drive["store"], split)
        seq_id = SequenceStore.open(split).sequence_ids()[0]
        settings = settings_for(drive, 500).model_copy(update={"compare_with_warp_inpaint": False})
        phases = segment_phases(split, seq_id, settings)
        assert all(len(jobs) == 1 for jobs in phases)
        label_drive_in_segments(split, seq_id, settings, run_jobs_here())
        assert SequenceStore.open(split).sequence(seq_id).stage_done("results/warp-refine")

    def test_drive_labelled_only_by_its_segments_is_reported_labelled(self, drive: dict[str, Path],
                                                                    tmp_path: Path) -> None:
        """Without the estimate the drive's own pipeline computes nothing: the segments did the work."""
        split = str(tmp_path / "split.zarr")
        shutil.copytree(drive["store"], split)
        settings = settings_for(drive, 32).model_copy(update={"estimate": EstimateConfig(enabled=False)})
        first = label_store(split, settings)
        assert [o.status for o in first.outcomes] == ["labelled"], first.failed
        jobs = first.outcomes[0].result["segments"]
        assert {s["stage"] for j in jobs for s in j["stages"] if s["computed"]} >= {
            "flow/dis-fast", "teacher", "results/warp-refine", "evaluation"}
        assert all(s["seconds"] >= 0 for j in jobs for s in j["stages"])
        assert [o.status for o in label_store(split, settings).outcomes] == ["skipped"]
