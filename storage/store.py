"""The Zarr v3 sequence store (DESIGN.md section 3).

Layout::

    <store>/                          attrs: classes, palette, ignore_index, schema_version
      sequences/<seq_id>/             attrs: source, fps, size, frame_names, content_hash, stages
        frames     uint8 (T, H, W, 3) one frame per chunk; shards of ``shard_frames`` when long
        gt         uint8 (T, H, W)    labels (annotations and evaluation-only ground truth);
                                      ignore_index where a frame has none
        annotated  bool  (T,)         frames whose label is a manual annotation
        has_gt     bool  (T,)         frames that carry any label in ``gt``

A sequence becomes visible only when its ``ingest`` stage is marked done, which happens after
every chunk is written: readers never see half a sequence, and a killed ingest leaves an
*incomplete* group that the next ingest removes and writes again. Every later stage follows the
same rule through :meth:`SequenceStore.mark_stage_done`.

Frames and labels are read lazily, one chunk per frame; nothing loads a whole sequence.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence as SequenceABC
from typing import Any, Literal

import fsspec
import numpy as np
import zarr
from pydantic import BaseModel, Field
from zarr.codecs import BloscCodec

import autolabel
from autolabel.errors import (
    ClassSetMismatchError,
    EmptySequenceError,
    NotAnnotatedError,
    SchemaVersionError,
    SequenceNotFoundError,
    SizeMismatchError,
    StoreError,
    StoreNotFoundError,
)
from autolabel.storage.classes import ClassSet
from autolabel.storage.ids import validate_sequence_id
from autolabel.storage.stages import INGEST

SCHEMA_VERSION = 1


class StoreLayout(BaseModel):
    """How sequence arrays are chunked and compressed."""

    shard_threshold: int = Field(64, ge=1, description="sequences longer than this are sharded")
    shard_frames: int = Field(16, ge=1, description="frames per shard (the unit of writing)")
    clevel: int = Field(3, ge=0, le=9, description="zstd level inside Blosc")
    shuffle: Literal["noshuffle", "shuffle", "bitshuffle"] = "bitshuffle"

    def shard_length(self, num_frames: int) -> int | None:
        """Frames per shard for a sequence of ``num_frames``, or None when unsharded."""
        return self.shard_frames if num_frames > self.shard_threshold else None

    def codec(self) -> BloscCodec:
        return BloscCodec(cname="zstd", clevel=self.clevel, shuffle=self.shuffle)


def _open_group(url: str, mode: Literal["r", "r+", "a"]) -> zarr.Group:
    try:
        return zarr.open_group(url, mode=mode, zarr_format=3)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreNotFoundError(
            f"no autolabel store at {url!r}; create one with `autolabel ingest ... --store {url}` "
            "or `autolabel synth`"
        ) from exc


class SequenceStore:
    """One Zarr store holding the sequences of a dataset, all sharing one class set.

    Open an existing store with :meth:`open`, or create/extend one with :meth:`create`.
    ``url`` is a local path or an fsspec URL (``memory://``, ``s3://`` ...).
    """

    def __init__(self, url: str, root: zarr.Group, classes: ClassSet) -> None:
        self.url = url
        self.root = root
        self.classes = classes
        self._seq_group: zarr.Group | None = None

    # --- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, mode: Literal["r", "r+"] = "r") -> SequenceStore:
        """Open an existing store; raises StoreNotFoundError / SchemaVersionError."""
        url = str(url)
        root = _open_group(url, mode)
        return cls(url, root, cls._read_class_set(url, root))

    @classmethod
    def create(cls, url: str, classes: ClassSet) -> SequenceStore:
        """Create a store, or open an existing one that holds the same class set."""
        url = str(url)
        root = _open_group(url, "a")
        if "schema_version" in root.attrs:
            existing = cls._read_class_set(url, root)
            if existing != classes:
                raise ClassSetMismatchError(
                    f"store {url!r} holds classes {existing.names} (ignore {existing.ignore_index}) "
                    f"but the data has {classes.names} (ignore {classes.ignore_index}); "
                    "ingest into a new store instead"
                )
            return cls(url, root, existing)
        root.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "classes": classes.names,
                "palette": [list(c) for c in classes.palette],
                "ignore_index": classes.ignore_index,
                "created_by": f"autolabel {autolabel.__version__}",
            }
        )
        root.require_group("sequences")
        return cls(url, root, classes)

    @staticmethod
    def _read_class_set(url: str, root: zarr.Group) -> ClassSet:
        attrs = root.attrs.asdict()
        if "schema_version" not in attrs:
            raise StoreNotFoundError(
                f"{url!r} is a Zarr group but not an autolabel store (no schema_version attribute)"
            )
        version = attrs["schema_version"]
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"store {url!r} has schema version {version}, but this autolabel "
                f"({autolabel.__version__}) reads version {SCHEMA_VERSION}; use the autolabel "
                "release that wrote it, or ingest the sources into a new store"
            )
        return ClassSet(
            names=attrs["classes"],
            palette=[tuple(c) for c in attrs["palette"]],
            ignore_index=attrs["ignore_index"],
        )

    # --- listing -------------------------------------------------------------------------------

    @property
    def _sequences(self) -> zarr.Group:
        if self._seq_group is None:
            if self.root.read_only:
                self._seq_group = self.root["sequences"]
            else:
                self._seq_group = self.root.require_group("sequences")
        return self._seq_group

    def _all_ids(self) -> list[str]:
        if "sequences" not in self.root:
            return []
        return sorted(self._sequences.group_keys())

    def _group(self, seq_id: str) -> zarr.Group | None:
        """The group of ``seq_id`` (complete or not), or None; one metadata read."""
        try:
            node = self._sequences[validate_sequence_id(seq_id)]
        except KeyError:
            return None
        return node if isinstance(node, zarr.Group) else None

    def _is_complete(self, seq_id: str, group: zarr.Group | None = None) -> bool:
        group = group if group is not None else self._group(seq_id)
        return group is not None and INGEST in group.attrs.get("stages", {})

    def sequence_ids(self) -> list[str]:
        """Ids of the complete sequences (fully ingested), sorted."""
        return [s for s in self._all_ids() if self._is_complete(s)]

    def incomplete_ids(self) -> list[str]:
        """Ids of sequences whose ingest was interrupted; the next ingest rewrites them."""
        return [s for s in self._all_ids() if not self._is_complete(s)]

    def __contains__(self, seq_id: object) -> bool:
        return isinstance(seq_id, str) and self._is_complete(seq_id)

    def __len__(self) -> int:
        return len(self.sequence_ids())

    def sequence(self, seq_id: str) -> Sequence:
        """A complete sequence, read lazily."""
        group = self._group(seq_id)
        if group is None:
            known = ", ".join(self.sequence_ids()[:10]) or "none"
            raise SequenceNotFoundError(f"store {self.url!r} has no sequence {seq_id!r} (some: {known})")
        if not self._is_complete(seq_id, group):
            raise SequenceNotFoundError(
                f"sequence {seq_id!r} in {self.url!r} is incomplete (its ingest was interrupted); "
                "run the same `autolabel ingest` again to finish it"
            )
        return Sequence(self, seq_id, group)

    def sequences(self) -> Iterator[Sequence]:
        for seq_id in self.sequence_ids():
            yield self.sequence(seq_id)

    # --- writing -------------------------------------------------------------------------------

    def new_sequence(
        self,
        seq_id: str,
        *,
        expected_frames: int,
        source: str,
        fps: float | None,
        layout: StoreLayout | None = None,
        source_fingerprint: str | None = None,
    ) -> SequenceWriter:
        """Start writing a sequence; any earlier (complete or incomplete) one with this id goes.

        ``source_fingerprint`` (names, sizes and times of the source files) lets a later ingest
        notice that the source changed.
        """
        self.delete_sequence(seq_id)
        writer = SequenceWriter(self, seq_id, expected_frames, source, fps, layout or StoreLayout())
        writer.source_fingerprint = source_fingerprint
        return writer

    def delete_sequence(self, seq_id: str) -> None:
        if self._group(seq_id) is not None:
            del self._sequences[seq_id]

    def mark_stage_done(self, seq_id: str, stage: str, info: dict[str, Any] | None = None,
                        extra_attrs: dict[str, Any] | None = None) -> None:
        """Record that ``stage`` finished for ``seq_id``; call only after all its chunks exist.

        ``extra_attrs`` are written in the same metadata update (one atomic write of zarr.json).
        """
        group = self._group(seq_id)
        if group is None:
            raise SequenceNotFoundError(f"store {self.url!r} has no sequence {seq_id!r}")
        stages = dict(group.attrs.get("stages", {}))
        stages[stage] = {"finished_at": time.time(), "code_version": autolabel.__version__, **(info or {})}
        group.attrs.update({**(extra_attrs or {}), "stages": stages})

    def clear_stage(self, seq_id: str, stage: str) -> None:
        """Forget that ``stage`` finished (call before rewriting its arrays)."""
        group = self._group(seq_id)
        if group is not None and stage in group.attrs.get("stages", {}):
            stages = dict(group.attrs["stages"])
            del stages[stage]
            group.attrs["stages"] = stages

    def writable_sequence(self, seq_id: str) -> Sequence:
        """A complete sequence whose group later stages may write into (store opened r+)."""
        if self.root.read_only:
            raise StoreError(f"store {self.url!r} is open read-only; open it with mode='r+' to write stages")
        return self.sequence(seq_id)

    def nbytes(self, seq_id: str | None = None) -> int:
        """Bytes the store (or one sequence) takes in its backing storage."""
        fs, path = fsspec.core.url_to_fs(self.url)
        if seq_id is not None:
            path = f"{path.rstrip('/')}/sequences/{validate_sequence_id(seq_id)}"
        try:
            return int(fs.du(path, total=True))
        except FileNotFoundError:
            return 0


class Sequence:
    """One complete sequence. Arrays are opened lazily; frames are read one chunk at a time."""

    def __init__(self, store: SequenceStore, seq_id: str, group: zarr.Group) -> None:
        self.store = store
        self.id = seq_id
        self.group = group
        self.attrs: dict[str, Any] = group.attrs.asdict()
        self._annotated: np.ndarray | None = None
        self._has_gt: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"Sequence({self.id!r}, frames={self.num_frames}, size={self.width}x{self.height})"

    @property
    def num_frames(self) -> int:
        return int(self.attrs["num_frames"])

    @property
    def width(self) -> int:
        return int(self.attrs["size"][0])

    @property
    def height(self) -> int:
        return int(self.attrs["size"][1])

    @property
    def frame_names(self) -> list[str]:
        return list(self.attrs["frame_names"])

    @property
    def fps(self) -> float | None:
        return self.attrs.get("fps")

    @property
    def source(self) -> str:
        return str(self.attrs.get("source", ""))

    @property
    def content_hash(self) -> str:
        """Hash of frames, labels and the annotation choice (cache keys, change detection)."""
        return str(self.attrs["content_hash"])

    @property
    def source_fingerprint(self) -> str | None:
        """Fingerprint of the source files at ingest (None when the reader gives none)."""
        return self.attrs.get("source_fingerprint")

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return dict(self.attrs.get("stages", {}))

    def stage_done(self, stage: str) -> bool:
        return stage in self.stages

    def array(self, name: str) -> zarr.Array:
        """A named array of this sequence (``frames``, ``gt``, ``flow_fw``...)."""
        try:
            return self.group[name]
        except KeyError:
            raise StoreError(f"sequence {self.id!r} has no array {name!r}") from None

    @property
    def annotated(self) -> np.ndarray:
        """bool (T,): frames whose label is a manual annotation (propagation sources)."""
        if self._annotated is None:
            self._annotated = np.asarray(self.array("annotated")[:], dtype=bool)
        return self._annotated

    @property
    def has_gt(self) -> np.ndarray:
        """bool (T,): frames with any stored label (annotation or evaluation ground truth)."""
        if self._has_gt is None:
            self._has_gt = np.asarray(self.array("has_gt")[:], dtype=bool)
        return self._has_gt

    def frame(self, t: int) -> np.ndarray:
        """Frame ``t`` as uint8 RGB (H, W, 3)."""
        return np.asarray(self.array("frames")[self._index(t)])

    def iter_frames(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Frames ``start..stop-1`` one at a time, each uint8 (H, W, 3)."""
        for t in range(start, self.num_frames if stop is None else stop):
            yield self.frame(t)

    def annotation(self, t: int) -> np.ndarray:
        """The manual annotation of frame ``t`` as uint8 (H, W); raises unless it is annotated.

        Training code reads labels only through this method, so it can never see the
        evaluation-only ground truth of other frames.
        """
        t = self._index(t)
        if not self.annotated[t]:
            raise NotAnnotatedError(
                f"frame {t} ({self.frame_names[t]}) of sequence {self.id!r} is not an annotated frame"
            )
        return np.asarray(self.array("gt")[t])

    def ground_truth(self, t: int) -> np.ndarray:
        """Stored label of frame ``t`` for evaluation, uint8 (H, W); ignore_index where absent."""
        return np.asarray(self.array("gt")[self._index(t)])

    def to_dask(self, name: str = "frames") -> Any:
        """A lazy dask array over ``name`` with the store's chunking."""
        import dask.array as da

        return da.from_zarr(self.array(name))

    def _index(self, t: int) -> int:
        t = int(t)
        if not 0 <= t < self.num_frames:
            raise IndexError(f"frame {t} is out of range for sequence {self.id!r} of {self.num_frames} frames")
        return t


class FrameArrayWriter:
    """Appends per-frame items to one array of a sequence, writing whole shards at a time.

    Each item is one chunk ``(1, *item_shape)``; when the array is sharded, items are buffered
    until a shard is full, so no shard is ever read back and rewritten. The array grows when more
    items arrive than announced and is trimmed to the real count by :meth:`close`.
    """

    def __init__(
        self,
        group: zarr.Group,
        name: str,
        item_shape: tuple[int, ...],
        dtype: str,
        expected: int,
        layout: StoreLayout,
        fill_value: Any,
        dimension_names: tuple[str, ...],
    ) -> None:
        expected = max(int(expected), 1)
        shard = layout.shard_length(expected)
        self.step = shard or 1
        self.count = 0
        self._buf: list[np.ndarray] = []
        self.array = group.create_array(
            name, shape=(expected, *item_shape), chunks=(1, *item_shape),
            shards=(shard, *item_shape) if shard else None, dtype=dtype,
            compressors=layout.codec(), fill_value=fill_value, dimension_names=dimension_names,
            overwrite=True,
        )

    def append(self, item: np.ndarray) -> None:
        self._buf.append(np.ascontiguousarray(item))
        self.count += 1
        if len(self._buf) == self.step:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        start = self.count - len(self._buf)
        if self.count > self.array.shape[0]:
            self.array.resize((max(self.count, 2 * self.array.shape[0]), *self.array.shape[1:]))
        if len(self._buf) == 1:
            self.array[start] = self._buf[0]
        else:
            self.array[start:self.count] = np.stack(self._buf)
        self._buf.clear()

    def close(self) -> int:
        """Flush what is buffered and trim the array to the items written; returns the count."""
        self._flush()
        if self.array.shape[0] != self.count and self.count > 0:
            self.array.resize((self.count, *self.array.shape[1:]))
        return self.count

    def discard(self) -> None:
        self._buf.clear()


class SequenceWriter:
    """Writes one sequence frame by frame, in order, then marks it complete.

    Use as a context manager: if the body raises (or ``finish`` is never reached), the partial
    sequence is deleted. Extra per-frame arrays (exact flow, say) can be added with
    :meth:`extra_array` and are written in the same pass.

    Example:
        >>> with store.new_sequence("drive-01", expected_frames=3, source="x", fps=10) as w:
        ...     for name, rgb, label in items:
        ...         w.write(name, rgb, label)
        ...     w.finish(annotated=np.array([True, False, False]))
    """

    def __init__(
        self,
        store: SequenceStore,
        seq_id: str,
        expected_frames: int,
        source: str,
        fps: float | None,
        layout: StoreLayout,
    ) -> None:
        self.store = store
        self.id = seq_id
        self.layout = layout
        self.source_fingerprint: str | None = None
        self.expected = max(int(expected_frames), 1)
        self.group = store._sequences.create_group(seq_id, overwrite=True)
        self.group.attrs.update(
            {"source": source, "fps": fps, "stages": {}, "written_by": f"autolabel {autolabel.__version__}"}
        )
        self.names: list[str] = []
        self.has_gt: list[bool] = []
        self._frames: FrameArrayWriter | None = None
        self._gt: FrameArrayWriter | None = None
        self._shape: tuple[int, int] | None = None
        self._hash = hashlib.blake2b(digest_size=16)
        self._finished = False

    def __enter__(self) -> SequenceWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None or not self._finished:
            self.abort()

    def extra_array(self, name: str, item_shape: tuple[int, ...], dtype: str, expected: int,
                    dimension_names: tuple[str, ...], fill_value: Any = 0) -> FrameArrayWriter:
        """A further per-frame array inside this sequence, deleted with it on abort."""
        return FrameArrayWriter(self.group, name, item_shape, dtype, expected, self.layout,
                                fill_value, dimension_names)

    def write(self, name: str, frame: np.ndarray, label: np.ndarray | None, origin: str = "") -> None:
        """Append one frame.

        Args:
            name: frame name (file stem) kept for export.
            frame: uint8 RGB (H, W, 3); every frame of a sequence has the same size.
            label: uint8 (H, W) class ids with ignore_index, or None when the frame has no label.
            origin: where the frame came from (file path), for error messages.
        """
        if self._finished:
            raise StoreError(f"sequence {self.id!r} is already finished")
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise SizeMismatchError(f"{origin or name}: expected uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
        height, width = frame.shape[:2]
        if self._shape is None:
            self._shape = (height, width)
            self._frames = self.extra_array("frames", (height, width, 3), "uint8", self.expected,
                                            ("T", "H", "W", "C"))
            self._gt = self.extra_array("gt", (height, width), "uint8", self.expected, ("T", "H", "W"),
                                        fill_value=self.store.classes.ignore_index)
        elif self._shape != (height, width):
            h0, w0 = self._shape
            raise SizeMismatchError(
                f"{origin or name}: frame is {width}x{height} but sequence {self.id!r} started with "
                f"{w0}x{h0} frames; all frames of a sequence must have one size"
            )
        if label is not None and label.shape != (height, width):
            raise SizeMismatchError(f"{origin or name}: label shape {label.shape} != frame {(height, width)}")
        assert self._frames is not None and self._gt is not None
        self._hash.update(f"{name}|{height}x{width}|".encode())
        self._hash.update(frame.tobytes())
        self._hash.update(b"L" + label.tobytes() if label is not None else b"-")
        self._frames.append(frame)
        self._gt.append(label if label is not None
                        else np.full((height, width), self.store.classes.ignore_index, dtype=np.uint8))
        self.names.append(name)
        self.has_gt.append(label is not None)

    def finish(self, annotated: SequenceABC[bool] | np.ndarray) -> Sequence:
        """Flush, write the masks and metadata, and mark the sequence complete.

        Args:
            annotated: bool (T,) which frames are manual annotations; each must have a label.
        """
        if not self.names or self._frames is None or self._gt is None:
            raise EmptySequenceError(f"sequence {self.id!r} has no frames")
        num = self._frames.close()
        self._gt.close()
        ann = np.asarray(annotated, dtype=bool)
        has_gt = np.asarray(self.has_gt, dtype=bool)
        if ann.shape != (num,):
            raise StoreError(f"sequence {self.id!r}: annotated mask has shape {ann.shape}, expected ({num},)")
        if (ann & ~has_gt).any():
            raise StoreError(f"sequence {self.id!r}: frames {np.flatnonzero(ann & ~has_gt).tolist()} "
                             "are marked annotated but have no label")
        for name, values in (("annotated", ann), ("has_gt", has_gt)):
            arr = self.group.create_array(name, shape=(num,), chunks=(num,), dtype="bool",
                                          fill_value=False, dimension_names=("T",))
            arr[:] = values
        self._hash.update(b"annotated" + ann.tobytes())
        self._hash.update("|".join(self.store.classes.names).encode())
        height, width = self._shape or (0, 0)
        # metadata and the ingest stage go in one final write: only now is the sequence visible
        self.store.mark_stage_done(
            self.id, INGEST,
            {"frames": num, "annotated": int(ann.sum()), "ground_truth": int(has_gt.sum())},
            extra_attrs={
                "num_frames": num,
                "size": [width, height],
                "frame_names": self.names,
                "content_hash": self._hash.hexdigest(),
                "source_fingerprint": self.source_fingerprint,
                "shard_frames": self._frames.step if self._frames.step > 1 else None,
            },
        )
        self._finished = True
        return self.store.sequence(self.id)

    def abort(self) -> None:
        """Delete the partial sequence (nothing half-written stays behind)."""
        if not self._finished:
            for w in (self._frames, self._gt):
                if w is not None:
                    w.discard()
            try:
                self.store.delete_sequence(self.id)
            except Exception:  # noqa: BLE001 - best effort; an incomplete group stays invisible
                pass
