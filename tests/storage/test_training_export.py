"""Training-set export: Cityscapes-like and folder layouts, confidence threshold, keyframes, manifest."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autolabel.errors import ConfigError
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import PropagationConfig
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store
from autolabel.storage.training_export import (ExportedFrames, export_sequence_for_training, export_training_set,
                                               keyframe_distance, source_keyframe)
from autolabel.tasks.pipeline import LabelSettings, label_store
from tests.conftest import run_cli

DRIVE = SyntheticConfig(width=48, height=32, frames=12, seed=0)


@pytest.fixture
def labelled(tmp_path: Path) -> str:
    """Two drives with keyframes at 2 and 7, labelled motion-only (K = 10)."""
    store = str(tmp_path / "store.zarr")
    write_synthetic_store(store, drive_configs(2, DRIVE), AnnotationPolicy(mode="window", n=5))
    settings = LabelSettings(propagation=PropagationConfig(method="motion-only"), flow=FlowConfig(backend="exact"),
                             estimate={"enabled": False})
    assert all(o.status == "labelled" for o in label_store(store, settings).outcomes)
    return store


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


class TestTrainingExport:
    def test_source_keyframe(self) -> None:
        annotated = np.zeros(12, bool)
        annotated[[2, 7]] = True
        assert [source_keyframe(annotated, t, d) for t, d in ((0, 2), (5, 2), (4, 2), (11, 4), (7, 0))] == \
            [2, 7, 2, 7, 7]

    def test_folder_layout_and_manifest(self, labelled: str, tmp_path: Path) -> None:
        store = SequenceStore.open(labelled)
        out = tmp_path / "out"
        rows, failures = export_training_set(store, "motion-only", out, store.sequence_ids(), "folder")
        assert failures == [] and len(rows) == 24  # every frame is within K of a keyframe
        seq = store.sequence("synth-0000")
        names = seq.frame_names
        by_t = {r.t: r for r in rows if r.sequence == "synth-0000"}
        assert [t for t, r in by_t.items() if r.keyframe] == [2, 7]
        assert by_t[2].method == "manual" and by_t[2].distance == 0 and by_t[2].source_keyframe == names[2]
        assert by_t[0].distance == 2 and by_t[0].source_keyframe == names[2] and by_t[0].method == "motion-only"
        assert by_t[11].distance == 4 and by_t[11].source_keyframe == names[7]
        np.testing.assert_array_equal(_png(out / by_t[2].image), seq.frame(2))
        np.testing.assert_array_equal(_png(out / by_t[2].label), seq.annotation(2))
        stored = np.asarray(seq.array("results/motion-only/labels")[5])
        np.testing.assert_array_equal(_png(out / "labels" / "synth-0000" / f"{names[5]}.png"), stored)
        conf = np.asarray(seq.array("results/motion-only/confidence")[5]) / 255.0
        valid = stored != 255
        assert by_t[5].mean_confidence == pytest.approx(conf[valid].mean(), abs=1e-4)
        manifest = list(csv.DictReader(io.StringIO((out / "manifest.csv").read_text())))
        assert len(manifest) == 24 and manifest[0].keys() >= {"frame", "source_keyframe", "distance", "method",
                                                               "mean_confidence", "keyframe"}
        classes = json.loads((out / "classes.json").read_text())
        assert classes["names"] == store.classes.names and classes["ignore_index"] == 255
        assert json.loads((out / "manifest.json").read_text())["layout"] == "folder"

    def test_read_back_and_filter_by_distance(self, labelled: str, tmp_path: Path) -> None:
        store = SequenceStore.open(labelled)
        out = tmp_path / "out"
        export_training_set(store, "motion-only", out, store.sequence_ids(), "folder")
        every = ExportedFrames(out)
        assert len(every) == 24
        image, label = every[0]
        row = every.rows[0]
        seq = store.sequence(row.sequence)
        np.testing.assert_array_equal(image, seq.frame(row.t))
        np.testing.assert_array_equal(label, np.asarray(seq.array("results/motion-only/labels")[row.t])
                                      if not row.keyframe else seq.annotation(row.t))
        # distances per drive (keyframes 2, 7): t0 2, t1 1, t3 1, t4 2, t5 2, t6 1, t8 1, t9 2, t10 3, t11 4
        near = ExportedFrames(out, max_distance=1)
        assert sorted({r.distance for r in near.rows}) == [0, 1] and len(near) == 2 * 6
        even = ExportedFrames(out, distances=[2, 4])
        assert sorted({r.distance for r in even.rows}) == [0, 2, 4] and len(even) == 2 * 7
        assert sum(r.keyframe for r in even.rows) == 4  # keyframes always kept
        assert len(ExportedFrames(out, max_distance=3, distances=[2, 4])) == 2 * 6

    def test_ground_truth_export_records_keyframe_distance(self, labelled: str, tmp_path: Path) -> None:
        store = SequenceStore.open(labelled)
        rows, failures = export_training_set(store, "gt", tmp_path / "gt", ["synth-0000"], "folder")
        seq = store.sequence("synth-0000")
        names = seq.frame_names
        assert failures == [] and len(rows) == 12  # synthetic drives carry ground truth on every frame
        assert [r.distance for r in rows] == [2, 1, 0, 1, 2, 2, 1, 0, 1, 2, 3, 4]
        assert [r.source_keyframe for r in rows[3:6]] == [names[2], names[2], names[7]]
        assert {r.method for r in rows if not r.keyframe} == {"gt"}
        np.testing.assert_array_equal(ExportedFrames(tmp_path / "gt")[10][1], seq.ground_truth(10))
        assert keyframe_distance(np.zeros(3, bool)).tolist() == [-1, -1, -1]

    def test_min_confidence_ignores_propagated_pixels_only(self, labelled: str, tmp_path: Path) -> None:
        seq = SequenceStore.open(labelled).sequence("synth-0001")
        rows = export_sequence_for_training(seq, "motion-only", tmp_path, "cityscapes", min_confidence=0.9,
                                            split="val")
        names = seq.frame_names
        label = _png(tmp_path / "gtFine" / "val" / "synth-0001" / f"synth-0001_{names[0]}_gtFine_labelIds.png")
        conf = np.asarray(seq.array("results/motion-only/confidence")[0]) / 255.0
        stored = np.asarray(seq.array("results/motion-only/labels")[0])
        assert (label[conf < 0.9] == 255).all() and (label[conf >= 0.9] == stored[conf >= 0.9]).all()
        assert (conf < 0.9).any()  # the threshold did something
        assert rows[0].kept_fraction == pytest.approx(((conf >= 0.9) & (stored != 255)).mean(), abs=1e-4)
        keyframe = _png(tmp_path / "gtFine" / "val" / "synth-0001" / f"synth-0001_{names[2]}_gtFine_labelIds.png")
        np.testing.assert_array_equal(keyframe, seq.annotation(2))  # keyframes whole
        colour = _png(tmp_path / "gtFine" / "val" / "synth-0001" / f"synth-0001_{names[2]}_gtFine_color.png")
        assert colour.shape == (32, 48, 3)
        assert (tmp_path / "leftImg8bit" / "val" / "synth-0001" / f"synth-0001_{names[2]}_leftImg8bit.png").is_file()

    def test_bad_settings(self, labelled: str, tmp_path: Path) -> None:
        seq = SequenceStore.open(labelled).sequence("synth-0000")
        with pytest.raises(ConfigError, match="min-confidence"):
            export_sequence_for_training(seq, "motion-only", tmp_path, "folder", min_confidence=2.0)
        with pytest.raises(ConfigError, match="layout"):
            export_sequence_for_training(seq, "motion-only", tmp_path, "coco")

    def test_cli_exports_the_rest_when_one_sequence_is_not_labelled(self, labelled: str, tmp_path: Path) -> None:
        write_synthetic_store(labelled, drive_configs(3, DRIVE)[2:], AnnotationPolicy(mode="window", n=5))
        result = run_cli("export", labelled, "--method", "motion-only", "--out", str(tmp_path / "cs"),
                         "--format", "cityscapes", "--min-confidence", "0.5")
        assert result.returncode == 1
        assert "exported 24 frames (4 keyframes) of 2 sequences" in result.stdout
        assert "synth-0002" in result.stdout + result.stderr and "has no results of 'motion-only' (methods labelled: none yet)" in result.stdout + result.stderr
        manifest = json.loads((tmp_path / "cs" / "manifest.json").read_text())
        assert manifest["failed"] == ["synth-0002"] and manifest["min_confidence"] == 0.5
