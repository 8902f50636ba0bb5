"""Flow estimation in shard-aligned pieces on a dask LocalCluster equals the serial computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from autolabel.models.optical_flow import FlowConfig
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.stages import flow_array_names, flow_stage
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store
from autolabel.tasks.flow_estimation import (
    estimate_flow,
    estimate_flow_piece,
    finish_flow,
    flow_pieces,
)

CONFIG = FlowConfig(backend="dis-ultrafast", workers=1)


@pytest.fixture
def long_store(tmp_path: Path) -> str:
    """One 70-frame drive: long enough to be sharded (16 frames per shard)."""
    url = str(tmp_path / "long.zarr")
    write_synthetic_store(url, drive_configs(1, SyntheticConfig(width=48, height=32, frames=70, seed=3)),
                          AnnotationPolicy(mode="window", n=21))
    return url


def _flows(store: SequenceStore, seq_id: str) -> tuple[np.ndarray, np.ndarray]:
    seq = store.sequence(seq_id)
    fw, bw = flow_array_names(CONFIG.stored_name)
    return np.asarray(seq.array(fw)[:]), np.asarray(seq.array(bw)[:])


def test_pieces_cover_whole_shards_and_match_the_serial_flow(long_store: str) -> None:
    store = SequenceStore.open(long_store, mode="r+")
    seq_id = store.sequence_ids()[0]
    estimate_flow(store, seq_id, CONFIG)
    serial = _flows(store, seq_id)
    before = store.sequence(seq_id).stages[flow_stage(CONFIG.stored_name)]
    with store.writing(seq_id, flow_stage(CONFIG.stored_name)) as out:
        pieces = flow_pieces(out, CONFIG, piece_pairs=20)
        assert pieces == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 69)]  # 16-frame shards, 69 pairs
        # until published, readers still see the earlier version
        assert store.sequence(seq_id).stages[flow_stage(CONFIG.stored_name)] == before
        for a, b in reversed(pieces):  # any order
            estimate_flow_piece(store, seq_id, CONFIG, out.path, a, b)
        finish_flow(out, CONFIG)
    assert store.sequence(seq_id).stages[flow_stage(CONFIG.stored_name)]["at"] == out.path
    for got, want in zip(_flows(store, seq_id), serial):
        np.testing.assert_array_equal(got, want)


def test_a_one_frame_sequence_has_no_piece_and_no_missing_chunk(tmp_path: Path) -> None:
    from autolabel.storage.integrity import missing_chunks

    url = str(tmp_path / "one.zarr")
    write_synthetic_store(url, drive_configs(1, SyntheticConfig(width=48, height=32, frames=1, seed=3)))
    store = SequenceStore.open(url, mode="r+")
    with store.writing("synth-0003", flow_stage(CONFIG.stored_name)) as out:
        assert flow_pieces(out, CONFIG) == []
        finish_flow(out, CONFIG)
    seq = store.sequence("synth-0003")
    assert [a.shape[0] for a in _flows(store, "synth-0003")] == [0, 0] and missing_chunks(seq) == {}


@pytest.mark.slow
def test_dask_flow_equals_serial(long_store: str, tmp_path: Path) -> None:
    import shutil

    from autolabel.flows.parallel_flow import run_parallel_flow
    from prefect.testing.utilities import prefect_test_harness

    serial_store = str(tmp_path / "serial.zarr")
    shutil.copytree(long_store, serial_store)
    store = SequenceStore.open(serial_store, mode="r+")
    seq_id = store.sequence_ids()[0]
    estimate_flow(store, seq_id, CONFIG)
    serial = _flows(store, seq_id)
    with prefect_test_harness():
        result = run_parallel_flow(long_store, seq_id, CONFIG, workers=2, piece_pairs=16)
        assert result["pieces"] == 5 and result["pairs"] == 69
        again = run_parallel_flow(long_store, seq_id, CONFIG, workers=2, piece_pairs=16)
        assert not again["computed"]  # current: nothing is computed twice
    for got, want in zip(_flows(SequenceStore.open(long_store), seq_id), serial):
        np.testing.assert_array_equal(got, want)
