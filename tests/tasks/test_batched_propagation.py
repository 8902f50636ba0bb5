"""Batched propagation: any batch size, with or without prefetching, gives exactly the labels of one
chain at a time (CPU, fp32)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from autolabel.errors import ConfigError
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import (
    AUTO_BATCH,
    Chain,
    PropagationConfig,
    count_frame_steps,
    count_steps,
    gap_chains,
    propagate_frames,
    propagate_frames_together,
)
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.models.quality import EstimateConfig
from autolabel.models.teacher import Teacher
from autolabel.tasks.pipeline import EstimateStage, LabelSettings, label_store, run_stage
from autolabel.tasks import propagate as propagate_task
from autolabel.tasks.propagate import StoreSequenceInputs, features_to_keep
from tests.conftest import DriveInputs, drives_with_checkpoints

METHODS = ["motion-only", "semantic-only", "warp-inpaint", "warp-refine"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two drives with keyframes every 5 frames (10 chains each), a teacher and an untrained refiner."""
    return drives_with_checkpoints(tmp_path_factory.mktemp("batched"),
                                   drive_configs(2, SyntheticConfig(width=64, height=48, frames=25, seed=0)), 5)


class TestGapChains:
    def test_chains_per_gap(self) -> None:
        annotated = np.zeros(30, bool)
        annotated[[4, 10, 25]] = True
        gaps = gap_chains(annotated, 3)
        assert gaps == [[Chain(4, -1, 3)], [Chain(4, 1, 3), Chain(10, -1, 3)],
                        [Chain(10, 1, 3), Chain(25, -1, 3)], [Chain(25, 1, 3)]]
        assert gap_chains(np.array([True, True, False]), 10) == [[], [], [Chain(1, 1, 1)]]

    def test_batch_size_must_be_positive(self) -> None:
        inputs = DriveInputs(SyntheticConfig(width=32, height=24, frames=5, seed=0), [2])
        with pytest.raises(ConfigError, match="batch size"):
            list(propagate_frames(inputs, PropagationConfig(method="motion-only"), batch_size=0))

    def test_automatic_batch_per_device(self) -> None:
        assert PropagationConfig().chains_per_batch() == AUTO_BATCH["cpu"]
        assert PropagationConfig(device="cuda:1").chains_per_batch() == AUTO_BATCH["cuda"]
        assert PropagationConfig(batch_size=3).chains_per_batch() == 3

    @pytest.mark.parametrize("batch_size", [1, 2, 3, 64])
    def test_every_frame_in_order_whatever_the_batch(self, batch_size: int) -> None:
        inputs = DriveInputs(SyntheticConfig(width=32, height=24, frames=30, seed=0), [4, 10, 25])
        config = PropagationConfig(method="motion-only", max_distance=3)
        frames = list(propagate_frames(inputs, config, batch_size=batch_size))
        assert [f.t for f in frames] == list(range(30))
        reference = list(propagate_frames(inputs, config, batch_size=1))
        for a, b in zip(frames, reference):
            assert a.distance == b.distance
            np.testing.assert_array_equal(a.labels, b.labels)


    @pytest.mark.parametrize("window", [(0, 30), (0, 7), (6, 16), (12, 13), (16, 30), (26, 30)])
    def test_a_frame_range_gives_those_frames_of_the_whole_run(self, window: tuple[int, int]) -> None:
        inputs = DriveInputs(SyntheticConfig(width=32, height=24, frames=30, seed=0), [4, 10, 25])
        config = PropagationConfig(method="motion-only", max_distance=3)
        whole = list(propagate_frames(inputs, config))
        steps: list[int] = []
        part = list(propagate_frames(inputs, config, on_step=lambda: steps.append(1), frames=window))
        assert [f.t for f in part] == list(range(*window))
        for f in part:
            assert f.distance == whole[f.t].distance
            np.testing.assert_array_equal(f.labels, whole[f.t].labels)
            np.testing.assert_array_equal(f.confidence, whole[f.t].confidence)
        assert len(steps) == count_frame_steps(inputs.annotated, 3, window) <= count_steps(inputs.annotated, 3)
        with pytest.raises(ConfigError, match="outside the sequence"):
            list(propagate_frames(inputs, config, frames=(5, 31)))


@pytest.mark.parametrize("method", METHODS)
def test_batched_labels_equal_unbatched_exactly(made: dict[str, Path], tmp_path: Path, method: str) -> None:
    stores = {}
    # the reference: one chain at a time, nothing read ahead; against it: 8 chains with prefetching
    for batch, prefetch in ((1, False), (8, True)):
        store = str(tmp_path / f"b{batch}.zarr")
        shutil.copytree(made["store"], store)
        settings = LabelSettings(propagation=PropagationConfig(method=method, batch_size=batch, prefetch=prefetch),
                                 flow=FlowConfig(backend="exact"), teacher=str(made["teacher"]),
                                 refiner=str(made["refiner"]) if method == "warp-refine" else None,
                                 compare_with_warp_inpaint=False, estimate={"enabled": False})
        report = label_store(store, settings)
        assert [o.status for o in report.outcomes] == ["labelled"] * 2, report.failed
        stores[batch] = SequenceStore.open(store)
    for seq_id in stores[1].sequence_ids():
        for name in ("labels", "confidence", "distance"):
            one = np.asarray(stores[1].sequence(seq_id).array(f"results/{method}/{name}")[:])
            eight = np.asarray(stores[8].sequence(seq_id).array(f"results/{method}/{name}")[:])
            np.testing.assert_array_equal(one, eight, err_msg=f"{method} {seq_id} {name}")
    # the batch size is not a setting of the results: relabelling with another one is a no-op
    again = LabelSettings(propagation=PropagationConfig(method=method, batch_size=3), flow=FlowConfig(backend="exact"),
                          teacher=str(made["teacher"]), refiner=str(made["refiner"]) if method == "warp-refine" else None,
                          compare_with_warp_inpaint=False, estimate={"enabled": False})
    assert [o.status for o in label_store(str(tmp_path / "b1.zarr"), again).outcomes] == ["skipped"] * 2


class _CountingInputs(DriveInputs):
    """Counts flow reads: one per step and chain when methods share a step, two when they do not."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flow_reads = 0

    def flow_to_next(self, t: int) -> np.ndarray:
        self.flow_reads += 1
        return super().flow_to_next(t)

    def flow_to_prev(self, t: int) -> np.ndarray:
        self.flow_reads += 1
        return super().flow_to_prev(t)


class TestPropagateTogether:
    """Methods propagated in one pass give exactly what each gives alone, reading each step once."""

    @pytest.mark.parametrize("methods", [["warp-inpaint", "motion-only"], ["motion-only", "semantic-only"]])
    @pytest.mark.parametrize("window", [None, (6, 16)])
    def test_each_method_gets_its_own_labels(self, methods: list[str], window: tuple[int, int] | None) -> None:
        inputs = DriveInputs(SyntheticConfig(width=32, height=24, frames=30, seed=0), [4, 10, 25])
        configs = [PropagationConfig(method=m, max_distance=3) for m in methods]
        together = list(propagate_frames_together(inputs, configs, batch_size=2, frames=window))
        for m, config in enumerate(configs):
            alone = list(propagate_frames(inputs, config, batch_size=2, frames=window))
            assert [f[m].t for f in together] == [f.t for f in alone]
            for a, b in zip(together, alone):
                assert a[m].distance == b.distance
                np.testing.assert_array_equal(a[m].labels, b.labels, err_msg=config.method)
                np.testing.assert_array_equal(a[m].confidence, b.confidence, err_msg=config.method)

    @pytest.mark.parametrize("shared_by", ["prefetch", "trust check"])
    def test_steps_read_their_inputs_once(self, shared_by: str) -> None:
        """With prefetching, the step's reads are shared; without, warping methods still share one
        trust check (here two warp-inpaint variants that differ only in when the teacher inpaints)."""
        cfg = SyntheticConfig(width=32, height=24, frames=30, seed=0)
        if shared_by == "prefetch":
            configs = [PropagationConfig(method=m, max_distance=3) for m in ("warp-inpaint", "motion-only")]
        else:
            configs = [PropagationConfig(method="warp-inpaint", max_distance=3, prefetch=False, inpaint_confidence=c)
                       for c in (0.0, 0.99)]
        alone = _CountingInputs(cfg, [4, 10, 25])
        for config in configs:
            list(propagate_frames(alone, config))
        together = _CountingInputs(cfg, [4, 10, 25])
        steps: list[int] = []
        frames = list(propagate_frames_together(together, configs, on_step=lambda: steps.append(1)))
        assert together.flow_reads * 2 == alone.flow_reads > 0
        assert len(steps) == 2 * count_steps(together.annotated, 3)  # progress: every method's steps
        assert any((f[0].confidence != f[1].confidence).any() for f in frames)  # two methods, not one twice

    def test_methods_need_the_same_k(self) -> None:
        inputs = DriveInputs(SyntheticConfig(width=32, height=24, frames=10, seed=0), [4])
        with pytest.raises(ConfigError, match="same K"):
            list(propagate_frames_together(inputs, [PropagationConfig(method="motion-only", max_distance=3),
                                                    PropagationConfig(method="warp-inpaint", max_distance=4)]))
        with pytest.raises(ConfigError, match="at least one method"):
            list(propagate_frames_together(inputs, []))


def test_warp_refine_writes_warp_inpaint_in_the_same_pass(made: dict[str, Path], tmp_path: Path) -> None:
    """`label --method warp-refine` (warp-inpaint stored for comparison): the warp-refine stage writes
    both methods' results and both estimates (the probes resumed from its chains), equal to each
    method labelled on its own and estimated by the estimate stage alone (whole probes); the other
    stages find them current."""
    common = {"flow": FlowConfig(backend="exact"), "teacher": str(made["teacher"])}
    alone = {}
    for method in ("warp-inpaint", "warp-refine"):
        alone[method] = str(tmp_path / f"{method}.zarr")
        shutil.copytree(made["store"], alone[method])
        settings = LabelSettings(propagation=PropagationConfig(method=method), compare_with_warp_inpaint=False,
                                 refiner=str(made["refiner"]) if method == "warp-refine" else None,
                                 estimate=EstimateConfig(enabled=False), **common)
        assert not label_store(alone[method], settings).failed
        stage = EstimateStage(propagation=settings.propagation, flow_name="exact", teacher=str(made["teacher"]),
                              refiner=settings.refiner)
        for seq_id in SequenceStore.open(alone[method]).sequence_ids():
            assert run_stage(alone[method], seq_id, stage)["computed"]
    both = str(tmp_path / "both.zarr")
    shutil.copytree(made["store"], both)
    report = label_store(both, LabelSettings(propagation=PropagationConfig(method="warp-refine"),
                                             refiner=str(made["refiner"]), **common))
    assert [o.status for o in report.outcomes] == ["labelled"] * 2, report.failed
    stages = {s["stage"]: s for s in report.outcomes[0].result["stages"]}
    assert stages["results/warp-refine"]["computed"] and stages["results/warp-refine"]["also_computed"]
    assert not stages["results/warp-inpaint"]["computed"]
    assert stages["results/warp-refine"]["estimated"] == ["estimate/warp-refine", "estimate/warp-inpaint"]
    assert stages["results/warp-refine"]["also"] == "results/warp-inpaint"
    assert not stages["estimate/warp-refine"]["computed"] and not stages["estimate/warp-inpaint"]["computed"]
    for seq_id in SequenceStore.open(both).sequence_ids():
        got = SequenceStore.open(both).sequence(seq_id)
        for method, url in alone.items():
            want = SequenceStore.open(url).sequence(seq_id)
            assert got.stages[f"results/{method}"]["settings"] == want.stages[f"results/{method}"]["settings"]
            assert got.stages[f"estimate/{method}"]["calibration"] == want.stages[f"estimate/{method}"]["calibration"]
            for name in ("labels", "confidence", "distance"):
                np.testing.assert_array_equal(np.asarray(got.array(f"results/{method}/{name}")[:]),
                                              np.asarray(want.array(f"results/{method}/{name}")[:]),
                                              err_msg=f"{method} {seq_id} {name}")


class _CountingTeacher:
    """A teacher that counts the frames it computes features for."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher, self.frames = teacher, 0

    def predict_features(self, frames: np.ndarray) -> torch.Tensor:
        self.frames += len(frames)
        return self.teacher.predict_features(frames)


class TestFeatureCache:
    """warp-refine's teacher features, kept while the estimate's probes run so a frame passed again is
    not computed again; a fixed number of frames, so memory does not grow with the drive."""

    @staticmethod
    def _inputs(made: dict[str, Path], keep: int) -> tuple[StoreSequenceInputs, _CountingTeacher]:
        counting = _CountingTeacher(Teacher.load(made["teacher"], "cpu"))
        store = SequenceStore.open(str(made["store"]))
        seq = store.sequence(store.sequence_ids()[0])
        return StoreSequenceInputs(seq, None, False, counting, keep_features=keep), counting  # type: ignore[arg-type]

    def test_each_frame_once_and_the_same_features(self, made: dict[str, Path]) -> None:
        inputs, counting = self._inputs(made, keep=8)
        first = inputs.teacher_features_batch([3, 4])
        again = inputs.teacher_features_batch([4, 5])
        assert counting.frames == 3  # frame 4 was kept
        # what a batch computes for a frame can differ from a lone call in the last bits (CPU kernels
        # by batch size), so: the kept frame exactly as first computed, the new one as computed alone
        alone = counting.teacher.predict_features(inputs.frame(5)[None])
        assert torch.equal(again[0], first[1]) and torch.equal(again[1], alone[0])
        assert again.is_contiguous(memory_format=torch.channels_last) == alone.is_contiguous(
            memory_format=torch.channels_last)
        assert torch.equal(inputs.teacher_features(5), again[1]) and counting.frames == 3

    def test_a_fixed_number_of_frames_and_bytes(self, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
        inputs, counting = self._inputs(made, keep=2)
        for t in (0, 1, 2, 3):
            inputs.teacher_features_batch([t])
        inputs.teacher_features_batch([2, 3])  # the two most recent are kept
        assert counting.frames == 4
        inputs.teacher_features_batch([1])  # frame 1 was let go
        assert counting.frames == 5
        one = inputs.teacher_features(1)
        monkeypatch.setattr(propagate_task, "FEATURE_CACHE_BYTES", one.numel() * one.element_size())
        inputs, counting = self._inputs(made, keep=4)
        for t in (0, 1, 0):  # room for one frame's
            inputs.teacher_features_batch([t])
        assert counting.frames == 3

    def test_a_kept_frame_let_go_for_the_new_ones_of_the_same_call(self, made: dict[str, Path]) -> None:
        inputs, counting = self._inputs(made, keep=1)
        first = inputs.teacher_features_batch([0])
        both = inputs.teacher_features_batch([0, 1])  # 0 found, 1 computed; keeping 1 lets 0 go
        alone = counting.teacher.predict_features(inputs.frame(1)[None])
        assert counting.frames == 2 and torch.equal(both[0], first[0]) and torch.equal(both[1], alone[0])
        assert both.is_contiguous(memory_format=torch.channels_last) == alone.is_contiguous(
            memory_format=torch.channels_last)

    def test_none_kept_without_probes(self, made: dict[str, Path]) -> None:
        inputs, counting = self._inputs(made, keep=0)
        inputs.teacher_features_batch([3])
        inputs.teacher_features_batch([3])
        assert counting.frames == 2
        config = PropagationConfig(method="warp-refine", max_distance=10)
        assert features_to_keep(config) == 22  # one gap of two chains at a time on CPU
        assert features_to_keep(config.model_copy(update={"device": "cuda"})) == 22 * 8


def test_free_memory_handed_back_as_frames_are_written(made: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every RELEASE_EVERY_FRAMES propagated frames the allocator's free pages go back (flat RSS)."""
    released = []
    monkeypatch.setattr(propagate_task, "release_free_memory", lambda: released.append(True))
    monkeypatch.setattr(propagate_task, "RELEASE_EVERY_FRAMES", 4)
    store = str(tmp_path / "s.zarr")
    shutil.copytree(made["store"], store)
    settings = LabelSettings(propagation=PropagationConfig(method="motion-only"), flow=FlowConfig(backend="exact"),
                             compare_with_warp_inpaint=False, estimate={"enabled": False})
    assert [o.status for o in label_store(store, settings).outcomes] == ["labelled"] * 2
    assert len(released) == 2 * (25 // 4)  # two drives of 25 frames
