"""Flow and propagation on real data (skipped when ../shared/data is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autolabel.models.optical_flow import FlowConfig, create_backend, endpoint_error, read_flo
from autolabel.models.propagation import PropagationConfig
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.ingest import IngestOptions, ingest
from autolabel.storage.readers import read_dataset
from autolabel.storage.store import SequenceStore
from autolabel.tasks.evaluate import evaluate_store
from autolabel.tasks.pipeline import LabelSettings, label_store

pytestmark = pytest.mark.realdata


def test_dis_medium_on_middlebury(shared_data: Path) -> None:
    root = shared_data / "middlebury_flow"
    backend = create_backend(FlowConfig(backend="dis-medium"))
    errors = []
    for scene in sorted(p for p in root.iterdir() if p.is_dir()):
        a, b = (np.asarray(Image.open(scene / f"frame1{i}.png").convert("RGB")) for i in (0, 1))
        errors.append(endpoint_error(backend.pair(a, b)[0], read_flo(scene / "flow10.flo")))
    assert len(errors) == 8 and np.mean(errors) < 1.0  # measured 0.61 (benchmarks/flow.py)


def test_motion_only_on_camvid_dense(shared_data: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "dense.zarr")
    ingest(read_dataset("camvid", shared_data / "camvid"), store,
           IngestOptions(annotation=AnnotationPolicy(mode="window", n=21), sequences=["dense_*"]))
    report = label_store(store, LabelSettings(propagation=PropagationConfig(method="motion-only"),
                                              flow=FlowConfig(backend="dis-fast")))
    assert not report.failed
    result = evaluate_store(SequenceStore.open(store), ["motion-only"]).methods["motion-only"]
    assert result.frames_scored == 40  # two windows of 21, centres annotated
    by_d = result.miou_by_distance
    assert by_d["1"] > 75 and by_d["1"] > by_d["10"]
