"""The one evaluator: per-sequence rows, pooled tables, K, stored evaluations, drives without ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autolabel.models.metrics import confusion_matrix, mean_iou
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import PropagationConfig
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.ingest import IngestOptions, ingest
from autolabel.storage.readers import read_dataset
from autolabel.storage.stages import evaluation_stage
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_apollo_layout, write_synthetic_store
from autolabel.tasks import evaluate as evaluate_module
from autolabel.tasks.evaluate import evaluate_store, score_sequence
from autolabel.tasks.pipeline import LabelSettings, label_store

DRIVE = SyntheticConfig(width=64, height=48, frames=23, seed=0)


def _motion(k: int = 10, backend: str = "exact") -> LabelSettings:
    return LabelSettings(propagation=PropagationConfig(method="motion-only", max_distance=k),
                         flow=FlowConfig(backend=backend, workers=1))


class TestEvaluateStore:
    def test_rows_and_pooled_numbers_come_from_the_frames(self, store_url: str) -> None:
        write_synthetic_store(store_url, drive_configs(2, DRIVE), AnnotationPolicy(mode="window", n=21))
        label_store(store_url, _motion())
        store = SequenceStore.open(store_url)
        report = evaluate_store(store, ["motion-only"]).methods["motion-only"]
        c = store.classes.num_classes
        pooled_by_d = {d: np.zeros((c, c + 1), np.int64) for d in range(1, 11)}
        for row in report.sequences:
            seq = store.sequence(row.sequence)
            labels = seq.array("results/motion-only/labels")
            distance = seq.array("results/motion-only/distance")[:]
            own = np.zeros((c, c + 1), np.int64)
            for t in range(seq.num_frames):
                if 1 <= distance[t] <= 10 and not seq.annotated[t]:
                    cm = confusion_matrix(seq.ground_truth(t), labels[t], c)
                    own += cm
                    pooled_by_d[int(distance[t])] += cm
            assert row.miou == pytest.approx(mean_iou(own), abs=0.01)
            assert row.frames_labelled == 21 and row.frames_scored == 20 and row.coverage == 100.0
        for d, cm in pooled_by_d.items():
            assert report.miou_by_distance[str(d)] == pytest.approx(mean_iou(cm), abs=0.01)
        assert report.frames_scored == 40 and report.per_sequence_miou.keys() == {"synth-0000", "synth-0001"}

    def test_k_of_the_request_is_the_k_scored(self, local_store_url: str) -> None:
        write_synthetic_store(local_store_url, drive_configs(1, DRIVE), AnnotationPolicy(mode="window", n=21))
        label_store(local_store_url, _motion(k=5))
        report = evaluate_store(SequenceStore.open(local_store_url), ["motion-only"])
        assert report.max_distance == 5
        m = report.methods["motion-only"]
        assert list(m.miou_by_distance) == ["1", "2", "3", "4", "5"] and m.frames_scored == 10

    def test_stored_evaluation_is_used_until_the_results_change(self, local_store_url: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
        write_synthetic_store(local_store_url, drive_configs(1, DRIVE), AnnotationPolicy(mode="window", n=21))
        label_store(local_store_url, _motion())
        seq = SequenceStore.open(local_store_url).sequence("synth-0000")
        assert evaluation_stage("motion-only") in seq.stages
        fresh = score_sequence(seq, "motion-only", 10)

        def forbidden(*args: object, **kw: object) -> None:
            raise AssertionError("a current stored evaluation was scored again")

        monkeypatch.setattr(evaluate_module, "score_sequence", forbidden)
        stored = evaluate_store(SequenceStore.open(local_store_url), ["motion-only"]).methods["motion-only"]
        assert stored.sequences[0].miou == fresh.miou and stored.sequences[0].confusion == fresh.confusion
        monkeypatch.undo()
        label_store(local_store_url, _motion(k=3))  # new results: the stored evaluation no longer applies
        again = evaluate_store(SequenceStore.open(local_store_url), ["motion-only"], max_distance=3)
        assert again.methods["motion-only"].frames_scored == 6

    def test_missing_results_are_listed(self, local_store_url: str) -> None:
        write_synthetic_store(local_store_url, drive_configs(1, DRIVE), AnnotationPolicy(mode="window", n=21))
        report = evaluate_store(SequenceStore.open(local_store_url), ["motion-only"])
        assert report.methods["motion-only"].sequences_missing == ["synth-0000"]
        assert report.methods["motion-only"].miou_mean is None

    def test_json_keys(self, local_store_url: str) -> None:
        write_synthetic_store(local_store_url, drive_configs(1, DRIVE), AnnotationPolicy(mode="window", n=21))
        label_store(local_store_url, _motion())
        data = evaluate_store(SequenceStore.open(local_store_url), ["motion-only"]).model_dump(mode="json")
        m = data["methods"]["motion-only"]
        assert {"miou_mean", "miou_by_distance", "per_class_iou", "per_sequence_miou", "frames_scored",
                "sequences", "sequences_missing"} <= set(m)
        assert "confusion" not in m["sequences"][0]


def test_a_drive_without_ground_truth_shows_coverage_and_confidence(tmp_path: Path) -> None:
    write_apollo_layout(tmp_path / "inbox", drive_configs(1, DRIVE))
    for i, label in enumerate(sorted((tmp_path / "inbox").rglob("*_bin.png"))):
        if i != 10:
            label.unlink()  # keep one labelled frame, the annotation: no ground truth to score
    url = str(tmp_path / "s.zarr")
    ingest(read_dataset("apollo", tmp_path / "inbox"), url, IngestOptions(annotation=AnnotationPolicy()))
    seq_id = SequenceStore.open(url).sequence_ids()[0]
    label_store(url, _motion(backend="dis-fast"))
    row = evaluate_store(SequenceStore.open(url), ["motion-only"]).methods["motion-only"].sequences[0]
    assert row.sequence == seq_id and not row.has_gt and row.miou is None
    assert row.frames_labelled == 21 and row.coverage == 100.0
    assert row.mean_confidence is not None and 50 < row.mean_confidence <= 100


def test_ground_truth_read_in_blocks_equals_frame_by_frame(tmp_path: Path) -> None:
    """Evaluation reads ground truth a shard at a time; a keyframe added to a drive without ground
    truth gives its annotation there, as it does frame by frame."""
    write_apollo_layout(tmp_path / "inbox", drive_configs(1, DRIVE))
    for i, label in enumerate(sorted((tmp_path / "inbox").rglob("*_bin.png"))):
        if i != 10:
            label.unlink()
    url = str(tmp_path / "s.zarr")
    ingest(read_dataset("apollo", tmp_path / "inbox"), url, IngestOptions(annotation=AnnotationPolicy()))
    store = SequenceStore.open(url, mode="r+")
    seq_id = store.sequence_ids()[0]
    seq = store.sequence(seq_id)
    added = np.full((seq.height, seq.width), 2, np.uint8)
    store.add_keyframes(seq_id, {15: added})
    seq = store.sequence(seq_id)
    block = seq.ground_truths(8, seq.num_frames)
    np.testing.assert_array_equal(block, np.stack([seq.ground_truth(t) for t in range(8, seq.num_frames)]))
    np.testing.assert_array_equal(block[15 - 8], added)
    assert (block[0] == store.classes.ignore_index).all()  # frame 8: no ground truth
    with pytest.raises(IndexError, match="out of range"):
        seq.ground_truths(5, seq.num_frames + 1)


class TestFrameTally:
    """Segments of a drive tally their own frames; the tallies add up to the drive's evaluation."""

    def test_tallies_of_frame_ranges_add_up_to_the_whole(self, local_store_url: str) -> None:
        write_synthetic_store(local_store_url, drive_configs(1, DRIVE.model_copy(update={"frames": 45})),
                              AnnotationPolicy(mode="window", n=21))
        label_store(local_store_url, _motion())
        seq = SequenceStore.open(local_store_url).sequence("synth-0000")
        calibration, basis = evaluate_module.sequence_calibration(seq, "motion-only")
        assert calibration is not None  # the estimate ran: expected counts are tallied too
        whole = evaluate_module.tally_frames(seq, "motion-only", 10, calibration)
        parts = [evaluate_module.tally_frames(seq, "motion-only", 10, calibration, r)
                 for r in ((0, 16), (16, 32), (32, 45))]
        total = sum(parts, evaluate_module.FrameTally())
        assert total.to_json() == whole.to_json()
        assert sum(p.pixels for p in parts) == whole.pixels > 0 and len(whole.worst) == 5
        assert all(p.confusion and p.expected for p in parts)  # every range scored frames: the sum is not trivial
        row = evaluate_module.sequence_row(seq, "motion-only", 10, total, calibration, basis)
        assert row == score_sequence(seq, "motion-only", 10) and row.estimated_miou is not None

    def test_the_estimate_uses_the_box_its_deficit_ratio_was_fitted_with(self, local_store_url: str) -> None:
        """EstimateConfig.spread reaches the evaluation: the tallied expected counts are those of the
        calibration's box, not the default's."""
        from autolabel.models.quality import EstimateConfig, expected_counts

        write_synthetic_store(local_store_url, drive_configs(1, DRIVE), AnnotationPolicy(mode="window", n=21))
        label_store(local_store_url, _motion().model_copy(update={"estimate": EstimateConfig(spread=3)}))
        seq = SequenceStore.open(local_store_url).sequence("synth-0000")
        calibration, _ = evaluate_module.sequence_calibration(seq, "motion-only")
        assert calibration is not None and calibration.spread == 3
        assert seq.stages["estimate/motion-only"]["calibration"]["spread"] == 3
        tally = evaluate_module.tally_frames(seq, "motion-only", 10, calibration, (1, 10))
        labels, conf = seq.array("results/motion-only/labels"), seq.array("results/motion-only/confidence")
        c, ignore = seq.store.classes.num_classes, seq.store.classes.ignore_index

        def expected(spread: int) -> np.ndarray:
            prob = [np.where(labels[t] != ignore, calibration.calibration(conf[t] / 255.0, labels[t]), 0.0)
                    for t in range(1, 10)]
            return sum(expected_counts(labels[t], p, c, ignore, spread) for t, p in zip(range(1, 10), prob))

        tallied = sum(tally.expected.values()) / evaluate_module.EXPECTED_SCALE
        np.testing.assert_allclose(tallied, expected(3), atol=1e-3)
        assert np.abs(tallied - expected(9)).max() > 1.0

    def test_json_round_trip(self) -> None:
        tally = evaluate_module.FrameTally({1: np.arange(6).reshape(2, 3)}, {2: np.ones((2, 3), np.int64)}, 5, 9, 7,
                                           [(3, None, 50.0)])
        back = evaluate_module.FrameTally.from_json(tally.to_json())
        assert back.to_json() == tally.to_json() and back.worst == [(3, None, 50.0)]
