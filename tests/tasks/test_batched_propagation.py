"""Batched propagation: any batch size, with or without prefetching, gives exactly the labels of one
chain at a time (CPU, fp32)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

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
)
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store
from autolabel.tasks.pipeline import LabelSettings, label_store
from tests.conftest import DriveInputs, tiny_checkpoints

METHODS = ["motion-only", "semantic-only", "warp-inpaint", "warp-refine"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two drives with keyframes every 5 frames (10 chains each), a teacher and an untrained refiner."""
    root = tmp_path_factory.mktemp("batched")
    store = str(root / "store.zarr")
    write_synthetic_store(store, drive_configs(2, SyntheticConfig(width=64, height=48, frames=25, seed=0)),
                          AnnotationPolicy(mode="window", n=5))
    return tiny_checkpoints(store, root)


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
