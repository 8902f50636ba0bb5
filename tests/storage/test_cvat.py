"""CVAT 'Segmentation mask 1.1' exports: fixtures written here in that layout (no CVAT server)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.cvat import (
    format_labelmap,
    import_keyframes,
    parse_labelmap,
    read_cvat_masks,
    resolve_names,
    write_cvat_export,
)
from autolabel.storage.classes import ClassSet
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store
from PIL import Image

from autolabel.errors import ConfigError, InputDataError, LabelValueError
from tests.conftest import run_cli

DRIVE = SyntheticConfig(width=64, height=48, frames=42, seed=0, fps=30.0, ego_speed=(2.0, 3.0))
SEQ = "synth-0000"


def write_cvat(root: Path, masks: dict[str, np.ndarray], colours: dict[str, tuple[int, int, int]],
               classes: list[str]) -> Path:
    """A CVAT export as CVAT writes it: labelmap with its header, the image set, colour masks."""
    lines = ["# label:color_rgb:parts:actions", "background:0,0,0::"]
    lines += [f"{name}:{','.join(map(str, colours[name]))}::" for name in classes]
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "labelmap.txt").write_text("\n".join(lines) + "\n")
    (root / "ImageSets" / "Segmentation" / "default.txt").write_text("".join(f"{n}\n" for n in masks))
    lut = np.zeros((256, 3), np.uint8)
    for i, name in enumerate(classes):
        lut[i] = colours[name]
    for name, label in masks.items():
        path = root / "SegmentationClass" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lut[label]).save(path)
    return root


@pytest.fixture
def store(tmp_path: Path) -> SequenceStore:
    url = str(tmp_path / "s.zarr")
    write_synthetic_store(url, drive_configs(1, DRIVE), AnnotationPolicy(mode="window", n=21))
    return SequenceStore.open(url, mode="r+")


def _colours(names: list[str]) -> dict[str, tuple[int, int, int]]:
    """CVAT's own colours, unlike the store's palette: labels are matched by name."""
    return {n: (10 + 20 * i, 200 - 15 * i, (37 * i) % 256) for i, n in enumerate(names)}


class TestLabelmap:
    def test_round_trip_of_a_class_set(self, store: SequenceStore) -> None:
        labels = parse_labelmap(format_labelmap(store.classes), "x")
        assert list(labels) == ["background", *store.classes.names]
        assert labels["Road"] == tuple(store.classes.palette[store.classes.names.index("Road")])

    @pytest.mark.parametrize(("text", "match"), [
        ("car\n", "line 1: expected"), ("car:1,2::\n", "not 'r,g,b'"), ("a:1,2,3::\na:4,5,6::\n", "twice"),
        ("# only a comment\n", "no label"),
    ])
    def test_malformed(self, text: str, match: str) -> None:
        with pytest.raises(InputDataError, match=match):
            parse_labelmap(text, "labelmap.txt")


class TestAStoreBackgroundClass:
    """DAVIS's classes are 'background' (0,0,0) and 'object': `review` used to refuse the store
    ("class 'background' is drawn in (0,0,0), which CVAT reserves for 'background')."""

    CLASSES = ClassSet(names=["Background", "object"], palette=[(0, 0, 0), (200, 0, 0)])

    def test_it_is_cvat_s_background_and_survives_a_round_trip(self, tmp_path: Path) -> None:
        assert list(parse_labelmap(format_labelmap(self.CLASSES), "x")) == ["background", "object"]
        labels = np.zeros((6, 8), np.uint8)
        labels[2:4, 2:6] = 1
        labels[0, 0] = 255  # no label: exported as background, as CVAT knows nothing else
        assert write_cvat_export(tmp_path / "task", self.CLASSES, [("seq/000", labels, None)]) == 1
        rgb = np.asarray(Image.open(tmp_path / "task" / "SegmentationClass" / "seq" / "000.png"))
        assert {tuple(c) for c in rgb.reshape(-1, 3)} == {(0, 0, 0), (200, 0, 0)}
        [mask] = read_cvat_masks(tmp_path / "task", self.CLASSES)
        expected = labels.copy()
        expected[0, 0] = 0
        np.testing.assert_array_equal(mask.labels, expected)

    def test_another_class_in_black_still_clashes(self) -> None:
        classes = ClassSet(names=["road", "object"], palette=[(0, 0, 0), (200, 0, 0)])
        with pytest.raises(ConfigError, match="class 'road' is drawn in \\(0,0,0\\)"):
            format_labelmap(classes)


class TestRead:
    def test_masks_map_by_label_name_from_folder_and_zip(self, store: SequenceStore, tmp_path: Path) -> None:
        seq = store.sequence(SEQ)
        names = store.classes.names
        gt = {f"{SEQ}/{seq.frame_names[t]}": seq.ground_truth(t) for t in (5, 20)}
        root = write_cvat(tmp_path / "export", gt, _colours(names), names)
        for source in (root, _zip(root, tmp_path / "export.zip")):
            masks = read_cvat_masks(source, store.classes)
            assert [m.name for m in masks] == list(gt)
            for m in masks:
                np.testing.assert_array_equal(m.labels, gt[m.name])

    def test_undeclared_colour_names_the_file(self, store: SequenceStore, tmp_path: Path) -> None:
        seq = store.sequence(SEQ)
        names = store.classes.names
        name = f"{SEQ}/{seq.frame_names[5]}"
        root = write_cvat(tmp_path / "export", {name: seq.ground_truth(5)}, _colours(names), names)
        mask = root / "SegmentationClass" / f"{name}.png"
        rgb = np.asarray(Image.open(mask)).copy()
        rgb[:3, :3] = (1, 2, 3)
        Image.fromarray(rgb).save(mask)
        with pytest.raises(LabelValueError, match=rf"{seq.frame_names[5]}\.png: colours \[\(1, 2, 3\)\]"):
            read_cvat_masks(root, store.classes)
        assert "keyframes" not in store.sequence(SEQ).stages

    def test_label_the_store_lacks_names_it(self, store: SequenceStore, tmp_path: Path) -> None:
        names = [*store.classes.names, "Traffic cone"]
        root = write_cvat(tmp_path / "export", {f"{SEQ}/x": np.zeros((48, 64), np.uint8)}, _colours(names), names)
        with pytest.raises(LabelValueError, match="labelmap.txt: label 'Traffic cone' is not a class of the store"):
            read_cvat_masks(root, store.classes)

    def test_names_resolve_to_frames(self, store: SequenceStore) -> None:
        frame = store.sequence(SEQ).frame_names[7]
        assert resolve_names(store, [f"{SEQ}/{frame}", frame]) == {f"{SEQ}/{frame}": (SEQ, 7), frame: (SEQ, 7)}
        with pytest.raises(InputDataError, match="has no frame 'nope'"):
            resolve_names(store, [f"{SEQ}/nope"])
        with pytest.raises(InputDataError, match="no sequence 'other'"):
            resolve_names(store, [f"other/{frame}"])

    def test_import_checks_every_mask_before_writing(self, store: SequenceStore, tmp_path: Path) -> None:
        seq = store.sequence(SEQ)
        names = store.classes.names
        masks = {f"{SEQ}/{seq.frame_names[5]}": seq.ground_truth(5), f"{SEQ}/missing-frame": seq.ground_truth(6)}
        root = write_cvat(tmp_path / "export", masks, _colours(names), names)
        with pytest.raises(InputDataError, match="missing-frame"):
            import_keyframes(store, root)
        assert "keyframes" not in store.sequence(SEQ).stages


def _zip(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for p in folder.rglob("*"):
            if p.is_file():
                z.write(p, str(p.relative_to(folder)))
    return archive


def test_cli_round_trip_ingest_label_export_reingest(store: SequenceStore, tmp_path: Path) -> None:
    """CVAT keyframes in -> label -> export for CVAT -> back in as keyframes: the same labels."""
    seq = store.sequence(SEQ)
    names = store.classes.names
    gt = {f"{SEQ}/{seq.frame_names[t]}": seq.ground_truth(t) for t in (3, 20)}
    export = _zip(write_cvat(tmp_path / "cvat", gt, _colours(names), names), tmp_path / "cvat.zip")
    done = run_cli("ingest", "cvat-mask", str(export), "--store", store.url)
    assert done.returncode == 0, done.stderr
    assert f"{SEQ}: 2 keyframes" in done.stdout
    assert np.flatnonzero(SequenceStore.open(store.url).sequence(SEQ).annotated).tolist() == [3, 10, 20, 31]
    done = run_cli("label", store.url, "--method", "motion-only", "--flow", "exact")
    assert done.returncode == 0, done.stderr
    labelled = SequenceStore.open(store.url).sequence(SEQ)
    results = np.asarray(labelled.array("results/motion-only/labels")[:])
    for t in (3, 20):
        np.testing.assert_array_equal(results[t], seq.ground_truth(t))

    done = run_cli("suggest-keyframes", store.url, "--method", "motion-only", "--budget", "2", "--json",
                   str(tmp_path / "suggest.json"))
    assert done.returncode == 0, done.stderr
    suggested = json.loads((tmp_path / "suggest.json").read_text())["frames"]
    assert len(suggested) == 2 and all(f["distance"] != 0 for f in suggested)
    done = run_cli("review", store.url, "--method", "motion-only", "--budget", "3", "--out", str(tmp_path / "queue"))
    assert done.returncode == 0, done.stderr
    queue = tmp_path / "queue" / "queue.json"
    picked = [f["t"] for f in json.loads(queue.read_text())["frames"]]
    assert len(picked) == 3 and (tmp_path / "queue" / "cvat-task.zip").is_file()
    done = run_cli("export", store.url, "--method", "motion-only", "--format", "cvat-mask", "--out",
                   str(tmp_path / "review"), "--frames", str(queue))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "review.zip").is_file() and len(list((tmp_path / "review" / "JPEGImages").rglob("*.png"))) == 3
    done = run_cli("ingest", "cvat-mask", str(tmp_path / "review.zip"), "--store", store.url)
    assert done.returncode == 0, done.stderr
    again = SequenceStore.open(store.url).sequence(SEQ)
    assert again.stages["keyframes"]["frames"] == sorted({3, 20, *picked})
    for t in picked:
        np.testing.assert_array_equal(again.annotation(t), results[t])  # exported labels came back unchanged


def test_cli_keyframes_of_a_new_frame_folder(store: SequenceStore, tmp_path: Path) -> None:
    """--frames: the folder becomes a new sequence whose keyframes are the export's masks (bare names)."""
    seq = store.sequence(SEQ)
    frames = tmp_path / "drive-7"
    frames.mkdir()
    for t in range(12):
        Image.fromarray(seq.frame(t)).save(frames / f"f{t:03d}.png")
    names = store.classes.names
    export = write_cvat(tmp_path / "cvat", {"f002": seq.ground_truth(2), "f009": seq.ground_truth(9)},
                        _colours(names), names)
    done = run_cli("ingest", "cvat-mask", str(export), "--store", store.url, "--frames", str(frames))
    assert done.returncode == 0, done.stderr
    added = SequenceStore.open(store.url).sequence("drive-7")
    assert added.num_frames == 12 and np.flatnonzero(added.annotated).tolist() == [2, 9]
    np.testing.assert_array_equal(added.annotation(9), seq.ground_truth(9))
