"""Refiner training from stores and warp-refine labelling through the store stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from autolabel.errors import CheckpointError, ConfigError
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import PropagationConfig
from autolabel.models.refiner import Refiner
from autolabel.models.refiner_training import RefinerTrainConfig
from autolabel.storage.store import Sequence, SequenceStore
from autolabel.tasks.evaluate import evaluate_store
from autolabel.tasks.pipeline import LabelSettings, label_store
from autolabel.tasks.refiner_training import RefinerRequest, train_refiner_from_stores

TRAIN = RefinerTrainConfig(arch="refine-tiny", steps=3, batch_size=2, crop=32, max_cycle=2)


def _request(store: str, teacher: Path, out: Path, **kw) -> RefinerRequest:  # noqa: ANN003
    return RefinerRequest(stores=[store], teacher=teacher, out=out, train=TRAIN,
                          flow=FlowConfig(backend="exact"), **kw)


def test_training_reads_annotations_only(synth_store: str, teacher_path: Path, tmp_path: Path,  # noqa: F811
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[tuple[str, int]] = []
    original = Sequence.annotation

    def spy(self: Sequence, t: int):  # noqa: ANN202
        read.append((self.id, t))
        return original(self, t)

    def forbidden(self: Sequence, t: int):  # noqa: ANN202
        raise AssertionError(f"refiner training read the ground truth of {self.id} frame {t}")

    monkeypatch.setattr(Sequence, "annotation", spy)
    monkeypatch.setattr(Sequence, "ground_truth", forbidden)
    info = train_refiner_from_stores(_request(synth_store, teacher_path, tmp_path / "r.pt"))
    # two drives, annotated at frame 10 only; cycles of length 1 and 2 both ways
    assert info["samples"] == 8 and info["cycles"] == {"1": 4, "2": 4}
    assert set(read) == {("synth-0000", 10), ("synth-0001", 10)}
    refiner = Refiner.load(tmp_path / "r.pt")
    assert refiner.train_info["samples"] == 8 and refiner.classes == SequenceStore.open(synth_store).classes.names


def test_warp_refine_labels_and_evaluates_and_skips_reruns(synth_store: str, teacher_path: Path,  # noqa: F811
                                                           tmp_path: Path) -> None:
    train_refiner_from_stores(_request(synth_store, teacher_path, tmp_path / "r.pt", max_samples=3))
    request = LabelSettings(propagation=PropagationConfig(method="warp-refine"), flow=FlowConfig(backend="exact"),
                            teacher=str(teacher_path), refiner=str(tmp_path / "r.pt"))
    report = label_store(synth_store, request)
    assert [o.status for o in report.outcomes] == ["labelled", "labelled"], report.failed
    assert [o.status for o in label_store(synth_store, request).outcomes] == ["skipped", "skipped"]
    seq = SequenceStore.open(synth_store).sequence("synth-0000")
    assert len(seq.stages["results/warp-refine"]["settings"]["refiner_sha256"]) == 64
    assert "results/warp-inpaint" in seq.stages  # stored beside warp-refine for comparison
    result = evaluate_store(SequenceStore.open(synth_store), ["warp-refine"]).methods["warp-refine"]
    assert result.frames_scored == 2 * 20 and result.miou_mean is not None


def test_warp_refine_errors(synth_store: str, teacher_path: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match="needs a refiner"):
        LabelSettings(propagation=PropagationConfig(method="warp-refine"), teacher=str(teacher_path))
    train_refiner_from_stores(_request(synth_store, teacher_path, tmp_path / "r.pt", max_samples=2))
    other_teacher = tmp_path / "other.pt"
    from autolabel.models.teacher import Teacher

    t = Teacher.load(teacher_path)
    t.train_info = {"other": True}
    t.save(other_teacher)
    wrong = LabelSettings(propagation=PropagationConfig(method="warp-refine"), teacher=str(other_teacher),
                          refiner=str(tmp_path / "r.pt"))
    with pytest.raises(CheckpointError, match="retrain the refiner"):
        label_store(synth_store, wrong)


def test_single_frames_give_no_cycles(tmp_path: Path, teacher_path: Path) -> None:  # noqa: F811
    from autolabel.storage.annotation import AnnotationPolicy
    from autolabel.storage.synthetic import SyntheticConfig, drive_configs
    from autolabel.storage.synthetic_io import write_synthetic_store

    store = str(tmp_path / "single.zarr")
    write_synthetic_store(store, drive_configs(1, SyntheticConfig(width=64, height=48, frames=1)),
                          AnnotationPolicy(mode="all"))
    with pytest.raises(ConfigError, match="cycles through video"):
        train_refiner_from_stores(_request(store, teacher_path, tmp_path / "r.pt"))
