"""The teacher features the teacher stage keeps for warp-refine's propagation in the same process."""

from __future__ import annotations

import errno
from collections.abc import Iterator
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from autolabel.models.propagation import PropagationConfig
from autolabel.models.teacher import Teacher
from autolabel.storage import feature_scratch
from autolabel.storage.stages import TEACHER
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.tasks.pipeline import LabelSettings, label_store
from tests.conftest import drives_with_checkpoints


class _Net:
    """Stands in for a teacher: the scratch only asks for its device and its identity."""

    device = torch.device("cpu")


def _features(batch: int, f: int = 3, h: int = 4, w: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, f, h, w, generator=g).contiguous(memory_format=torch.channels_last)


@pytest.fixture(autouse=True)
def _no_entries_left() -> Iterator[None]:
    yield
    feature_scratch.release("s", "a")
    feature_scratch.release("s", "b")


class TestFeatureScratch:
    def test_kept_features_come_back_exactly_and_channels_last(self) -> None:
        net = _Net()
        scratch = feature_scratch.open_scratch("s", "a", "teacher/v1", net, 2**20)
        assert scratch is not None
        feats = _features(3)
        scratch.put([4, 5, 6], feats)
        got = scratch.get([6, 9, 4])
        assert sorted(got) == [4, 6]  # 9 was never kept
        assert torch.equal(got[4][0], feats[0]) and torch.equal(got[6][0], feats[2])
        assert got[4].shape == (1, 3, 4, 5) and got[4].is_contiguous(memory_format=torch.channels_last)
        assert feature_scratch.scratch_bytes() == 3 * feats[0].numel() * 4

    def test_frames_past_the_budget_are_not_kept(self) -> None:
        frame_bytes = 3 * 4 * 5 * 4
        scratch = feature_scratch.open_scratch("s", "a", "teacher/v1", _Net(), 2 * frame_bytes + 1)
        assert scratch is not None
        scratch.put([0, 1, 2], _features(3))
        assert sorted(scratch.get([0, 1, 2])) == [0, 1] and len(scratch) == 2
        assert feature_scratch.open_scratch("s", "a", "teacher/v1", _Net(), 0) is None  # budget 0: none

    def test_never_more_than_a_quarter_of_the_free_space(self, monkeypatch: pytest.MonkeyPatch) -> None:
        usage = shutil.disk_usage(tempfile.gettempdir())
        monkeypatch.setattr(feature_scratch.shutil, "disk_usage",
                            lambda path: usage._replace(free=4 * 3 * 4 * 5 * 4))  # room for one frame
        scratch = feature_scratch.open_scratch("s", "a", "teacher/v1", _Net(), 2**20)
        assert scratch is not None
        scratch.put([0, 1], _features(2))
        assert len(scratch) == 1

    def test_found_only_for_its_version_and_its_very_teacher(self) -> None:
        net = _Net()
        scratch = feature_scratch.open_scratch("s", "a", "teacher/v1", net, 2**20)
        assert feature_scratch.find("s", "a", "teacher/v1", net) is scratch
        assert feature_scratch.find("s", "a", "teacher/v2", net) is None  # a later teacher output
        assert feature_scratch.find("s", "a", None, net) is None  # no teacher output published
        assert feature_scratch.find("s", "a", "teacher/v1", _Net()) is None  # another (e.g. adapted) teacher
        assert feature_scratch.find("s", "b", "teacher/v1", net) is None

    def test_one_sequence_at_a_time_and_segments_add_to_one_entry(self) -> None:
        net = _Net()
        first = feature_scratch.open_scratch("s", "a", "teacher/v1", net, 2**20)
        assert first is not None
        first.put([0], _features(1))
        again = feature_scratch.open_scratch("s", "a", "teacher/v1", net, 2**20)  # the next segment's job
        assert again is first and len(again) == 1
        other = feature_scratch.open_scratch("s", "b", "teacher/v1", net, 2**20)
        assert other is not first and first.closed and first.get([0]) == {}
        assert feature_scratch.find("s", "a", "teacher/v1", net) is None
        feature_scratch.release("s", "b")
        assert other.closed and feature_scratch.scratch_bytes() == 0

    def test_a_full_disk_stops_keeping_and_nothing_is_returned(self, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
        scratch = feature_scratch.open_scratch("s", "a", "teacher/v1", _Net(), 2**20)
        assert scratch is not None
        scratch.put([0], _features(1))

        def full(fd: int, data: memoryview, offset: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(feature_scratch, "_write_all", full)
        scratch.put([1], _features(1))
        assert scratch.closed and scratch.get([0, 1]) == {}
        assert "No space left on device" in caplog.text and "computes them again" in caplog.text

    def test_other_shapes_are_ignored(self) -> None:
        scratch = feature_scratch.open_scratch("s", "a", "teacher/v1", _Net(), 2**20)
        assert scratch is not None
        scratch.put([0], _features(1))
        scratch.put([1], _features(1, h=8))
        scratch.put([2, 3], _features(1))  # frames and batch disagree
        assert sorted(scratch.get([0, 1, 2, 3])) == [0]


class TestLabelSettings:
    def test_kept_only_for_warp_refine_without_adaptation_and_not_on_cuda_by_default(self) -> None:
        refine = {"propagation": PropagationConfig(method="warp-refine"), "teacher": "t.pt", "refiner": "r.pt"}
        assert LabelSettings(**refine).teacher_feature_scratch_bytes == 2048 * 2**20
        assert LabelSettings(**refine, teacher_feature_scratch_mb=10).teacher_feature_scratch_bytes == 10 * 2**20
        assert LabelSettings(**refine, teacher_feature_scratch_mb=0).teacher_feature_scratch_bytes == 0
        assert LabelSettings(**refine, adapt_steps=5).teacher_feature_scratch_bytes == 0
        inpaint = LabelSettings(propagation=PropagationConfig(method="warp-inpaint"), teacher="t.pt")
        assert inpaint.teacher_feature_scratch_bytes == 0
        # LabelSettings checks a CUDA device exists; the automatic choice is read from the device name
        cuda = LabelSettings(**refine).model_copy(update={"device": "cuda"})
        assert cuda.teacher_feature_scratch_bytes == 0


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return drives_with_checkpoints(tmp_path_factory.mktemp("scratch"),
                                   drive_configs(2, SyntheticConfig(width=64, height=48, frames=25, seed=3)), 5)


def _label(made: dict[str, Path], url: str, monkeypatch: pytest.MonkeyPatch, method: str = "warp-refine",
           **extra: object) -> int:
    """Label the store at ``url``; the frames whose teacher features were computed on their own
    (not in the teacher stage's pass)."""
    counted = {"frames": 0}
    original = Teacher.predict_features

    def counting(self: Teacher, frames: np.ndarray) -> torch.Tensor:
        counted["frames"] += len(frames)
        return original(self, frames)

    monkeypatch.setattr(Teacher, "predict_features", counting)
    refiner = {"refiner": str(made["refiner"])} if method == "warp-refine" else {}
    report = label_store(url, LabelSettings(propagation=PropagationConfig(method=method),
                                            teacher=str(made["teacher"]), **refiner, **extra))
    monkeypatch.setattr(Teacher, "predict_features", original)
    assert [o.status for o in report.outcomes] == ["labelled"] * 2, report.failed
    return counted["frames"]


class TestWarpRefineUsesTheTeacherStagesFeatures:
    def test_no_second_pass_and_the_same_results(self, made: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        kept, again = str(tmp_path / "kept.zarr"), str(tmp_path / "again.zarr")
        shutil.copytree(made["store"], kept)
        shutil.copytree(made["store"], again)
        assert _label(made, kept, monkeypatch) == 0
        assert _label(made, again, monkeypatch, teacher_feature_scratch_mb=0) > 0
        assert feature_scratch.scratch_bytes() == 0  # released when each drive was labelled
        for seq_id in SequenceStore.open(kept).sequence_ids():
            got, want = SequenceStore.open(kept).sequence(seq_id), SequenceStore.open(again).sequence(seq_id)
            for method in ("warp-refine", "warp-inpaint"):
                for name in ("labels", "confidence", "distance"):
                    np.testing.assert_array_equal(np.asarray(got.array(f"results/{method}/{name}")[:]),
                                                  np.asarray(want.array(f"results/{method}/{name}")[:]),
                                                  err_msg=f"{method} {seq_id} {name}")
                assert got.stages[f"estimate/{method}"]["calibration"] == \
                    want.stages[f"estimate/{method}"]["calibration"]

    def test_a_teacher_output_stored_earlier_computes_them_here(self, made: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
        url = str(tmp_path / "stored.zarr")
        shutil.copytree(made["store"], url)
        assert _label(made, url, monkeypatch, method="warp-inpaint") == 0
        store = SequenceStore.open(url)
        versions = {s: store.sequence(s).stages[TEACHER]["at"] for s in store.sequence_ids()}
        assert _label(made, url, monkeypatch) > 0  # the teacher stage was current: nothing kept
        store = SequenceStore.open(url)
        assert {s: store.sequence(s).stages[TEACHER]["at"] for s in store.sequence_ids()} == versions
