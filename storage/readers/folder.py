"""A plain folder of frames or a video file, with an optional folder of sparse label PNGs.

Sources:
    * a directory of images -> one sequence named after the directory;
    * a video file (OpenCV; PyAV when OpenCV cannot open it) -> one sequence named after the file;
    * a directory of such directories / videos -> one sequence each.

Labels (``--labels DIR``; for several sequences ``DIR/<sequence>/``) are matched to frames by
file stem, or, when a label's stem is a number that names no frame, by 0-based frame index.
They are class-index PNGs, or RGB colour PNGs decoded with the palette of the class file
(``--classes FILE``: JSON ``{"names": [...], "palette": [[r, g, b], ...], "ignore_index": 255}``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from autolabel.storage.classes import ClassSet, lookup_table
from autolabel.storage.ids import make_sequence_id
from autolabel.storage.images import check_same_size
from autolabel.storage.readers import READERS
from autolabel.storage.readers.base import (
    IMAGE_SUFFIXES,
    DatasetSource,
    FrameFile,
    FrameItem,
    ImageFileSequence,
    LabelDecoder,
    PaletteLabelDecoder,
    ReaderOptions,
    SequenceSource,
    list_images,
)
from pydantic import ValidationError

from autolabel.errors import ConfigError, ImageReadError, UnknownLayoutError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def load_class_file(path: Path) -> ClassSet:
    """Read a class file (JSON with names, palette, optional ignore_index)."""
    try:
        data = json.loads(path.read_text())
        return ClassSet(**data)
    except FileNotFoundError:
        raise ConfigError(f"{path}: class file not found") from None
    except (json.JSONDecodeError, TypeError, ValidationError, ConfigError) as exc:
        raise ConfigError(
            f"{path}: not a valid class file ({exc}); expected JSON like "
            '{"names": ["road", "car"], "palette": [[128, 64, 128], [0, 0, 142]], "ignore_index": 255}'
        ) from exc


def _decoder(classes: ClassSet) -> PaletteLabelDecoder:
    mapping = {i: i for i in range(classes.num_classes)} | {classes.ignore_index: classes.ignore_index}
    colours = {tuple(c): i for i, c in enumerate(classes.palette)}
    return PaletteLabelDecoder(colours=colours, lut=lookup_table(mapping))


def _match_labels(frame_names: list[str], label_dir: Path | None) -> list[Path | None]:
    if label_dir is None or not label_dir.is_dir():
        return [None] * len(frame_names)
    labels = {p.stem: p for p in label_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    matched: list[Path | None] = [labels.pop(name, None) for name in frame_names]
    for stem, path in labels.items():  # leftovers: numeric stems are frame indices
        if stem.isdigit() and int(stem) < len(frame_names) and matched[int(stem)] is None:
            matched[int(stem)] = path
    return matched


@dataclass
class VideoSequence(SequenceSource):
    """Frames decoded from a video file in order (OpenCV, or PyAV when installed)."""

    id: str
    source: str
    fps: float | None
    path: Path
    label_dir: Path | None
    decode_label: LabelDecoder
    estimated_frames: int

    def __len__(self) -> int:
        return self.estimated_frames

    def _decode(self) -> Iterator[np.ndarray]:
        import cv2

        cap = _open_video(self.path)
        if not cap.isOpened():
            cap.release()
            yield from self._decode_pyav()
            return
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()

    def _decode_pyav(self) -> Iterator[np.ndarray]:
        try:
            import av
        except ImportError:
            raise ImageReadError(f"{self.path}: OpenCV cannot open this video (a damaged file, or a codec its "
                                 "FFmpeg lacks) and PyAV, the fallback, is not installed "
                                 "(pip install 'autolabel[video]')") from None
        try:
            with av.open(str(self.path)) as container:
                for frame in container.decode(video=0):
                    yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as exc:  # type: ignore[attr-defined]
            raise ImageReadError(f"{self.path}: cannot decode video ({exc})") from exc

    def iter_items(self, prefetch: int = 4) -> Iterator[FrameItem]:
        labels: dict[int, Path] = {}
        if self.label_dir is not None and self.label_dir.is_dir():
            for p in self.label_dir.glob("*.png"):
                digits = "".join(ch for ch in p.stem if ch.isdigit())
                if digits:
                    labels[int(digits)] = p
        count = 0
        for index, rgb in enumerate(self._decode()):
            count += 1
            label_path = labels.get(index)
            label = None
            if label_path is not None:
                label = self.decode_label(label_path)
                check_same_size(rgb, label, label_path, f"{self.path.name} frame {index}")
            yield FrameItem(f"{index:06d}", rgb, label, f"{self.path}#frame{index}")
        if count == 0:
            raise ImageReadError(f"{self.path}: no frame could be decoded; the video is empty or corrupt")


def _open_video(path: Path) -> Any:
    """``cv2.VideoCapture`` of ``path``, with FFmpeg's own complaints ("moov atom not found") kept off
    the terminal: our error names the file and what to do (set ``OPENCV_FFMPEG_LOGLEVEL`` to see them)."""
    import cv2

    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET; read when a capture opens
    return cv2.VideoCapture(str(path))


def _video_source(path: Path, label_dir: Path | None, decoder: LabelDecoder, fps: float | None) -> VideoSequence:
    import cv2

    cap = _open_video(path)
    estimated = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    video_fps = cap.get(cv2.CAP_PROP_FPS) if cap.isOpened() else 0.0
    cap.release()
    return VideoSequence(id=make_sequence_id(path.stem), source=str(path), fps=fps or (video_fps or None),
                         path=path, label_dir=label_dir, decode_label=decoder, estimated_frames=estimated)


def _no_label_matched(source: str, label_dir: Path | None, frame_names: list[str]) -> str:
    found = sorted(p.stem for p in label_dir.glob("*.png"))[:3] if label_dir and label_dir.is_dir() else []
    where = f"{label_dir} holds {', '.join(found)}..." if found else f"{label_dir} has no PNG files (or is missing)"
    return (f"{source}: no label in --labels matched a frame ({where}; frames are named "
            f"{', '.join(frame_names[:3])}...); name labels after their frames (or frame indices), or pass "
            "--allow-unlabelled to ingest frames without labels")


def _image_source(directory: Path, label_dir: Path | None, decoder: LabelDecoder, fps: float | None,
                  require_labels: bool) -> ImageFileSequence:
    images = list_images(directory)
    labels = _match_labels([p.stem for p in images], label_dir)
    files = [FrameFile(p.stem, p, lab) for p, lab in zip(images, labels)]
    seq = ImageFileSequence(id=make_sequence_id(directory.name), source=str(directory), fps=fps,
                            frames=files, decode_label=decoder)
    if require_labels and images and not any(labels):
        seq.problem = _no_label_matched(str(directory), label_dir, [p.stem for p in images])
    return seq


@READERS.register("folder")
def read_folder(root: Path, options: ReaderOptions) -> DatasetSource:
    if options.classes_file is not None:
        classes = load_class_file(options.classes_file)
    elif options.classes is not None:
        classes = options.classes
    else:
        raise ConfigError(
            f"{root}: the folder layout needs a class list: pass --classes FILE (JSON with names and "
            "palette), or ingest into an existing store whose classes it then uses"
        )
    decoder = _decoder(classes)
    labels = options.labels
    if labels is not None and not labels.is_dir():
        raise UnknownLayoutError(f"{labels}: label folder not found")
    require = labels is not None and not options.allow_unlabelled
    if root.is_file():
        if root.suffix.lower() not in VIDEO_SUFFIXES:
            raise UnknownLayoutError(f"{root}: not a video file ({', '.join(VIDEO_SUFFIXES)}) or a folder")
        return DatasetSource("folder", root, classes, [_video_source(root, labels, decoder, options.fps)])
    if not root.is_dir():
        raise UnknownLayoutError(f"{root}: no such file or folder")
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir() if p.is_file()):
        return DatasetSource("folder", root, classes, [_image_source(root, labels, decoder, options.fps, require)])
    sequences: list[SequenceSource] = []
    for child in sorted(root.iterdir()):
        sub_labels = labels / (child.stem if child.is_file() else child.name) if labels else None
        if child.is_dir():
            sequences.append(_image_source(child, sub_labels, decoder, options.fps, require))
        elif child.suffix.lower() in VIDEO_SUFFIXES:
            sequences.append(_video_source(child, sub_labels, decoder, options.fps))
    if not sequences:
        raise UnknownLayoutError(f"{root}: found no frames, frame folders or video files")
    return DatasetSource("folder", root, classes, sequences)
