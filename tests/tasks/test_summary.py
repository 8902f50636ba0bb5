"""Dashboard rows: mIoU from dask-reduced confusions where ground truth exists, coverage where not."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.optical_flow import FlowConfig
from models.propagation import PropagationConfig
from storage.annotation import AnnotationPolicy
from storage.ingest import IngestOptions, ingest
from storage.readers import read_dataset
from storage.store import SequenceStore
from storage.synthetic import SyntheticConfig, drive_configs
from storage.synthetic_io import write_apollo_layout, write_synthetic_store
from tasks.evaluate import evaluate_store
from tasks.label import LabelRequest, label_store
from tasks.summary import sequence_summary, store_report

DRIVE = SyntheticConfig(width=64, height=48, frames=23, seed=0)
MOTION = LabelRequest(propagation=PropagationConfig(method="motion-only"), flow=FlowConfig(backend="exact"))


def test_rows_and_pooled_tables_match_the_evaluation(store_url: str) -> None:
    write_synthetic_store(store_url, drive_configs(2, DRIVE), AnnotationPolicy(mode="window", n=21))
    label_store(store_url, MOTION)
    store = SequenceStore.open(store_url)
    ids = store.sequence_ids()
    expected = evaluate_store(store, ["motion-only"])["methods"]["motion-only"]
    report = store_report(store, ["motion-only"], ids)
    assert report["miou_mean"]["motion-only"] == pytest.approx(expected["miou_mean"], abs=0.01)
    for d, value in expected["miou_by_distance"].items():
        assert report["miou_by_distance"]["motion-only"][d] == pytest.approx(value, abs=0.01)
    for row in report["rows"]["motion-only"]:
        assert row["has_gt"] and row["miou"] == pytest.approx(expected["per_sequence_miou"][row["sequence"]], abs=0.01)
        assert row["frames_labelled"] == 21 and row["coverage"] == 100.0


def test_a_drive_without_ground_truth_shows_coverage_and_confidence(tmp_path: Path) -> None:
    write_apollo_layout(tmp_path / "inbox", drive_configs(1, DRIVE))
    for i, label in enumerate(sorted((tmp_path / "inbox").rglob("*_bin.png"))):
        if i != 10:
            label.unlink()  # keep one labelled frame, the annotation: no ground truth to score
    url = str(tmp_path / "s.zarr")
    ingest(read_dataset("apollo", tmp_path / "inbox"), url, IngestOptions(annotation=AnnotationPolicy()))
    seq = SequenceStore.open(url).sequence(SequenceStore.open(url).sequence_ids()[0])
    assert seq.annotated.sum() == 1 and seq.has_gt.sum() == 1
    label_store(url, LabelRequest(propagation=PropagationConfig(method="motion-only"),
                                  flow=FlowConfig(backend="dis-fast", workers=1)))
    row = sequence_summary(SequenceStore.open(url).sequence(seq.id), "motion-only")
    assert not row["has_gt"] and row["miou"] is None
    assert row["frames_labelled"] == 21 and row["coverage"] == 100.0 and 50 < row["mean_confidence"] <= 100
