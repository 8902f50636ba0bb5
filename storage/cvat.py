"""CVAT "Segmentation mask 1.1" exports: read them as keyframe annotations, write them for review.

The layout (a folder or a zip of it)::

    labelmap.txt                      # label:color_rgb:parts:actions, one label per line
    ImageSets/Segmentation/default.txt  # image names (no extension), one per line
    SegmentationClass/<name>.png      # RGB colour mask, one colour per label of labelmap.txt
    JPEGImages/<name>.png             # the frames (written by autolabel so a reviewer can load them)

Names are ``<sequence id>/<frame name>``, so a reviewer's export maps back to stored frames; a
bare ``<frame name>`` needs the sequence given. Label ``background`` (0,0,0) is "no label" (the
store's ignore index), unless the store has a class named ``background`` (DAVIS's): then it is that
class, in (0,0,0) whatever its own colour, and pixels without a label are exported as it too (CVAT
has no "ignore"). Every other label must be a class of the store (by name), and every colour in a
mask must be declared in ``labelmap.txt``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from autolabel.atomic import atomic_path, write_text_atomic
from autolabel.errors import ConfigError, InputDataError, LabelValueError
from autolabel.storage.classes import ClassSet
from autolabel.storage.images import PHOTO_PNG_LEVEL, map_colour_label, write_png_atomic
from autolabel.storage.store import SequenceStore

LABELMAP = "labelmap.txt"
IMAGE_SET = "ImageSets/Segmentation/default.txt"
MASKS = "SegmentationClass"
IMAGES = "JPEGImages"
BACKGROUND = "background"


class _Files:
    """Read-only access to an export, whether a folder or a zip."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        if self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile:
                raise InputDataError(f"{self.path}: not a zip file nor a folder; give a CVAT 'Segmentation mask 1.1' "
                                     "export (the zip CVAT downloads, or its unpacked folder)") from None
            # CVAT zips hold the files at the top; tolerate one enclosing folder
            names = self._zip.namelist()
            hit = next((n for n in names if n.endswith(LABELMAP)), None)
            if hit is not None:
                self._prefix = hit[: -len(LABELMAP)]
        elif not self.path.is_dir():
            raise InputDataError(f"{self.path}: no such CVAT export (folder or zip)")

    def where(self, name: str) -> str:
        return f"{self.path}:{name}" if self._zip is not None else str(self.path / name)

    def exists(self, name: str) -> bool:
        if self._zip is not None:
            return self._prefix + name in set(self._zip.namelist())
        return (self.path / name).is_file()

    def read(self, name: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(self._prefix + name)
            return (self.path / name).read_bytes()
        except (KeyError, FileNotFoundError):
            raise InputDataError(f"{self.where(name)}: missing from the CVAT export") from None

    def masks(self) -> list[str]:
        """Image names of every mask under SegmentationClass/ (for exports without an image set)."""
        if self._zip is not None:
            start = self._prefix + MASKS + "/"
            return sorted(n[len(start):-4] for n in self._zip.namelist() if n.startswith(start) and n.endswith(".png"))
        root = self.path / MASKS
        return sorted(str(p.relative_to(root))[:-4] for p in root.rglob("*.png")) if root.is_dir() else []


def parse_labelmap(text: str, where: str) -> dict[str, tuple[int, int, int]]:
    """``labelmap.txt`` -> label name -> RGB colour; errors name the file and line."""
    labels: dict[str, tuple[int, int, int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) < 2:
            raise InputDataError(f"{where} line {number}: expected 'label:r,g,b:parts:actions', got {line!r}")
        try:
            rgb = tuple(int(v) for v in parts[1].split(","))
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise InputDataError(f"{where} line {number}: colour {parts[1]!r} of label {parts[0]!r} is not 'r,g,b'")
        if parts[0] in labels:
            raise InputDataError(f"{where} line {number}: label {parts[0]!r} is declared twice")
        labels[parts[0]] = rgb  # type: ignore[assignment]
    if not labels:
        raise InputDataError(f"{where}: declares no label")
    return labels


def background_class(classes: ClassSet) -> int | None:
    """The store's class named ``background`` (any case), which is CVAT's ``background``; else None."""
    return next((i for i, n in enumerate(classes.names) if n.lower() == BACKGROUND), None)


def format_labelmap(classes: ClassSet) -> str:
    """The ``labelmap.txt`` of a store's classes (``background`` first: unlabelled pixels, or the
    store's own background class)."""
    own = background_class(classes)
    clash = [n for i, (n, c) in enumerate(zip(classes.names, classes.palette)) if tuple(c) == (0, 0, 0) and i != own]
    if clash:
        raise ConfigError(f"class {clash[0]!r} is drawn in (0,0,0), which CVAT reserves for 'background'; "
                          "give it another colour in the store's class set")
    lines = ["# label:color_rgb:parts:actions", f"{BACKGROUND}:0,0,0::"]
    lines += [f"{n}:{r},{g},{b}::" for i, (n, (r, g, b)) in enumerate(zip(classes.names, classes.palette)) if i != own]
    return "\n".join(lines) + "\n"


def mask_colours(classes: ClassSet) -> np.ndarray:
    """(256, 3) uint8: each label value's colour in an exported mask (no label, and the store's own
    background class, in CVAT's background (0,0,0))."""
    lut = classes.colour_lut((0, 0, 0))
    own = background_class(classes)
    if own is not None:
        lut[own] = (0, 0, 0)
    return lut


def colour_table(labelmap: dict[str, tuple[int, int, int]], classes: ClassSet,
                 where: str) -> dict[tuple[int, int, int], int]:
    """Colour -> store class id (``background`` -> ignore, or the store's own background class); labels unknown
    to the store are an error."""
    by_name = {n.lower(): i for i, n in enumerate(classes.names)}
    own = background_class(classes)
    unlabelled = classes.ignore_index if own is None else own
    table: dict[tuple[int, int, int], int] = {}
    for name, rgb in labelmap.items():
        if name.lower() == BACKGROUND:
            table[rgb] = unlabelled
            continue
        if name.lower() not in by_name:
            raise LabelValueError(f"{where}: label {name!r} is not a class of the store "
                                  f"(classes: {', '.join(classes.names)}); rename it in CVAT or map it")
        if rgb in table and table[rgb] != by_name[name.lower()]:
            raise LabelValueError(f"{where}: labels share the colour {rgb}; give each label its own colour")
        table[rgb] = by_name[name.lower()]
    table.setdefault((0, 0, 0), unlabelled)
    return table


def _decode_rgb(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputDataError(f"{where}: not a readable PNG ({exc})") from None


@dataclass(frozen=True)
class CvatMask:
    """One annotated image of an export: its name and class ids (H, W) uint8."""

    name: str
    labels: np.ndarray


def read_cvat_masks(path: Path, classes: ClassSet) -> list[CvatMask]:
    """Every mask of a CVAT Segmentation mask 1.1 export as store class ids.

    Raises InputDataError / LabelValueError naming the file for a missing labelmap, a label
    the store does not have, a colour the labelmap does not declare, or an unreadable mask.
    """
    files = _Files(path)
    labelmap = parse_labelmap(files.read(LABELMAP).decode("utf-8", "replace"), files.where(LABELMAP))
    table = colour_table(labelmap, classes, files.where(LABELMAP))
    if files.exists(IMAGE_SET):
        names = [n.strip() for n in files.read(IMAGE_SET).decode("utf-8", "replace").splitlines() if n.strip()]
    else:
        names = files.masks()
    if not names:
        raise InputDataError(f"{files.where(IMAGE_SET)}: the export lists no image")
    out = []
    for name in names:
        where = files.where(f"{MASKS}/{name}.png")
        rgb = _decode_rgb(files.read(f"{MASKS}/{name}.png"), where)
        try:
            labels = map_colour_label(rgb, table, where)  # type: ignore[arg-type]
        except LabelValueError as exc:
            raise LabelValueError(f"{exc}: colours not declared in {LABELMAP} (declare them as labels in CVAT)") \
                from None
        out.append(CvatMask(name, labels))
    return out


def write_cvat_export(out: Path, classes: ClassSet, items: Iterable[tuple[str, np.ndarray, np.ndarray | None]]) -> int:
    """Write a Segmentation mask 1.1 export: (name, labels (H, W), frame (H, W, 3) or None) per image.

    Returns the number of images written. Names may hold '/' (``<sequence>/<frame>``).
    """
    out = Path(out)
    lut = mask_colours(classes)
    names = []
    for name, labels, frame in items:
        write_png_atomic(out / MASKS / f"{name}.png", lut[labels])
        if frame is not None:
            write_png_atomic(out / IMAGES / f"{name}.png", frame, compress_level=PHOTO_PNG_LEVEL)
        names.append(name)
    write_text_atomic(out / LABELMAP, format_labelmap(classes))
    (out / IMAGE_SET).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / IMAGE_SET, "".join(f"{n}\n" for n in names))
    return len(names)


def zip_export(folder: Path, archive: Path) -> Path:
    """Pack an export folder into the zip CVAT's 'Upload annotations' takes."""
    with atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                z.write(p, str(p.relative_to(folder)))
    return archive


def resolve_names(store: SequenceStore, names: Iterable[str], sequence: str | None = None) -> dict[str, tuple[str, int]]:
    """Image name -> (sequence id, frame index); errors name what matches nothing or more than one frame."""
    index: dict[str, dict[str, int]] = {}

    def frames_of(seq_id: str) -> dict[str, int]:
        if seq_id not in index:
            index[seq_id] = {n: t for t, n in enumerate(store.sequence(seq_id).frame_names)}
        return index[seq_id]

    out: dict[str, tuple[str, int]] = {}
    ids = store.sequence_ids()
    for name in names:
        seq_id, _, frame = name.rpartition("/")
        if not seq_id:
            if sequence is not None:
                seq_id = sequence
            else:
                hits = [s for s in ids if frame in frames_of(s)]
                if len(hits) != 1:
                    raise InputDataError(
                        f"image {name!r}: {'no' if not hits else len(hits)} sequences have a frame of that name"
                        f"{' (' + ', '.join(hits[:5]) + ')' if hits else ''}; name images '<sequence>/<frame>' "
                        "(as `autolabel export --format cvat-mask` does) or pass --sequence")
                seq_id = hits[0]
        if seq_id not in ids:
            raise InputDataError(f"image {name!r}: the store has no sequence {seq_id!r}")
        frames = frames_of(seq_id)
        if frame not in frames:
            some = ", ".join(list(frames)[:3])
            raise InputDataError(f"image {name!r}: sequence {seq_id!r} has no frame {frame!r} (frames: {some}, ...)")
        out[name] = (seq_id, frames[frame])
    return out


def import_keyframes(store: SequenceStore, export: Path, sequence: str | None = None) -> dict[str, list[int]]:
    """Add every mask of a CVAT export as a keyframe of its stored frame; returns the frames per sequence.

    Everything is read and checked first (labels, colours, names, sizes), so a bad file changes
    nothing; then each sequence's keyframes are written in one atomic step.
    """
    masks = read_cvat_masks(export, store.classes)
    where = resolve_names(store, [m.name for m in masks], sequence)
    per_seq: dict[str, dict[int, np.ndarray]] = {}
    for mask in masks:
        seq_id, t = where[mask.name]
        seq = store.sequence(seq_id)
        if mask.labels.shape != (seq.height, seq.width):
            raise InputDataError(f"{export}: mask {mask.name!r} is {mask.labels.shape[1]}x{mask.labels.shape[0]} but "
                                 f"frame {t} of {seq_id!r} is {seq.width}x{seq.height}")
        per_seq.setdefault(seq_id, {})[t] = mask.labels
    for seq_id, labels in per_seq.items():
        store.add_keyframes(seq_id, labels, source=str(export))
    return {seq_id: sorted(labels) for seq_id, labels in per_seq.items()}


def export_frames(store: SequenceStore, method: str, out: Path, frames: Iterable[tuple[str, int]],
                  with_images: bool = True) -> int:
    """Write the labels of ``method`` ('gt' for stored labels) at these frames as a CVAT export."""
    from autolabel.storage.export import label_frames

    readers: dict[str, object] = {}

    def items() -> Iterable[tuple[str, np.ndarray, np.ndarray | None]]:
        for seq_id, t in frames:
            seq = store.sequence(seq_id)
            if seq_id not in readers:
                readers[seq_id] = label_frames(seq, method)[1]
            labels = readers[seq_id](t)  # type: ignore[operator]
            yield f"{seq_id}/{seq.frame_names[t]}", labels, seq.frame(t) if with_images else None

    return write_cvat_export(out, store.classes, items())
