"""Acceptance on the real datasets in ../shared/data (skipped when they are absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autolabel.storage.store import SequenceStore
from tests.conftest import run_cli

pytestmark = pytest.mark.realdata


def test_davis_window_21_is_exact(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "davis2016"
    store = tmp_path / "davis.zarr"
    done = run_cli("ingest", "davis", str(source), "--store", str(store), "--window", "21")
    assert done.returncode == 0, done.stderr
    info = json.loads(run_cli("info", str(store), "--json").stdout)
    assert info["totals"]["sequences"] == 10
    st = SequenceStore.open(str(store))
    for row in info["sequences"]:
        frames = sorted((source / "JPEGImages" / row["id"]).glob("*.jpg"))
        assert row["frames"] == len(frames) and row["ground_truth"] == len(frames)
        assert row["annotated_frames"] == [10 + 21 * k for k in range(len(frames) // 21)]
        seq = st.sequence(row["id"])
        for t, path in enumerate(frames):  # every frame's pixels and labels equal the source files
            np.testing.assert_array_equal(seq.frame(t), np.asarray(Image.open(path).convert("RGB")))
            mask = np.asarray(Image.open(source / "Annotations" / row["id"] / f"{path.stem}.png"))
            np.testing.assert_array_equal(seq.ground_truth(t), (mask == 255).astype(np.uint8))


def test_camvid_train_keyframes_and_dense_sequence(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "camvid"
    store = tmp_path / "camvid.zarr"
    done = run_cli("ingest", "camvid", str(source), "--store", str(store))
    assert done.returncode == 0, done.stderr
    st = SequenceStore.open(str(store))
    ids = st.sequence_ids()
    singles = [i for i in ids if i.startswith("train_")]
    assert len(singles) == 336 and len(ids) == 337
    assert all(st.sequence(i).num_frames == 1 and st.sequence(i).annotated.all() for i in singles[:20])
    dense = st.sequence("dense_0016E5_07959")
    assert dense.num_frames == 42 and dense.fps == 15.0
    assert dense.frame_names[0] == "0016E5_07959" and dense.frame_names[-1] == "0016E5_08041"
    for t in (0, 20, 41):
        name = dense.frame_names[t]
        np.testing.assert_array_equal(dense.frame(t), np.asarray(Image.open(source / "dense" / f"{name}.png")))
        raw = np.asarray(Image.open(source / "denseannot" / f"{name}.png"))
        np.testing.assert_array_equal(dense.ground_truth(t), np.where(raw == 11, 255, raw))


def test_camvid_dense_with_window_21_annotates_the_two_window_centres(shared_data: Path, tmp_path: Path) -> None:
    store = tmp_path / "dense.zarr"
    done = run_cli("ingest", "camvid", str(shared_data / "camvid"), "--store", str(store), "--window", "21",
                   "--sequence", "dense_0016E5_07959")
    assert done.returncode == 0, done.stderr
    seq = SequenceStore.open(str(store)).sequence("dense_0016E5_07959")
    assert [seq.frame_names[t] for t in np.flatnonzero(seq.annotated)] == ["0016E5_07979", "0016E5_08021"]
