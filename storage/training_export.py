"""Export auto-labels as a training set: Cityscapes-like tree or plain folder, plus a manifest.

Layouts (``<split>`` is ``train`` unless chosen):

* ``cityscapes``: ``leftImg8bit/<split>/<seq>/<seq>_<frame>_leftImg8bit.png``,
  ``gtFine/<split>/<seq>/<seq>_<frame>_gtFine_labelIds.png`` (class index, ignore 255) and
  ``..._gtFine_color.png``; the ids are the store's class ids (``classes.json`` names them).
* ``folder``: ``images/<seq>/<frame>.png`` and ``labels/<seq>/<frame>.png`` (class index).

Both write ``classes.json`` (names, palette, ignore index) and ``manifest.csv`` / ``manifest.json``:
one row per frame with its sequence, frame name, whether it is a keyframe (manual label), its
source keyframe and distance, the method, the mean confidence of its labelled pixels and the
fraction of pixels kept. With ``min_confidence`` C, propagated pixels whose confidence is below C
become ignore; keyframes are always exported whole. Files are written atomically and the manifest
last, so an interrupted export never leaves a manifest that names missing files.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from autolabel.atomic import write_text_atomic
from autolabel.errors import AutolabelError, ConfigError
from autolabel.storage.export import label_frames
from autolabel.storage.images import PHOTO_PNG_LEVEL, read_label_raw, read_rgb, write_png_atomic
from autolabel.storage.stages import GROUND_TRUTH, result_array_names
from autolabel.storage.store import Sequence, SequenceStore

LAYOUTS = ("cityscapes", "folder")


@dataclass
class ManifestRow:
    """One exported frame (paths relative to the export folder)."""

    sequence: str
    frame: str
    t: int
    image: str
    label: str
    keyframe: bool
    source_keyframe: str
    distance: int
    method: str
    mean_confidence: float
    kept_fraction: float


def _paths(layout: str, split: str, seq: str, frame: str) -> tuple[str, str, str | None]:
    """(image, class-index label, colour label or None) paths of one frame."""
    if layout == "cityscapes":
        stem = f"{seq}_{frame}"
        return (f"leftImg8bit/{split}/{seq}/{stem}_leftImg8bit.png", f"gtFine/{split}/{seq}/{stem}_gtFine_labelIds.png",
                f"gtFine/{split}/{seq}/{stem}_gtFine_color.png")
    return f"images/{seq}/{frame}.png", f"labels/{seq}/{frame}.png", None


def source_keyframe(annotated: np.ndarray, t: int, distance: int) -> int | None:
    """The keyframe ``distance`` frames from ``t`` that its labels came from (the earlier one on a tie;
    labels fuse both chains, so some pixels may come from the other)."""
    for s in (t - distance, t + distance):
        if 0 <= s < len(annotated) and annotated[s]:
            return s
    return None


def keyframe_distance(annotated: np.ndarray) -> np.ndarray:
    """int (T,): frames from each frame to its nearest annotated frame (0 on keyframes, -1 with none)."""
    keys = np.flatnonzero(annotated)
    if not len(keys):
        return np.full(len(annotated), -1, np.int64)
    return np.abs(np.arange(len(annotated))[:, None] - keys[None, :]).min(axis=1)


def export_sequence_for_training(seq: Sequence, method: str, out: Path, layout: str = "folder",
                                 min_confidence: float = 0.0, split: str = "train",
                                 on_frame: Callable[[], None] | None = None) -> list[ManifestRow]:
    """Write one sequence's labelled frames (keyframes included) in ``layout``; returns its manifest rows."""
    if layout not in LAYOUTS:
        raise ConfigError(f"training export layout must be one of {LAYOUTS}, not {layout!r}")
    if not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence must lie in [0, 1], got {min_confidence}")
    frames, read = label_frames(seq, method)
    classes = seq.store.classes
    lut = classes.colour_lut()
    annotated = seq.annotated
    if method == GROUND_TRUTH:  # stored labels: the distance says how far the nearest keyframe is
        distance = keyframe_distance(annotated)
        conf_array = None
    else:
        _, conf_name, dist_name = result_array_names(method)
        distance = np.asarray(seq.array(dist_name)[:])
        conf_array = seq.array(conf_name)
    names = seq.frame_names
    rows: list[ManifestRow] = []
    for t in frames:
        label = read(t).copy()
        keyframe = bool(annotated[t])
        if keyframe:
            label = seq.annotation(t).astype(np.uint8)
            conf = np.ones(label.shape, np.float32)
        elif conf_array is not None:
            conf = np.asarray(conf_array[t], dtype=np.float32) / 255.0
        else:
            conf = np.ones(label.shape, np.float32)
        valid = label != classes.ignore_index
        mean_conf = float(conf[valid].mean()) if valid.any() else 0.0
        if min_confidence > 0 and not keyframe:
            label[conf < min_confidence] = classes.ignore_index
        d = int(distance[t]) if distance[t] >= 0 else 0
        src = t if keyframe else source_keyframe(annotated, t, d)
        image_rel, label_rel, colour_rel = _paths(layout, split, seq.id, names[t])
        write_png_atomic(out / image_rel, seq.frame(t), compress_level=PHOTO_PNG_LEVEL)
        write_png_atomic(out / label_rel, label)
        if colour_rel is not None:
            write_png_atomic(out / colour_rel, lut[label])
        rows.append(ManifestRow(seq.id, names[t], int(t), image_rel, label_rel, keyframe,
                                names[src] if src is not None else "", d, "manual" if keyframe else method,
                                round(mean_conf, 4), round(float((label != classes.ignore_index).mean()), 4)))
        if on_frame is not None:
            on_frame()
    return rows


def write_manifest(out: Path, rows: list[ManifestRow], store: SequenceStore, settings: dict[str, object]) -> None:
    """``classes.json``, ``manifest.json`` and ``manifest.csv`` (written last, atomically)."""
    classes = store.classes
    write_text_atomic(out / "classes.json", json.dumps(
        {"names": classes.names, "palette": [list(map(int, c)) for c in classes.palette],
         "ignore_index": classes.ignore_index}, indent=2) + "\n")
    buffer = io.StringIO()
    fields = list(ManifestRow.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    write_text_atomic(out / "manifest.csv", buffer.getvalue())
    write_text_atomic(out / "manifest.json", json.dumps(
        {"store": store.url, **settings, "frames": [asdict(r) for r in rows]}, indent=1) + "\n")


def export_training_set(store: SequenceStore, method: str, out: Path, sequences: list[str], layout: str = "folder",
                        min_confidence: float = 0.0, split: str = "train",
                        on_frame: Callable[[], None] | None = None) -> tuple[list[ManifestRow], list[tuple[str, str]]]:
    """Export ``sequences``; one failing sequence never stops the others.

    Returns (manifest rows of the exported frames, [(sequence, error)] of the failed ones).
    """
    rows: list[ManifestRow] = []
    failures: list[tuple[str, str]] = []
    for seq_id in sequences:
        try:
            rows.extend(export_sequence_for_training(store.sequence(seq_id), method, out, layout, min_confidence,
                                                     split, on_frame))
        except AutolabelError as exc:
            failures.append((seq_id, str(exc)))
    write_manifest(out, rows, store, {"method": method, "layout": layout, "min_confidence": min_confidence,
                                      "split": split, "failed": [f[0] for f in failures]})
    return rows, failures


class ExportedFrames:
    """An exported training set read back: indexable ``(rgb uint8 (H, W, 3), label uint8 (H, W))``.

    Args:
        folder: what :func:`export_training_set` wrote (its ``manifest.json`` lists the frames).
        max_distance: only frames at most this far from their keyframe (keyframes are distance 0).
        distances: only frames at exactly these distances, e.g. ``{2, 4, 6, 8}`` (the paper's Table 1
            sampling); keyframes are always kept.
    """

    def __init__(self, folder: Path, max_distance: int | None = None,
                 distances: Iterable[int] | None = None) -> None:
        self.folder = Path(folder)
        try:
            manifest = json.loads((self.folder / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.folder}: no readable manifest.json of `autolabel export --format "
                              f"cityscapes|folder` ({exc})") from exc
        keep = None if distances is None else {0, *distances}
        self.rows = [ManifestRow(**r) for r in manifest["frames"]
                     if (max_distance is None or r["distance"] <= max_distance)
                     and (keep is None or r["distance"] in keep or r["keyframe"])]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        row = self.rows[i]
        return read_rgb(self.folder / row.image), read_label_raw(self.folder / row.label)
