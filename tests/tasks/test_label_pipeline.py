"""Stages on a real store: flow -> teacher -> propagate -> evaluate, re-runs, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import PropagationConfig
from autolabel.models.teacher import Teacher
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.stages import flow_array_names, flow_stage
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store
from autolabel.storage.training_data import AnnotatedFrames
from autolabel.tasks.evaluate import evaluate_store
from autolabel.tasks.pipeline import LabelSettings, label_store
from autolabel.tasks.propagate import propagate_sequence
from autolabel.tasks.review import store_frame_errors

from autolabel.errors import ClassSetMismatchError, ConfigError, StageNotDoneError

from tests.conftest import RecordingProgress


def _request(method: str, teacher: Path | None = None, flow: str = "dis-fast", **kw) -> LabelSettings:
    return LabelSettings(propagation=PropagationConfig(method=method, **kw),
                         flow=FlowConfig(backend=flow, workers=1), teacher=str(teacher) if teacher else None)


def test_training_data_holds_only_annotated_frames(synth_store: str) -> None:
    data = AnnotatedFrames([SequenceStore.open(synth_store)])
    assert len(data) == 2 and data.index == [(0, 10), (1, 10)]


def test_all_methods_label_and_evaluate(synth_store: str, teacher_path: Path) -> None:
    for method in ("motion-only", "semantic-only", "warp-inpaint"):
        report = label_store(synth_store, _request(method, teacher_path))
        assert [o.status for o in report.outcomes] == ["labelled", "labelled"], report.failed
    store = SequenceStore.open(synth_store)
    seq = store.sequence("synth-0000")
    assert {"flow/dis-fast", "teacher", "results/motion-only", "results/warp-inpaint"} <= set(seq.stages)
    distance = seq.array("results/warp-inpaint/distance")[:]
    assert distance.tolist() == [10 - t if t <= 10 else (t - 10 if t <= 20 else -1) for t in range(25)]
    report = evaluate_store(store, ["motion-only", "semantic-only", "warp-inpaint"])
    for method, m in report.methods.items():
        assert m.frames_scored == 40, method  # 2 sequences x 20 frames within K = 10
        assert set(m.miou_by_distance) == {str(d) for d in range(1, 11)}
        assert set(m.per_class_iou) == set(store.classes.names)
        assert set(m.per_sequence_miou) == {"synth-0000", "synth-0001"}
        assert m.miou_mean is not None and 0 <= m.miou_mean <= 100
    motion = report.methods["motion-only"].miou_by_distance
    assert motion["1"] > motion["10"]  # labels degrade with distance from the annotation


def test_rerun_skips_and_new_settings_recompute(synth_store: str, teacher_path: Path) -> None:
    assert label_store(synth_store, _request("warp-inpaint", teacher_path)).outcomes[0].status == "labelled"
    assert label_store(synth_store, _request("warp-inpaint", teacher_path)).outcomes[0].status == "skipped"
    again = label_store(synth_store, _request("warp-inpaint", teacher_path, tau=10.0))
    assert again.outcomes[0].status == "labelled"


def test_a_one_frame_sequence_labels_once_and_verifies(tmp_path: Path) -> None:
    """A sequence of one frame (CamVid's layout: 337 of them) has no flow pair: its flow arrays were
    left one row long and never written, so `verify` reported a missing chunk and every `label`
    dropped the flow and computed it and everything after it again."""
    from autolabel.storage.integrity import verify_store

    url = str(tmp_path / "s.zarr")
    write_synthetic_store(url, drive_configs(1, SyntheticConfig(width=48, height=32, frames=1, seed=0)))
    settings = _request("motion-only")
    assert label_store(url, settings).outcomes[0].status == "labelled"
    fw, bw = (SequenceStore.open(url).sequence("synth-0000").array(n) for n in flow_array_names("dis-fast"))
    assert fw.shape[0] == bw.shape[0] == 0
    assert verify_store(url).ok
    assert label_store(url, settings).outcomes[0].status == "skipped"


def test_missing_teacher() -> None:
    with pytest.raises(ConfigError, match="needs a teacher checkpoint: pass --teacher"):
        _request("warp-inpaint")


def test_teacher_with_other_classes(synth_store: str, tmp_path: Path) -> None:
    other = Teacher.create("unet-tiny", ["a", "b"], [[0, 0, 0], [1, 1, 1]])
    other.save(tmp_path / "other.pt")
    with pytest.raises(ClassSetMismatchError, match="teacher predicts classes \\['a', 'b'\\]"):
        label_store(synth_store, _request("semantic-only", tmp_path / "other.pt"))


def test_labelling_before_flow_exists(synth_store: str) -> None:
    store = SequenceStore.open(synth_store, mode="r+")
    with pytest.raises(StageNotDoneError, match="has no dis-fast flow yet"):
        propagate_sequence(store, "synth-0000", PropagationConfig(method="motion-only"), "dis-fast")


def test_exact_flow_on_a_store_without_it_fails_each_sequence(local_store_url: str, tmp_path: Path) -> None:
    from autolabel.storage.ingest import ingest
    from autolabel.storage.readers import ReaderOptions, read_dataset

    from tests.conftest import classes_file, good_sequence

    root, labels = tmp_path / "drives", tmp_path / "labels"
    good_sequence(root, labels, "real", frames=3)
    ingest(read_dataset("folder", root, ReaderOptions(labels=labels, classes_file=classes_file(tmp_path))), local_store_url)
    report = label_store(local_store_url, _request("motion-only", flow="exact"))
    assert report.failed and "has no exact flow: only synthetic drives store it" in (report.failed[0].error or "")


def test_motion_only_with_exact_flow_reaches_98_miou_at_distance_one(local_store_url: str) -> None:
    """Acceptance: proves the warp convention end to end. A gentle 30 fps drive whose classes have
    no sub-pixel parts (poles, fence slats and limbs alias under nearest-pixel warping)."""
    cfg = SyntheticConfig(width=320, height=240, frames=42, fps=30.0, ego_speed=(2.0, 3.0),
                          classes=["Sky", "Building", "Road", "Pavement", "Tree", "Car"])
    write_synthetic_store(local_store_url, drive_configs(3, cfg), AnnotationPolicy(mode="window", n=21))
    label_store(local_store_url, _request("motion-only", flow="exact"))
    report = evaluate_store(SequenceStore.open(local_store_url), ["motion-only"])
    assert report.methods["motion-only"].miou_by_distance["1"] >= 98.0


def test_reversed_flow_convention_is_caught(local_store_url: str) -> None:
    """The control for the test above: reading the forward flow where the backward flow belongs
    (and vice versa) must score clearly worse, on a drive fast enough for the sign to matter."""
    cfg = SyntheticConfig(width=160, height=120, frames=23, fps=10.0, ego_speed=(8.0, 9.0),
                          classes=["Sky", "Building", "Road", "Pavement", "Tree", "Car"])
    write_synthetic_store(local_store_url, [cfg], AnnotationPolicy(mode="window", n=21))
    store = SequenceStore.open(local_store_url, mode="r+")
    seq = store.sequence("synth-0000")
    fw, bw = (seq.array(n)[:] for n in flow_array_names("exact"))
    with store.writing("synth-0000", flow_stage("swapped")) as out:
        for name, data in (("fw", bw), ("bw", fw)):
            out.group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(1, *data.shape[1:]))[:] = data
        out.publish()
    scores = {}
    for flow in ("exact", "swapped"):
        propagate_sequence(store, "synth-0000", PropagationConfig(method="motion-only"), flow)
        scores[flow] = evaluate_store(store, ["motion-only"]).methods["motion-only"].miou_by_distance["1"]
    assert scores["swapped"] < scores["exact"] - 10, scores


def test_every_stage_progress_reaches_its_total(synth_store: str, teacher_path: Path) -> None:
    """A bar that stops short (a log whose last line says 75 %) looks like a stage that hung."""
    progress = RecordingProgress()
    report = label_store(synth_store, _request("warp-inpaint", teacher_path), progress=progress)
    assert [o.status for o in report.outcomes] == ["labelled", "labelled"], report.failed
    computed = [s for s in progress.stages if s[2] > 0]
    assert {s[1] for s in computed} >= {"evaluate"}
    assert [s for s in computed if s[3] != s[2]] == []
    # the review queue's read of the results (`autolabel review`): one advance per frame as well
    store = SequenceStore.open(synth_store)
    ids = store.sequence_ids()
    read: list[int] = []
    store_frame_errors(store, "warp-inpaint", ids, lambda: read.append(1))
    assert len(read) == sum(store.sequence(i).num_frames for i in ids)
