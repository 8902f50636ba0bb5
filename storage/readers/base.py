"""What every dataset reader returns: a class set and a list of lazily read sequences."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from autolabel.storage.classes import ClassSet
from autolabel.storage.images import (
    check_same_size,
    map_colour_label,
    map_label,
    read_label_raw,
    read_rgb,
)
from pydantic import BaseModel

from autolabel.errors import UnknownLayoutError

T = TypeVar("T")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class FrameItem:
    """One decoded frame: ``rgb`` uint8 (H, W, 3), ``label`` uint8 (H, W) or None."""

    name: str
    rgb: np.ndarray
    label: np.ndarray | None
    origin: str


class LabelDecoder(ABC):
    """Turns a label file into class ids (H, W) uint8 of the dataset's class set."""

    @abstractmethod
    def __call__(self, path: Path) -> np.ndarray: ...


@dataclass(frozen=True)
class LutLabelDecoder(LabelDecoder):
    """Class-index labels mapped through a (256,) table (-1 marks values outside the class set)."""

    lut: np.ndarray

    def __call__(self, path: Path) -> np.ndarray:
        return map_label(read_label_raw(path), self.lut, path)


@dataclass(frozen=True)
class PaletteLabelDecoder(LabelDecoder):
    """RGB colour labels mapped through colour -> class id; index labels through ``lut``."""

    colours: dict[tuple[int, int, int], int]
    lut: np.ndarray

    def __call__(self, path: Path) -> np.ndarray:
        raw = read_label_raw(path)
        if raw.ndim == 3:
            return map_colour_label(raw, self.colours, path)
        return map_label(raw, self.lut, path)


class SequenceSource(ABC):
    problem: str | None = None  # set by a reader when the sequence cannot be ingested as given

    """A sequence as a reader found it: an id, where it came from and its frames in order."""

    id: str
    source: str
    fps: float | None

    @abstractmethod
    def __len__(self) -> int:
        """Number of frames (for a video, the container's estimate)."""

    @abstractmethod
    def iter_items(self, prefetch: int = 4) -> Iterator[FrameItem]:
        """Decoded frames in order; raises InputDataError subclasses naming the bad file."""

    def fingerprint(self) -> str | None:
        """A cheap digest of the source files (names, sizes, modification times); None if unknown."""
        return None


@dataclass(frozen=True)
class FrameFile:
    name: str
    image: Path
    label: Path | None


@dataclass
class ImageFileSequence(SequenceSource):
    """A sequence of image files with optional label files, decoded ``prefetch`` frames ahead."""

    id: str
    source: str
    fps: float | None
    frames: list[FrameFile]
    decode_label: LabelDecoder

    def __len__(self) -> int:
        return len(self.frames)

    def _load(self, f: FrameFile) -> FrameItem:
        rgb = read_rgb(f.image)
        label = None
        if f.label is not None:
            label = self.decode_label(f.label)
            check_same_size(rgb, label, f.label, f.image.name)
        return FrameItem(f.name, rgb, label, str(f.image))

    def iter_items(self, prefetch: int = 4) -> Iterator[FrameItem]:
        return ordered_prefetch(self._load, self.frames, prefetch)

    def fingerprint(self) -> str | None:
        digest = hashlib.blake2b(digest_size=16)
        for f in self.frames:
            for path in (f.image, f.label):
                if path is None:
                    digest.update(b"-")
                    continue
                try:
                    st = path.stat()
                    digest.update(f"{f.name}|{path.name}|{st.st_size}|{st.st_mtime_ns}".encode())
                except OSError:
                    digest.update(f"{f.name}|{path.name}|missing".encode())
        return digest.hexdigest()


def ordered_prefetch(fn: Callable[[T], FrameItem], items: Iterable[T], depth: int) -> Iterator[FrameItem]:
    """``map(fn, items)`` in order, with up to ``depth`` calls running ahead in threads.

    Image decoding releases the GIL, so this overlaps decoding with compression and writing
    while memory stays bounded by ``depth`` frames.
    """
    if depth <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=min(depth, 4), thread_name_prefix="decode") as pool:
        pending: deque[Future[FrameItem]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


class ReaderOptions(BaseModel):
    """Options some readers take (the plain ``folder`` reader above all)."""

    labels: Path | None = None
    classes_file: Path | None = None
    classes: ClassSet | None = None  # the target store's class set, when it already exists
    fps: float | None = None
    allow_unlabelled: bool = False  # folder layout: accept a sequence whose --labels folder matches no frame


@dataclass
class DatasetSource:
    """A reader's result: the class set and the sequences found under ``root``."""

    layout: str
    root: Path
    classes: ClassSet
    sequences: list[SequenceSource] = field(default_factory=list)

    def select(self, ids: list[str] | None) -> list[SequenceSource]:
        """The sequences named in ``ids`` (exact ids or globs; all when None); unknown ids raise."""
        from autolabel.storage.ids import select_ids

        chosen = set(select_ids([s.id for s in self.sequences], ids, f"{self.root} ({self.layout})"))
        return [s for s in self.sequences if s.id in chosen]


def list_images(directory: Path) -> list[Path]:
    """Image files directly inside ``directory``, sorted by name."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def require_dir(path: Path, layout: str, hint: str) -> Path:
    if not path.is_dir():
        raise UnknownLayoutError(f"{path}: not found; the {layout} layout expects {hint}")
    return path


def consecutive_runs(numbered: list[tuple[int, T]], max_gap: int) -> list[list[tuple[int, T]]]:
    """Split ``(number, item)`` pairs into runs whose consecutive numbers differ by <= ``max_gap``.

    Example:
        >>> consecutive_runs([(1, "a"), (3, "b"), (40, "c")], max_gap=2)
        [[(1, 'a'), (3, 'b')], [(40, 'c')]]
    """
    runs: list[list[tuple[int, T]]] = []
    for pair in sorted(numbered, key=lambda p: p[0]):
        if runs and pair[0] - runs[-1][-1][0] <= max_gap:
            runs[-1].append(pair)
        else:
            runs.append([pair])
    return runs
