"""Synthetic drives: deterministic, exact labels and flow, written to a store or ApolloScape folders."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autolabel.errors import ConfigError
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.classes import APOLLO_ID_TO_TRAIN
from autolabel.storage.ingest import ingest
from autolabel.storage.readers import read_dataset
from autolabel.storage.store import SequenceStore, StoreLayout
from autolabel.storage.synthetic import (
    RENDER_POOL_PIXELS,
    FrameRenderer,
    SyntheticConfig,
    SyntheticDrive,
    drive_configs,
    render_workers,
)
from autolabel.storage.stages import flow_array_names
from autolabel.storage.synthetic_io import APOLLO_ID_OF, write_apollo_layout, write_synthetic_store


def _sample_nearest(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (H, W[, C]) sampled at p + flow(p), nearest; returns (values, inside mask)."""
    h, w = flow.shape[1:]
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    x, y = np.rint(jj + flow[0]).astype(int), np.rint(ii + flow[1]).astype(int)
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    return image[np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)], inside


def _uniform_3x3(label: np.ndarray) -> np.ndarray:
    """bool (H, W): the 3x3 neighbourhood of each pixel holds one class."""
    padded = np.pad(label, 1, mode="edge")
    h, w = label.shape
    same = np.ones_like(label, dtype=bool)
    for di in range(3):
        for dj in range(3):
            same &= padded[di:di + h, dj:dj + w] == label
    return same


class TestRendering:
    def test_same_seed_same_drive_other_seed_other_drive(self, tiny_config: SyntheticConfig) -> None:
        a, b = SyntheticDrive(tiny_config).render(3), SyntheticDrive(tiny_config).render(3)
        np.testing.assert_array_equal(a.rgb, b.rgb)
        np.testing.assert_array_equal(a.flow_next, b.flow_next)
        c = SyntheticDrive(tiny_config.model_copy(update={"seed": 2})).render(3)
        assert not np.array_equal(a.rgb, c.rgb)

    def test_shapes_and_every_class_present_over_a_drive(self) -> None:
        cfg = SyntheticConfig(width=160, height=120, frames=24, seed=3, pedestrians=8, bicyclists=4, cars=10)
        drive = SyntheticDrive(cfg)
        seen = set()
        for t in range(0, 24, 4):
            frame = drive.render(t)
            assert frame.rgb.shape == (120, 160, 3) and frame.rgb.dtype == np.uint8
            assert frame.label.shape == (120, 160) and frame.flow_next.shape == (2, 120, 160)
            seen |= set(np.unique(frame.label).tolist())
        assert seen == set(range(11)), sorted(seen)

    def test_class_subset_renders_only_those_classes(self) -> None:
        cfg = SyntheticConfig(width=96, height=72, frames=3, classes=["Sky", "Road", "Car"])
        assert cfg.class_set().names == ["Sky", "Road", "Car"]
        label = SyntheticDrive(cfg).render(1).label
        assert set(np.unique(label).tolist()) <= {0, 1, 2}

    @pytest.mark.parametrize(("classes", "message"), [
        (["Sky", "Road", "Dragon"], "unknown synthetic classes"),
        (["Sky", "Car"], "always need class 'Road'"),
    ])
    def test_bad_class_choice(self, classes: list[str], message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            SyntheticConfig(classes=classes)

    def test_flow_carries_labels_and_pixels_exactly(self) -> None:
        cfg = SyntheticConfig(width=200, height=150, frames=4, seed=5)
        drive = SyntheticDrive(cfg)
        prev, cur = drive.render(1), drive.render(2)
        labels, inside = _sample_nearest(prev.label, cur.flow_prev)
        assert inside.mean() > 0.97
        # forward and backward flow are inverse where the point stays visible
        fw_at, _ = _sample_nearest(np.moveaxis(prev.flow_next, 0, -1), cur.flow_prev)
        round_trip = np.hypot(*(np.moveaxis(fw_at, -1, 0) + cur.flow_prev))
        assert np.median(round_trip) < 0.05
        visible = inside & (round_trip < 0.5)
        assert visible.mean() > 0.97
        # backward flow of frame 2 points into frame 1: away from label edges (where rounding to
        # the nearest pixel may cross a boundary) the label found there is exactly frame 2's
        uniform = _uniform_3x3(prev.label)
        uniform_at, _ = _sample_nearest(uniform, cur.flow_prev)
        checked = visible & uniform_at
        assert checked.mean() > 0.8
        assert (labels == cur.label)[checked].mean() > 0.999
        assert (labels == cur.label)[visible].mean() > 0.97
        # brightness constancy: textures are attached to surfaces
        colours, _ = _sample_nearest(prev.rgb.astype(int), cur.flow_prev)
        consistent = inside & (labels == cur.label) & (round_trip < 0.5)
        assert np.median(np.abs(colours - cur.rgb.astype(int)).sum(-1)[consistent]) < 20

    def test_cars_move_on_their_own(self) -> None:
        cfg = SyntheticConfig(width=160, height=120, frames=30, seed=0, cars=10, classes=["Sky", "Road", "Car"])
        drive = SyntheticDrive(cfg)
        frame = drive.render(15)
        cars = frame.label == 2
        assert cars.any()
        # a static world point at a car pixel's depth would move differently: compare with the road
        ego_only = SyntheticDrive(cfg.model_copy(update={"cars": 0})).render(15)
        assert not np.allclose(frame.flow_next[:, cars], ego_only.flow_next[:, cars], atol=0.05)


class TestSyntheticStore:
    def test_store_holds_frames_labels_and_exact_flow(self, store_url: str, tiny_config: SyntheticConfig) -> None:
        report = write_synthetic_store(store_url, drive_configs(2, tiny_config),
                                       AnnotationPolicy(mode="keyframe-every", n=3))
        assert [o.id for o in report.by_status("ingested")] == ["synth-0001", "synth-0002"]
        seq = SequenceStore.open(store_url).sequence("synth-0001")
        assert seq.annotated.tolist() == [True, False, False, True, False, False]
        assert seq.has_gt.all() and seq.stage_done("flow/exact")
        fw_name, bw_name = flow_array_names("exact")
        fw, bw = seq.array(fw_name), seq.array(bw_name)
        assert fw.shape == bw.shape == (5, 2, 48, 64) and fw.dtype == np.float16
        drive = SyntheticDrive(tiny_config)
        frame = drive.render(2)
        np.testing.assert_array_equal(seq.frame(2), frame.rgb)
        np.testing.assert_array_equal(seq.ground_truth(2), frame.label)
        np.testing.assert_allclose(fw[2], frame.flow_next, atol=0.05)
        np.testing.assert_allclose(bw[1], frame.flow_prev, atol=0.05)

    def test_long_drive_is_sharded_and_flow_shards_line_up(self, local_store_url: str) -> None:
        cfg = SyntheticConfig(width=32, height=24, frames=9, seed=4)
        write_synthetic_store(local_store_url, [cfg], layout=StoreLayout(shard_threshold=4, shard_frames=4))
        seq = SequenceStore.open(local_store_url).sequence("synth-0004")
        assert seq.array("frames").shards[0] == 4 and seq.array("flow/exact/fw").shape[0] == 8
        np.testing.assert_allclose(seq.array("flow/exact/bw")[7], SyntheticDrive(cfg).render(8).flow_prev, atol=0.05)

    def test_rerun_skips_finished_drives(self, store_url: str, tiny_config: SyntheticConfig) -> None:
        write_synthetic_store(store_url, [tiny_config])
        report = write_synthetic_store(store_url, drive_configs(2, tiny_config))
        assert [(o.id, o.status) for o in report.outcomes] == [("synth-0001", "skipped"), ("synth-0002", "ingested")]


class TestRenderingInProcesses:
    def test_the_frames_of_one_process_in_order(self, tiny_config: SyntheticConfig) -> None:
        drives = drive_configs(2, tiny_config.model_copy(update={"frames": 7}))
        with FrameRenderer(2) as renderer:
            assert renderer.workers == 2
            for cfg in drives:  # one renderer, several drives: each worker rebuilds the scene it renders
                frames = list(renderer.frames(cfg))
                expected = [SyntheticDrive(cfg).render(t) for t in range(cfg.frames)]
                assert len(frames) == len(expected) == 7
                for got, want in zip(frames, expected):
                    for name in ("rgb", "label", "flow_next", "flow_prev"):
                        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)

    def test_a_store_written_by_workers_equals_one_written_here(self, tmp_path: Path,
                                                                  tiny_config: SyntheticConfig) -> None:
        drives = drive_configs(2, tiny_config)
        stores = {}
        for workers in (1, 2):
            url = str(tmp_path / f"w{workers}.zarr")
            write_synthetic_store(url, drives, AnnotationPolicy(mode="keyframe-every", n=3), workers=workers)
            stores[workers] = SequenceStore.open(url)
        for seq_id in stores[1].sequence_ids():
            one, two = stores[1].sequence(seq_id), stores[2].sequence(seq_id)
            for name in ("frames", "gt", *flow_array_names("exact")):
                np.testing.assert_array_equal(one.array(name)[:], two.array(name)[:], err_msg=f"{seq_id} {name}")

    def test_an_apollo_folder_written_by_workers_equals_one_written_here(self, tmp_path: Path) -> None:
        drives = [SyntheticConfig(width=48, height=32, frames=3, seed=5)]
        folders = [write_apollo_layout(tmp_path / f"w{w}", drives, workers=w)[0] for w in (1, 2)]
        names = sorted(p.name for p in folders[0].iterdir())
        assert len(names) == 3 and names == sorted(p.name for p in folders[1].iterdir())
        for name in names:
            assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes()

    def test_small_drives_render_here_large_ones_on_every_core(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AUTOLABEL_THREADS", "3")
        small = SyntheticConfig(width=64, height=48, frames=10, seed=0)
        assert render_workers([small]) == 1
        frames = RENDER_POOL_PIXELS // (640 * 480) + 1
        assert render_workers([SyntheticConfig(width=640, height=480, frames=frames, seed=0)]) == 3
        assert render_workers(drive_configs(frames, small.model_copy(update={"width": 640, "height": 480,
                                                                            "frames": 1}))) == 3
        monkeypatch.setenv("AUTOLABEL_THREADS", "1")
        assert render_workers([SyntheticConfig(width=640, height=480, frames=frames, seed=0)]) == 1


class TestApolloExport:
    def test_apollo_folder_reads_back_through_the_apollo_reader(self, tmp_path: Path, store_url: str) -> None:
        configs = drive_configs(2, SyntheticConfig(width=64, height=48, frames=4, seed=0))
        write_apollo_layout(tmp_path / "inbox", configs)
        ds = read_dataset("apollo", tmp_path / "inbox")
        assert [s.id for s in ds.sequences] == ["road01_Record001_Camera5", "road02_Record001_Camera5"]
        assert ds.sequences[0].fps == pytest.approx(15.0, rel=0.01)  # stamps hold whole milliseconds
        assert ingest(ds, store_url).ok
        seq = SequenceStore.open(store_url).sequence("road02_Record001_Camera5")
        rendered = SyntheticDrive(configs[1]).render(3)
        to_train = np.array([APOLLO_ID_TO_TRAIN[APOLLO_ID_OF[c]] for c in configs[1].classes], dtype=np.uint8)
        np.testing.assert_array_equal(seq.ground_truth(3), to_train[rendered.label])
        buffer = io.BytesIO()
        Image.fromarray(rendered.rgb).save(buffer, format="JPEG", quality=95)
        np.testing.assert_array_equal(seq.frame(3), np.asarray(Image.open(buffer)))  # the JPEG's exact pixels


def test_drives_with_a_class_subset_are_written_with_the_store_class_ids(tmp_path) -> None:  # noqa: ANN001
    """A drive of 7 classes in an 11-class store: its labels use the store's ids, by class name."""
    import pytest

    from autolabel.errors import ClassSetMismatchError
    from autolabel.storage.annotation import AnnotationPolicy
    from autolabel.storage.store import SequenceStore
    from autolabel.storage.synthetic import SYNTHETIC_CLASSES, SyntheticConfig, SyntheticDrive
    from autolabel.storage.synthetic_io import write_synthetic_store

    full = SyntheticConfig(width=48, height=32, frames=3, seed=0)
    subset = full.model_copy(update={"seed": 1, "classes": [c for c in SYNTHETIC_CLASSES if c not in ("Pole", "Fence")]})
    url = str(tmp_path / "s.zarr")
    write_synthetic_store(url, [full, subset], AnnotationPolicy(mode="keyframe-every", n=2))
    store = SequenceStore.open(url)
    rendered = SyntheticDrive(subset).render(1).label
    names = [subset.classes[i] for i in rendered.ravel()]
    stored = store.sequence("synth-0001").ground_truth(1).ravel()
    assert [store.classes.names[i] for i in stored] == names
    with pytest.raises(ClassSetMismatchError, match="Pole"):
        write_synthetic_store(str(tmp_path / "t.zarr"), [subset, full])
