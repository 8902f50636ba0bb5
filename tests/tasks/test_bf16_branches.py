"""The CUDA-only bf16 branches, run on the CPU: no CI machine has a GPU, so the branches that only a
GPU takes (bf16 autocast in teacher and refiner training and inference, then fp32 again for the
softmax, the stored labels and confidence) would otherwise never run before a user's first GPU job.

``torch.autocast`` is forced to bf16 with the real kernels (CPU bf16 convolutions); what is checked
is that every stage still runs and stores what it stores in fp32: the same frames reached at the
same distances, keyframes exact, labels and confidence of the right dtypes and ranges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import PropagationConfig
from autolabel.models.refiner_training import RefinerTrainConfig
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store
from autolabel.tasks.pipeline import LabelSettings, label_store
from autolabel.tasks.refiner_training import RefinerRequest, train_refiner_from_stores
from tests.conftest import train_tiny_teacher

REAL_AUTOCAST = torch.autocast


class ForcedBf16:
    """Stands in for ``torch.autocast``: every context is bf16 and enabled, whatever the device; counts
    how many were entered."""

    entered = 0

    def __init__(self, device_type: str, dtype: Any = None, enabled: bool = True, cache_enabled: Any = None) -> None:
        self.context = REAL_AUTOCAST(device_type, dtype=torch.bfloat16, enabled=True, cache_enabled=cache_enabled)

    def __enter__(self) -> Any:
        ForcedBf16.entered += 1
        return self.context.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.context.__exit__(*exc)


@pytest.fixture
def bf16(monkeypatch: pytest.MonkeyPatch) -> type[ForcedBf16]:
    monkeypatch.setattr(torch, "autocast", ForcedBf16)
    ForcedBf16.entered = 0
    return ForcedBf16


def _settings(method: str, root: Path, batch: int) -> LabelSettings:
    return LabelSettings(propagation=PropagationConfig(method=method, batch_size=batch),
                         flow=FlowConfig(backend="dis-fast"), teacher=str(root / "teacher.pt"),
                         refiner=str(root / "refiner.pt"), compare_with_warp_inpaint=True,
                         estimate={"enabled": True})


def test_training_and_labelling_run_under_bf16_and_store_fp32_results(bf16: type[ForcedBf16], tmp_path: Path) -> None:
    store = str(tmp_path / "store.zarr")
    write_synthetic_store(store, drive_configs(2, SyntheticConfig(width=64, height=48, frames=23, seed=0)),
                          AnnotationPolicy(mode="window", n=7))
    train_tiny_teacher(store, tmp_path / "teacher.pt", steps=3)
    assert bf16.entered >= 3, "teacher training did not run under autocast"
    before = bf16.entered
    train_refiner_from_stores(RefinerRequest(
        stores=[store], teacher=tmp_path / "teacher.pt", out=tmp_path / "refiner.pt", flow=FlowConfig(backend="dis-fast"),
        train=RefinerTrainConfig(arch="refine-tiny", steps=3, crop=32, max_cycle=2, batch_size=2)))
    assert bf16.entered > before, "refiner training did not run under autocast"

    # 16 chains per batch, as on CUDA; warp-inpaint for the comparison and both estimates as well
    before = bf16.entered
    report = label_store(store, _settings("warp-refine", tmp_path, 16))
    assert [o.status for o in report.outcomes] == ["labelled"] * 2, report.failed
    assert bf16.entered > before, "labelling did not run under autocast"

    opened = SequenceStore.open(store)
    for seq_id in opened.sequence_ids():
        seq = opened.sequence(seq_id)
        keys = np.flatnonzero(seq.annotated)
        for method in ("warp-inpaint", "warp-refine"):
            labels = np.asarray(seq.array(f"results/{method}/labels")[:])
            confidence = np.asarray(seq.array(f"results/{method}/confidence")[:])
            distance = np.asarray(seq.array(f"results/{method}/distance")[:])
            assert labels.dtype == np.uint8 and confidence.dtype == np.uint8
            assert labels.shape == (seq.num_frames, 48, 64)
            assert (distance[keys] == 0).all() and (distance[~seq.annotated] >= 1).all()  # K = 10 > 3
            for t in keys:
                np.testing.assert_array_equal(labels[t], seq.annotation(int(t)))
            propagated = labels[~seq.annotated]
            assert propagated.max() < opened.classes.num_classes  # no ignore left: every pixel labelled
            assert (confidence[~seq.annotated] > 0).all()
            calibration = seq.stages[f"estimate/{method}"]["calibration"]
            assert calibration, f"no estimate of {method} for {seq_id}"
