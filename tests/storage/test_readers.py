"""Each dataset reader on tiny fixtures written in its layout, ingested and compared."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from autolabel.errors import ConfigError, LabelValueError, RegistryError, UnknownLayoutError
from autolabel.storage.classes import APOLLO22, CAMVID11, CITYSCAPES19, DAVIS_BINARY
from autolabel.storage.ingest import ingest
from autolabel.storage.readers import READERS, ReaderOptions, read_dataset
from autolabel.storage.readers.base import consecutive_runs
from autolabel.storage.store import SequenceStore
from tests.conftest import random_label, random_rgb, save_label, save_rgb

RNG = np.random.default_rng(7)


def test_registry_lists_every_layout() -> None:
    assert READERS.names() == ["apollo", "camvid", "cityscapes", "davis", "folder"]
    with pytest.raises(RegistryError, match="unknown dataset layout 'kitty'; known: apollo"):
        read_dataset("kitty", ".")


def test_consecutive_runs() -> None:
    assert consecutive_runs([(5, "c"), (1, "a"), (3, "b"), (40, "d")], 2) == [[(1, "a"), (3, "b"), (5, "c")], [(40, "d")]]


class TestCamVid:
    def _layout(self, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        files = {}
        for split, names in {"train": ["0001TP_006690", "0001TP_006720", "Seq05VD_f00000"],
                             "dense": ["0016E5_07959", "0016E5_07961", "0016E5_07963"]}.items():
            for name in names:
                rgb, label = random_rgb(RNG), random_label(RNG, list(range(12)))
                save_rgb(root / split / f"{name}.png", rgb)
                save_label(root / f"{split}annot" / f"{name}.png", label)
                files[name] = (rgb, label)
        return files

    def test_keyframes_become_single_frame_sequences_and_runs_one_sequence(self, tmp_path: Path, store_url: str) -> None:
        files = self._layout(tmp_path / "camvid")
        ds = read_dataset("camvid", tmp_path / "camvid")
        assert ds.classes == CAMVID11
        assert sorted((s.id, len(s)) for s in ds.sequences) == [
            ("dense_0016E5_07959", 3), ("train_0001TP_006690", 1), ("train_0001TP_006720", 1),
            ("train_Seq05VD_f00000", 1)]
        report = ingest(ds, store_url)
        assert report.ok and len(report.by_status("ingested")) == 4
        seq = SequenceStore.open(store_url).sequence("dense_0016E5_07959")
        assert seq.fps == 15.0 and seq.annotated.all()
        rgb, label = files["0016E5_07961"]
        np.testing.assert_array_equal(seq.frame(1), rgb)
        expected = np.where(label == 11, 255, label)  # Void -> ignore
        np.testing.assert_array_equal(seq.ground_truth(1), expected)

    def test_not_a_camvid_folder(self, tmp_path: Path) -> None:
        (tmp_path / "train").mkdir()
        with pytest.raises(UnknownLayoutError, match="no CamVid split found"):
            read_dataset("camvid", tmp_path)


class TestDavis:
    def test_masks_map_255_to_object(self, tmp_path: Path, store_url: str) -> None:
        root = tmp_path / "davis"
        frames = {}
        for seq in ("bear", "car-shadow"):
            for i in range(3):
                rgb, mask = random_rgb(RNG), random_label(RNG, [0, 255])
                save_rgb(root / "JPEGImages" / seq / f"{i:05d}.jpg", rgb)
                save_label(root / "Annotations" / seq / f"{i:05d}.png", mask)
                frames[(seq, i)] = mask
        ds = read_dataset("davis", root)
        assert ds.classes == DAVIS_BINARY and [s.id for s in ds.sequences] == ["bear", "car-shadow"]
        assert ingest(ds, store_url).ok
        seq = SequenceStore.open(store_url).sequence("car-shadow")
        assert seq.fps == 24.0
        np.testing.assert_array_equal(seq.ground_truth(2), (frames[("car-shadow", 2)] == 255).astype(np.uint8))

    def test_mask_value_outside_the_class_set(self, tmp_path: Path) -> None:
        root = tmp_path / "davis"
        save_rgb(root / "JPEGImages" / "s" / "00000.jpg", random_rgb(RNG))
        bad = save_label(root / "Annotations" / "s" / "00000.png", np.full((12, 16), 128))
        ds = read_dataset("davis", root)
        with pytest.raises(LabelValueError, match=rf"{bad}.*\[128\] are outside the class set"):
            list(ds.sequences[0].iter_items())

    def test_missing_jpegimages(self, tmp_path: Path) -> None:
        with pytest.raises(UnknownLayoutError, match="JPEGImages"):
            read_dataset("davis", tmp_path)


class TestCityscapes:
    def test_snippets_with_train_ids_and_label_ids(self, tmp_path: Path, store_url: str) -> None:
        root = tmp_path / "cs"
        city = root / "leftImg8bit_sequence" / "val" / "lindau"
        gt = root / "gtFine" / "val" / "lindau"
        for seq, first in (("000000", 0), ("000001", 100)):
            for f in range(first, first + 4):
                save_rgb(city / f"lindau_{seq}_{f:06d}_leftImg8bit.png", random_rgb(RNG))
        train_ids = random_label(RNG, [0, 5, 18, 255])
        save_label(gt / "lindau_000000_000002_gtFine_labelTrainIds.png", train_ids)
        label_ids = random_label(RNG, [7, 26, 0, 33])
        save_label(gt / "lindau_000001_000102_gtFine_labelIds.png", label_ids)
        ds = read_dataset("cityscapes", root)
        assert ds.classes == CITYSCAPES19
        assert [s.id for s in ds.sequences] == ["val_lindau_000000_000000", "val_lindau_000001_000100"]
        assert ingest(ds, store_url).ok
        store = SequenceStore.open(store_url)
        first = store.sequence("val_lindau_000000_000000")
        assert first.has_gt.tolist() == [False, False, True, False]
        np.testing.assert_array_equal(first.ground_truth(2), train_ids)
        second = store.sequence("val_lindau_000001_000100")
        expected = np.select([label_ids == 7, label_ids == 26, label_ids == 33], [0, 13, 18], 255)
        np.testing.assert_array_equal(second.ground_truth(2), expected)


class TestApollo:
    def test_one_sequence_per_road_record_camera(self, tmp_path: Path, store_url: str) -> None:
        root = tmp_path / "apollo"
        label = random_label(RNG, [17, 33, 161, 49, 0, 255, 113])
        for cam in ("Camera 5", "Camera 6"):
            for i in range(3):
                stem = f"170908_061502{i}00_{cam.replace(' ', '_')}"  # 100 ms apart
                save_rgb(root / "road02" / "ColorImage" / "Record001" / cam / f"{stem}.jpg", random_rgb(RNG))
                if i == 1:
                    save_label(root / "road02" / "Label" / "Record001" / cam / f"{stem}_bin.png", label)
        ds = read_dataset("apollo", root)
        assert ds.classes == APOLLO22 and APOLLO22.num_classes == 22
        assert [s.id for s in ds.sequences] == ["road02_Record001_Camera5", "road02_Record001_Camera6"]
        assert ds.sequences[0].fps == 10.0
        assert ingest(ds, store_url).ok
        seq = SequenceStore.open(store_url).sequence("road02_Record001_Camera5")
        assert seq.has_gt.tolist() == [False, True, False]
        expected = np.select([label == 17, label == 33, label == 161, label == 49, label == 113], [0, 1, 1, 9, 21], 255)
        np.testing.assert_array_equal(seq.ground_truth(1), expected)

    def test_unknown_apollo_id(self, tmp_path: Path) -> None:
        cam = tmp_path / "road01" / "ColorImage" / "Record001" / "Camera 5"
        save_rgb(cam / "a.jpg", random_rgb(RNG))
        save_label(tmp_path / "road01" / "Label" / "Record001" / "Camera 5" / "a_bin.png", np.full((12, 16), 200))
        with pytest.raises(LabelValueError, match="a_bin.png: label values \\[200\\]"):
            list(read_dataset("apollo", tmp_path).sequences[0].iter_items())

    def test_no_road(self, tmp_path: Path) -> None:
        with pytest.raises(UnknownLayoutError, match="no ApolloScape road"):
            read_dataset("apollo", tmp_path)


class TestFolder:
    def _classes(self, tmp_path: Path) -> Path:
        path = tmp_path / "classes.json"
        path.write_text(json.dumps({"names": ["road", "car"], "palette": [[128, 64, 128], [0, 0, 142]]}))
        return path

    def test_frames_with_labels_by_name_index_and_colour(self, tmp_path: Path, store_url: str) -> None:
        frames = tmp_path / "drive7"
        labels = tmp_path / "labels"
        for i in range(4):
            save_rgb(frames / f"img_{i:03d}.png", random_rgb(RNG))
        by_name = random_label(RNG, [0, 1, 255])
        save_label(labels / "img_000.png", by_name)
        by_index = random_label(RNG, [0, 1])
        save_label(labels / "2.png", by_index)
        colour = np.where(by_index[..., None] == 1, [0, 0, 142], [128, 64, 128]).astype(np.uint8)
        save_rgb(labels / "img_003.png", colour)
        ds = read_dataset("folder", frames, ReaderOptions(labels=labels, classes_file=self._classes(tmp_path)))
        assert [s.id for s in ds.sequences] == ["drive7"]
        assert ingest(ds, store_url).ok
        seq = SequenceStore.open(store_url).sequence("drive7")
        assert seq.has_gt.tolist() == [True, False, True, True]
        np.testing.assert_array_equal(seq.ground_truth(0), by_name)
        np.testing.assert_array_equal(seq.ground_truth(2), by_index)
        np.testing.assert_array_equal(seq.ground_truth(3), by_index)

    def test_video_file_with_sparse_labels(self, tmp_path: Path, store_url: str) -> None:
        video = tmp_path / "clip.avi"
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
        for i in range(5):
            writer.write(np.full((24, 32, 3), 40 * i, np.uint8))
        writer.release()
        label = random_label(RNG, [0, 1], h=24, w=32)
        save_label(tmp_path / "labels" / "000003.png", label)
        ds = read_dataset("folder", video, ReaderOptions(labels=tmp_path / "labels", classes_file=self._classes(tmp_path)))
        assert ingest(ds, store_url).ok
        seq = SequenceStore.open(store_url).sequence("clip")
        assert seq.num_frames == 5 and seq.fps == 10.0
        assert seq.has_gt.tolist() == [False, False, False, True, False]
        assert abs(int(seq.frame(2).mean()) - 80) <= 3  # MJPG is lossy
        np.testing.assert_array_equal(seq.ground_truth(3), label)

    def test_needs_a_class_list(self, tmp_path: Path) -> None:
        save_rgb(tmp_path / "f" / "a.png", random_rgb(RNG))
        with pytest.raises(ConfigError, match="needs a class list"):
            read_dataset("folder", tmp_path / "f")

    def test_bad_class_file(self, tmp_path: Path) -> None:
        bad = tmp_path / "c.json"
        bad.write_text('{"names": ["a"], "palette": []}')
        with pytest.raises(ConfigError, match="c.json: not a valid class file"):
            read_dataset("folder", tmp_path, ReaderOptions(classes_file=bad))

    def test_colour_outside_the_palette(self, tmp_path: Path) -> None:
        save_rgb(tmp_path / "f" / "a.png", random_rgb(RNG))
        save_rgb(tmp_path / "l" / "a.png", np.full((12, 16, 3), 7, np.uint8))
        ds = read_dataset("folder", tmp_path / "f", ReaderOptions(labels=tmp_path / "l", classes_file=self._classes(tmp_path)))
        with pytest.raises(LabelValueError, match=r"colours \[\(7, 7, 7\)\] are not in the palette"):
            list(ds.sequences[0].iter_items())
