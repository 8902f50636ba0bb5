"""Keyframes added after ingest: stored atomically, and only the frames that depend on them relabelled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import PropagationConfig, affected_windows
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store
from autolabel.tasks.pipeline import LabelSettings, label_store

from autolabel.errors import InputDataError, LabelValueError

DRIVE = SyntheticConfig(width=64, height=48, frames=42, seed=0)


def _settings(method: str, teacher: Path) -> LabelSettings:
    return LabelSettings(propagation=PropagationConfig(method=method, max_distance=10),
                         flow=FlowConfig(backend="dis-fast", workers=1), teacher=str(teacher))


def _results(store: SequenceStore, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seq = store.sequence("synth-0000")
    return tuple(np.asarray(seq.array(f"results/{method}/{name}")[:])  # type: ignore[return-value]
                 for name in ("labels", "confidence", "distance"))


class TestAffectedWindows:
    def test_new_keyframe_between_two(self) -> None:
        assert affected_windows({10: "a", 31: "b"}, {10: "a", 20: "n", 31: "b"}, 42) == [(10, 31)]

    def test_before_the_first_and_after_the_last(self) -> None:
        assert affected_windows({10: "a"}, {3: "n", 10: "a", 30: "m"}, 42) == [(0, 41)]  # anchor 10 shared: merged
        assert affected_windows({10: "a", 20: "b"}, {3: "n", 10: "a", 20: "b", 30: "m"}, 42) == [(0, 10), (20, 41)]

    def test_changed_label_and_merged_windows(self) -> None:
        assert affected_windows({10: "a", 20: "b", 31: "c"}, {10: "a", 20: "B", 31: "c", 25: "n"}, 42) == [(10, 31)]

    def test_removed_keyframe_means_everything(self) -> None:
        assert affected_windows({10: "a", 31: "b"}, {10: "a"}, 42) is None

    def test_nothing_changed(self) -> None:
        assert affected_windows({10: "a"}, {10: "a"}, 42) == []


class TestAddKeyframes:
    @pytest.fixture
    def store(self, store_url: str) -> SequenceStore:
        write_synthetic_store(store_url, drive_configs(1, DRIVE), AnnotationPolicy(mode="window", n=21))
        return SequenceStore.open(store_url, mode="r+")

    def test_smoke_added_frames_are_annotated_and_change_the_content_hash(self, store: SequenceStore) -> None:
        seq = store.sequence("synth-0000")
        before = seq.content_hash
        label = seq.ground_truth(20)
        assert store.add_keyframes("synth-0000", {20: label}, "review") == [20]
        seq = store.sequence("synth-0000")
        assert np.flatnonzero(seq.annotated).tolist() == [10, 20, 31]
        np.testing.assert_array_equal(seq.annotation(20), label)
        assert seq.content_hash != before and seq.stages["keyframes"]["source"] == "review"

    def test_a_frame_given_again_takes_its_new_label(self, store: SequenceStore) -> None:
        store.add_keyframes("synth-0000", {20: np.zeros((48, 64), np.uint8)})
        store.add_keyframes("synth-0000", {5: np.ones((48, 64), np.uint8), 20: np.full((48, 64), 2, np.uint8)})
        seq = store.sequence("synth-0000")
        assert seq.stages["keyframes"]["frames"] == [5, 20] and (seq.annotation(20) == 2).all()

    @pytest.mark.parametrize(("t", "label", "error", "match"), [
        (99, np.zeros((48, 64), np.uint8), InputDataError, "no frame 99"),
        (3, np.zeros((10, 10), np.uint8), InputDataError, "10x10"),
        (3, np.full((48, 64), 77, np.uint8), LabelValueError, r"values \[77\]"),
    ])
    def test_bad_annotations_fail_and_change_nothing(self, store: SequenceStore, t: int, label: np.ndarray,
                                                     error: type[Exception], match: str) -> None:
        with pytest.raises(error, match=match):
            store.add_keyframes("synth-0000", {t: label})
        assert "keyframes" not in store.sequence("synth-0000").stages


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher for the synthetic class set (one per module: the stores here are local only)."""
    from autolabel.models.teacher import Teacher
    from autolabel.models.teacher_training import TeacherTrainConfig, train_teacher
    from autolabel.storage.training_data import AnnotatedFrames

    tmp = tmp_path_factory.mktemp("teacher")
    write_synthetic_store(str(tmp / "t.zarr"), drive_configs(1, DRIVE), AnnotationPolicy(mode="window", n=21))
    store = SequenceStore.open(str(tmp / "t.zarr"))
    teacher = Teacher.create("unet-tiny", store.classes.names, [list(c) for c in store.classes.palette])
    train_teacher(teacher, AnnotatedFrames([store]), TeacherTrainConfig(arch="unet-tiny", max_steps=4, batch_size=2,
                                                                        crop=64))
    teacher.save(tmp / "teacher.pt")
    return tmp / "teacher.pt"


def _keyframe_added_at_20(tmp_path: Path, teacher_path: Path, methods: tuple[str, ...]) \
        -> tuple[list[str], SequenceStore, SequenceStore, dict[str, tuple[np.ndarray, ...]]]:
    """Two copies of a drive with keyframes 10 and 31, the first labelled with ``methods`` (its results
    returned as they were), then keyframe 20 added to both."""
    urls = [str(tmp_path / f"{name}.zarr") for name in ("partial", "full")]
    for url in urls:
        write_synthetic_store(url, drive_configs(1, DRIVE), AnnotationPolicy(mode="window", n=21))
    partial, full = (SequenceStore.open(u, mode="r+") for u in urls)
    for method in methods:
        label_store(urls[0], _settings(method, teacher_path))
    before = {m: _results(partial, m) for m in methods}
    for store in (partial, full):
        store.add_keyframes("synth-0000", {20: store.sequence("synth-0000").ground_truth(20)})
    return urls, partial, full, before


def test_partial_relabel_equals_full_relabel(tmp_path: Path, teacher_path: Path) -> None:
    """A keyframe added at 20 (keyframes 10 and 31): frames 11..30 are propagated again, nothing else."""
    methods = ("motion-only", "warp-inpaint")
    urls, partial, full, before = _keyframe_added_at_20(tmp_path, teacher_path, methods)
    for method in methods:
        assert [o.status for o in label_store(urls[0], _settings(method, teacher_path)).outcomes] == ["labelled"]
        label_store(urls[1], _settings(method, teacher_path))
        record = partial.sequence("synth-0000").stages[f"results/{method}"]
        assert record["partial"] and record["relabelled_frames"] == 20, method
        after, reference = _results(partial, method), _results(full, method)
        for a, r in zip(after, reference):
            np.testing.assert_array_equal(a, r)  # identical to labelling the whole drive again
        outside = np.r_[0:11, 31:42]
        for a, b in zip(after, before[method]):
            np.testing.assert_array_equal(a[outside], b[outside])
        assert after[2][20] == 0 and before[method][2][20] == 10


def test_methods_relabel_the_same_windows_together(tmp_path: Path, teacher_path: Path) -> None:
    """After a keyframe is added, methods whose stored results share the keyframes relabel the same
    window in one pass; each gets what labelling the whole drive again gives it."""
    from autolabel.tasks.propagate import propagate_methods

    methods = ("motion-only", "warp-inpaint")
    urls, partial, full, _ = _keyframe_added_at_20(tmp_path, teacher_path, methods)
    for method in methods:
        label_store(urls[1], _settings(method, teacher_path))
    configs = [_settings(m, teacher_path).propagation for m in methods]
    steps: list[int] = []
    computed = propagate_methods(partial, "synth-0000", configs, "dis-fast", on_step=lambda: steps.append(1))
    assert computed == [True, True]
    from autolabel.models.propagation import count_steps

    window = partial.sequence("synth-0000").annotated[10:32]  # keyframes 10, 20, 31
    assert len(steps) == 2 * count_steps(window, 10) == 2 * 38  # both methods, frames 11..30 only
    for method in methods:
        record = partial.sequence("synth-0000").stages[f"results/{method}"]
        assert record["partial"] and record["relabelled_frames"] == 20, method
        for a, r in zip(_results(partial, method), _results(full, method)):
            np.testing.assert_array_equal(a, r, err_msg=method)
    assert propagate_methods(partial, "synth-0000", configs, "dis-fast") == [False, False]
