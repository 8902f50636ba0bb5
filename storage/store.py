"""The Zarr v3 sequence store (DESIGN.md section 3).

Layout::

    <store>/                          attrs: classes, palette, ignore_index, schema_version
      sequences/<seq_id>/             attrs: source, fps, size, frame_names, content_hash, stages
        frames     uint8 (T, H, W, 3) one frame per chunk; shards of ``shard_frames`` when long
        gt         uint8 (T, H, W)    labels (annotations and evaluation-only ground truth);
                                      ignore_index where a frame has none
        annotated  bool  (T,)         frames whose label is a manual annotation
        has_gt     bool  (T,)         frames that carry any label in ``gt``

Every stage (ingest included) writes its arrays into a fresh *version* group, e.g.
``results/warp-refine/v-1764431000-3f2a9c/labels``, while holding the lease on that stage
(:mod:`storage.leases`: one writer per sequence stage), and publishes it with one metadata write:
the stage's record in the sequence's ``zarr.json`` (``stages``) names the version (``at``).
Readers resolve array names (``results/warp-refine/labels``) through those records
(:meth:`Sequence.array`), so they never see a half-written result, and a write that fails or is
killed leaves the previous result in place. Replaced versions are deleted
``LeaseSettings.keep_superseded_s`` after they were replaced, so a reader that is still reading
one is not cut off; versions left by killed runs go the same way.

A sequence becomes visible only when its ``ingest`` stage is published. Re-ingesting a changed
drive writes the new frames beside the old ones and swaps them in (dropping the old results) in
that one metadata write; until then the old sequence and its results stay as they were.

Every update of a sequence's metadata re-reads it under the short ``_meta`` lease, so two runs
publishing different stages at once never lose each other's records.

Frames and labels are read lazily, one chunk per frame; nothing loads a whole sequence.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as SequenceABC
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from typing import Any, Literal

import fsspec
import numpy as np
import zarr
from autolabel.storage.classes import ClassSet
from autolabel.storage.ids import validate_sequence_id
from autolabel.storage.leases import Lease, LeaseSettings
from autolabel.storage.stages import INGEST
from pydantic import BaseModel, Field
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

import autolabel
from autolabel.errors import (
    AutolabelError,
    ClassSetMismatchError,
    EmptySequenceError,
    InputDataError,
    IntegrityError,
    LabelValueError,
    NotAnnotatedError,
    SchemaVersionError,
    SequenceNotFoundError,
    SizeMismatchError,
    StoreError,
    StoreNotFoundError,
    StoreWriteError,
)

META = "_meta"  # lease held while a sequence's zarr.json is read, changed and written
SEGMENTED = "segmented"  # sequence attribute: stage -> shared version segment jobs write (storage.segmented)

SCHEMA_VERSION = 1

# every chunk is written, even one that equals the fill value (an unlabelled frame's ground truth,
# zero flow): a chunk that is missing is then always a loss, which `autolabel verify` reports
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


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


def new_version_path(prefix: str) -> str:
    """A fresh version group path under ``prefix`` (``data`` for the ingest stage)."""
    return f"{prefix or 'data'}/v-{int(time.time())}-{secrets.token_hex(4)}"


def _version_created(name: str) -> float:
    try:
        return float(name.split("-")[1])
    except (IndexError, ValueError):
        return 0.0


def resolve_array_path(stages: dict[str, dict[str, Any]], name: str) -> str:
    """Where the array ``name`` of a published stage lives, e.g. ``results/m/labels`` -> ``results/m/v-../labels``.

    The record whose ``prefix`` is the longest path prefix of ``name`` wins (the ingest record's
    prefix is empty). Records without ``at`` (stores written before versions) keep ``name``.
    """
    best: tuple[int, str] | None = None
    for record in stages.values():
        at, prefix = record.get("at"), record.get("prefix")
        if at is None or prefix is None:
            continue
        if prefix == "" or name == prefix or name.startswith(prefix + "/"):
            if best is None or len(prefix) > best[0]:
                rest = name[len(prefix):].lstrip("/")
                best = (len(prefix), f"{at}/{rest}" if rest else at)
    return best[1] if best else name


class _ThreadLeases:
    """Per-process, per-thread reentrancy for leases: a thread that holds a lease may take it again."""

    _locks: dict[tuple[str, str, str], threading.RLock] = {}
    _held: dict[tuple[str, str, str], tuple[Lease, int]] = {}
    _guard = threading.Lock()

    @classmethod
    def lock(cls, key: tuple[str, str, str]) -> threading.RLock:
        with cls._guard:
            return cls._locks.setdefault(key, threading.RLock())


def _open_group(url: str, mode: Literal["r", "r+", "a"]) -> zarr.Group:
    """The root group at ``url``, with an error that says what is wrong and what to do otherwise."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isfile(path):
        raise StoreError(f"store path {url!r} is a file, not a store folder; pass the store's folder "
                         "(or a new path to create one)")
    try:
        return zarr.open_group(url, mode=mode, zarr_format=3)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreNotFoundError(
            f"no autolabel store at {url!r}; create one with `autolabel ingest ... --store {url}` "
            "or `autolabel synth`"
        ) from exc
    except PermissionError as exc:
        raise StoreWriteError(f"cannot {'read' if mode == 'r' else 'write'} store {url!r}: permission denied "
                              f"({exc.filename or path}); fix its permissions or use another --store") from exc
    except NotADirectoryError as exc:
        raise StoreError(f"store {url!r}: {exc.filename or path} is a file where a folder should be") from exc
    except (ValueError, TypeError) as exc:  # zarr.json that is not JSON or not Zarr metadata
        raise IntegrityError(f"store {url!r} has a corrupt root zarr.json ({type(exc).__name__}: {exc}); "
                             "restore it from a backup or ingest into a new store") from exc


class SequenceStore:
    """One Zarr store holding the sequences of a dataset, all sharing one class set.

    Open an existing store with :meth:`open`, or create/extend one with :meth:`create`.
    ``url`` is a local path or an fsspec URL (``memory://``, ``s3://`` ...).
    """

    def __init__(self, url: str, root: zarr.Group, classes: ClassSet) -> None:
        self.url = url
        self.root = root
        self.classes = classes
        self.leases = LeaseSettings()
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
        """Names of the groups under ``sequences/`` (listed without reading their metadata)."""
        if "sequences" not in self.root:
            return []

        async def names() -> list[str]:
            return [k async for k in self.root.store.list_dir("sequences")]

        return sorted(n for n in sync(names()) if n != "zarr.json" and "." != n[:1])

    def _group(self, seq_id: str) -> zarr.Group | None:
        """The group of ``seq_id`` (complete or not), or None; one metadata read.

        Raises IntegrityError when its zarr.json is unreadable.
        """
        try:
            node = self._sequences[validate_sequence_id(seq_id)]
        except KeyError:
            return None
        except (ValueError, TypeError) as exc:
            raise IntegrityError(
                f"sequence {seq_id!r} in {self.url!r} has a corrupt zarr.json ({type(exc).__name__}: {exc}); "
                f"remove its folder (sequences/{seq_id} in the store) and ingest it again"
            ) from exc
        return node if isinstance(node, zarr.Group) else None

    def _is_complete(self, seq_id: str, group: zarr.Group | None = None) -> bool:
        group = group if group is not None else self._group(seq_id)
        return group is not None and INGEST in group.attrs.get("stages", {})

    def bad_groups(self) -> dict[str, str]:
        """Groups under ``sequences/`` that cannot be used, with why: a name that is not a valid id or
        unreadable metadata. They are listed by ``info`` and ``verify`` and skipped by everything else."""
        bad = {}
        for name in self._all_ids():
            try:
                self._group(name)
            except AutolabelError as exc:
                bad[name] = str(exc)
        return bad

    def _usable_ids(self) -> list[tuple[str, bool]]:
        out = []
        for name in self._all_ids():
            try:
                out.append((name, self._is_complete(name)))
            except AutolabelError:
                continue
        return out

    def sequence_ids(self) -> list[str]:
        """Ids of the complete sequences (fully ingested), sorted; bad groups are skipped."""
        return [s for s, complete in self._usable_ids() if complete]

    def incomplete_ids(self) -> list[str]:
        """Ids of sequences whose ingest was interrupted; the next ingest rewrites them."""
        return [s for s, complete in self._usable_ids() if not complete]

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

    # --- leases, publishing, metadata ---------------------------------------------------------

    @contextmanager
    def lease(self, seq_id: str, stage: str, settings: LeaseSettings | None = None,
              on_wait: Callable[[str], None] | None = None) -> Iterator[Lease]:
        """Hold the lease on ``stage`` of ``seq_id`` (reentrant within a thread); waits for other runs."""
        if self.root.read_only:
            raise StoreError(f"store {self.url!r} is open read-only; open it with mode='r+' to write stages")
        key = (self.url, validate_sequence_id(seq_id), stage)
        lock = _ThreadLeases.lock(key)
        settings = settings or self.leases
        if not lock.acquire(blocking=settings.wait_s > 0, timeout=settings.wait_s if settings.wait_s > 0 else -1):
            raise StoreError(f"another thread of this process writes stage {stage!r} of {seq_id!r}; gave up waiting")
        try:
            held = _ThreadLeases._held.get(key)
            if held is not None:
                _ThreadLeases._held[key] = (held[0], held[1] + 1)
                try:
                    yield held[0]
                finally:
                    lease, depth = _ThreadLeases._held[key]
                    _ThreadLeases._held[key] = (lease, depth - 1)
                return
            lease = Lease(self.url, seq_id, stage, settings, on_wait).acquire()
            _ThreadLeases._held[key] = (lease, 1)
            try:
                yield lease
            finally:
                del _ThreadLeases._held[key]
                lease.release()
        finally:
            lock.release()

    def _lease_of(self, seq_id: str, stage: str) -> Lease:
        """The lease this thread holds on ``stage`` of ``seq_id`` (inside :meth:`lease`)."""
        held = _ThreadLeases._held.get((self.url, seq_id, stage))
        if held is None:
            raise StoreError(f"internal: no lease held on {stage!r} of {seq_id!r}")
        return held[0]

    def update_sequence(self, seq_id: str, change: Callable[[dict[str, Any]], dict[str, Any]],
                        create: bool = False) -> dict[str, Any]:
        """Re-read the attributes of ``seq_id`` under the ``_meta`` lease, apply ``change``, write them.

        ``change`` gets a copy of the current attributes and returns the complete new set, written
        in one atomic metadata write. ``create`` makes the group when it does not exist yet.
        """
        meta = self.leases.model_copy(update={"ttl_s": 30.0, "poll_s": 0.02})
        with self.lease(seq_id, META, meta):
            group = self._group(seq_id)
            if group is None:
                if not create:
                    raise SequenceNotFoundError(f"store {self.url!r} has no sequence {seq_id!r}")
                group = self._sequences.create_group(seq_id)
            attrs = change(dict(group.attrs.asdict()))
            group.attrs.put(attrs)
            return attrs

    def mark_stage_done(self, seq_id: str, stage: str, info: dict[str, Any] | None = None,
                        extra_attrs: dict[str, Any] | None = None, only: bool = False) -> None:
        """Record that ``stage`` finished for ``seq_id``; call only after all its chunks exist.

        ``extra_attrs`` are written in the same metadata update (one atomic write of zarr.json);
        ``only`` drops every other stage's record (a replaced sequence's old results).
        """
        record = {"finished_at": time.time(), "code_version": autolabel.__version__, **(info or {})}

        def change(attrs: dict[str, Any]) -> dict[str, Any]:
            stages = {} if only else dict(attrs.get("stages", {}))
            stages[stage] = record
            return {**attrs, **(extra_attrs or {}), "stages": stages}

        self.update_sequence(seq_id, change)

    def drop_stages(self, seq_id: str, stages: list[str]) -> None:
        """Forget ``stages`` of ``seq_id`` (damaged results), so the next run recomputes them."""
        gone: list[str] = []

        def change(attrs: dict[str, Any]) -> dict[str, Any]:
            records = dict(attrs.get("stages", {}))
            gone.extend(records[s]["at"] for s in stages if records.get(s, {}).get("at"))
            return {**attrs, "stages": {k: v for k, v in records.items() if k not in stages}}

        self.update_sequence(seq_id, change)
        self._supersede(seq_id, gone)

    @contextmanager
    def writing(self, seq_id: str, stage: str, prefix: str | None = None) -> Iterator[StageOutput]:
        """Write a new version of ``stage`` of ``seq_id``: holds its lease, yields a :class:`StageOutput`.

        Check whether the stage is current *inside* the block (another run may just have published
        it). Leaving the block without :meth:`StageOutput.publish` deletes what was written.
        """
        with self.lease(seq_id, stage) as lease:
            out = StageOutput(self, seq_id, stage, stage if prefix is None else prefix, lease)
            try:
                yield out
            finally:
                if not out.published:
                    out.discard()

    def collect_garbage(self, seq_id: str, now: float | None = None) -> list[str]:
        """Delete the version groups of ``seq_id`` that no record names, once their grace time passed.

        A version is kept ``keep_superseded_s`` after it was replaced (or created, for one a killed
        run left), so readers and writers still using it are not cut off. Returns the deleted paths.
        """
        group = self._group(seq_id)
        if group is None:
            return []
        now = time.time() if now is None else now
        used = {r.get("at") for r in group.attrs.get("stages", {}).values()}
        used |= {r.get("at") for r in group.attrs.get(SEGMENTED, {}).values()}  # being written by segments
        deleted = []
        for path, node in _version_groups(group):
            if path in used:
                continue
            since = node.attrs.get("superseded_at") or _version_created(path.rsplit("/", 1)[-1])
            if now - since > self.leases.keep_superseded_s:
                parent, name = path.rsplit("/", 1)
                try:
                    del group[parent][name]
                    deleted.append(path)
                except (KeyError, FileNotFoundError):
                    pass
        return deleted

    def _supersede(self, seq_id: str, paths: list[str]) -> None:
        group = self._group(seq_id)
        for path in paths:
            try:
                group[path].attrs["superseded_at"] = time.time()  # type: ignore[index]
            except (KeyError, TypeError):
                pass

    # --- writing sequences ------------------------------------------------------------------------

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
        """Start writing (a new version of) a sequence; use the writer as a context manager.

        A complete sequence with this id stays readable, with its results, until the new one is
        finished; :meth:`SequenceWriter.finish` swaps it in and drops the old results. The writer
        holds the ``ingest`` lease of ``seq_id`` from here until it finishes or aborts.
        ``source_fingerprint`` (names, sizes and times of the source files) lets a later ingest
        notice that the source changed.
        """
        validate_sequence_id(seq_id)
        lease = self.lease(seq_id, INGEST)
        lease.__enter__()
        try:
            writer = SequenceWriter(self, seq_id, expected_frames, source, fps, layout or StoreLayout())
        except BaseException:
            lease.__exit__(None, None, None)
            raise
        writer.source_fingerprint = source_fingerprint
        writer._lease = lease
        return writer

    def delete_sequence(self, seq_id: str) -> None:
        with self.lease(seq_id, INGEST):
            if self._group(seq_id) is not None:
                del self._sequences[seq_id]

    def add_keyframes(self, seq_id: str, labels: dict[int, np.ndarray], source: str = "") -> list[int]:
        """Make frames of ``seq_id`` keyframes with these annotations (uint8 (H, W) each), atomically.

        Keyframes added earlier are kept (a frame given again takes its new label). The next
        ``autolabel label`` relabels only the frames whose labels depend on the changed keyframes.
        Returns every added keyframe, sorted. ``source`` says where they came from (a CVAT export).
        """
        from autolabel.storage.stages import KEYFRAMES

        seq = self.sequence(seq_id)
        classes = self.classes
        shape = (seq.height, seq.width)
        for t, label in labels.items():
            if not 0 <= int(t) < seq.num_frames:
                raise InputDataError(f"sequence {seq_id!r} has {seq.num_frames} frames; no frame {t} to annotate")
            if label.shape != shape:
                raise InputDataError(f"annotation of frame {t} ({seq.frame_names[int(t)]}) of {seq_id!r} is "
                                     f"{label.shape[1]}x{label.shape[0]}, the sequence is {shape[1]}x{shape[0]}")
            bad = np.setdiff1d(np.unique(label), [*range(classes.num_classes), classes.ignore_index])
            if len(bad):
                raise LabelValueError(f"annotation of frame {t} of {seq_id!r} holds values {bad.tolist()} that are "
                                     f"no class of the store ({classes.num_classes} classes)")
        with self.writing(seq_id, KEYFRAMES) as out:
            seq = self.writable_sequence(seq_id)
            merged = {t: seq.annotation(t) for t in seq.added_keyframes}
            merged.update({int(t): np.asarray(v, dtype=np.uint8) for t, v in labels.items()})
            frames = sorted(merged)
            digest = hashlib.sha256()
            for t in frames:
                digest.update(int(t).to_bytes(8, "little") + merged[t].tobytes())
            out.group.create_array("frames", data=np.asarray(frames, dtype=np.int64), config=WRITE_EVERY_CHUNK)
            stacked = out.group.create_array("labels", shape=(len(frames), *shape), chunks=(1, *shape),
                                             dtype="uint8", fill_value=classes.ignore_index,
                                             config=WRITE_EVERY_CHUNK)
            for i, t in enumerate(frames):
                stacked[i] = merged[t]
            out.publish({"fingerprint": digest.hexdigest(), "frames": frames, "source": source})
        return frames

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


def _version_groups(group: zarr.Group, depth: int = 3, prefix: str = "") -> Iterator[tuple[str, zarr.Group]]:
    """Every ``v-*`` version group under a sequence group (``data/v-..``, ``results/m/v-..``)."""
    for name, child in group.groups():
        path = f"{prefix}{name}"
        if name.startswith("v-"):
            yield path, child
        elif depth > 1:
            yield from _version_groups(child, depth - 1, path + "/")


class StageOutput:
    """A new version of one stage of one sequence, written under its lease and published at once.

    Arrays go into :attr:`group` (named relative to the stage: ``labels``, not
    ``results/m/labels``). :meth:`publish` checks the lease is still ours and writes the stage
    record pointing at this version in one metadata write; the version it replaces is marked
    superseded and deleted later by :meth:`SequenceStore.collect_garbage`.
    """

    def __init__(self, store: SequenceStore, seq_id: str, stage: str, prefix: str, lease: Lease) -> None:
        self.store, self.seq_id, self.stage, self.prefix, self.lease = store, seq_id, stage, prefix, lease
        self.path = new_version_path(prefix)
        self.published = False
        self._group: zarr.Group | None = None

    @property
    def group(self) -> zarr.Group:
        """The version group (created on first use)."""
        if self._group is None:
            seq_group = self.store._group(self.seq_id)
            if seq_group is None:
                raise SequenceNotFoundError(f"store {self.store.url!r} has no sequence {self.seq_id!r}")
            self._group = seq_group.require_group(self.path)
        return self._group

    def publish(self, info: dict[str, Any] | None = None, extra_attrs: dict[str, Any] | None = None,
                only: bool = False, also: dict[str, dict[str, Any]] | None = None) -> None:
        """Make this version the stage's result (one metadata write); see :meth:`SequenceStore.mark_stage_done`.

        ``also``: records of further stages published in the same write.
        """
        self.lease.check()
        previous: list[str] = []

        def change(attrs: dict[str, Any]) -> dict[str, Any]:
            stages = dict(attrs.get("stages", {}))
            replaced = stages.values() if only else [stages.get(self.stage, {})]
            previous.extend(r["at"] for r in replaced if r.get("at"))
            stages = {} if only else stages
            stages[self.stage] = {"finished_at": time.time(), "code_version": autolabel.__version__,
                                  **(info or {}), "at": self.path if self._group is not None else None,
                                  "prefix": self.prefix}
            for name, record in (also or {}).items():
                stages[name] = {"finished_at": time.time(), "code_version": autolabel.__version__, **record}
            return {**attrs, **(extra_attrs or {}), "stages": stages}

        self.store.update_sequence(self.seq_id, change)
        self.published = True
        self.store._supersede(self.seq_id, previous)
        self.store.collect_garbage(self.seq_id)

    def discard(self) -> None:
        """Delete the unpublished version (best effort: a leftover is collected later), once the
        writes its writers still have in flight are done (none lands after the deletion)."""
        if self._group is None:
            return
        wait_for_writes(self._group.path)
        try:
            parent, name = self.path.rsplit("/", 1)
            seq_group = self.store._group(self.seq_id)
            if seq_group is not None:
                del seq_group[parent][name]
        except Exception:  # noqa: BLE001 - storage may be what failed; garbage collection retries
            pass


class Sequence:
    """One complete sequence. Arrays are opened lazily; frames are read one chunk at a time."""

    def __init__(self, store: SequenceStore, seq_id: str, group: zarr.Group) -> None:
        self.store = store
        self.id = seq_id
        self.group = group
        self.attrs: dict[str, Any] = group.attrs.asdict()
        self._annotated: np.ndarray | None = None
        self._has_gt: np.ndarray | None = None
        self._added: dict[int, int] | None = None

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
        """Hash of frames, labels and the annotation choice (cache keys, change detection).

        Keyframes added after ingest (:meth:`SequenceStore.add_keyframes`) are part of it.
        """
        added = self.keyframes_fingerprint
        return str(self.attrs["content_hash"]) + (f"+k{added[:16]}" if added else "")

    @property
    def keyframes_fingerprint(self) -> str | None:
        """Hash of the keyframes added after ingest (None when there are none)."""
        return self.stages.get("keyframes", {}).get("fingerprint")

    @property
    def added_keyframes(self) -> dict[int, int]:
        """Frames annotated after ingest -> their row in ``keyframes/labels``."""
        if self._added is None:
            self._added = {}
            if self.keyframes_fingerprint:
                frames = np.asarray(self.array("keyframes/frames")[:])
                self._added = {int(t): i for i, t in enumerate(frames)}
        return self._added

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
        """A named array of a published stage (``frames``, ``gt``, ``results/warp-refine/labels``...)."""
        path = resolve_array_path(self.stages, name)
        try:
            node = self.group[path]
        except KeyError:
            raise IntegrityError(
                f"sequence {self.id!r} in {self.store.url!r} has no array {name!r} ({path}) although its "
                f"stage is recorded as done; run `autolabel verify {self.store.url}` and relabel the sequence"
            ) from None
        if not isinstance(node, zarr.Array):
            raise IntegrityError(f"sequence {self.id!r}: {path} is a group, not an array")
        return node

    @property
    def annotated(self) -> np.ndarray:
        """bool (T,): frames whose label is a manual annotation (propagation sources)."""
        if self._annotated is None:
            annotated = np.asarray(self.array("annotated")[:], dtype=bool)
            annotated[list(self.added_keyframes)] = True
            self._annotated = annotated
        return self._annotated

    @property
    def has_gt(self) -> np.ndarray:
        """bool (T,): frames with any stored label (annotation or evaluation ground truth)."""
        if self._has_gt is None:
            has_gt = np.asarray(self.array("has_gt")[:], dtype=bool)
            has_gt[list(self.added_keyframes)] = True
            self._has_gt = has_gt
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
        if t in self.added_keyframes:
            return np.asarray(self.array("keyframes/labels")[self.added_keyframes[t]])
        return np.asarray(self.array("gt")[t])

    def ground_truth(self, t: int) -> np.ndarray:
        """Stored label of frame ``t`` for evaluation, uint8 (H, W); ignore_index where absent.

        A keyframe added after ingest without ground truth of its own gives its annotation.
        """
        t = self._index(t)
        if t in self.added_keyframes and not bool(self.array("has_gt")[t]):
            return self.annotation(t)
        return np.asarray(self.array("gt")[t])

    def ground_truths(self, start: int, stop: int) -> np.ndarray:
        """:meth:`ground_truth` of frames ``start..stop-1`` in one read, uint8 (stop - start, H, W)."""
        if not 0 <= start < stop <= self.num_frames:
            raise IndexError(f"frames {start}..{stop} are out of range for sequence {self.id!r} of "
                             f"{self.num_frames} frames")
        block = np.asarray(self.array("gt")[start:stop])
        for t in self.added_keyframes:
            if start <= t < stop and not bool(self.array("has_gt")[t]):
                block[t - start] = self.annotation(t)
        return block

    def to_dask(self, name: str = "frames") -> Any:
        """A lazy dask array over ``name`` with the store's chunking."""
        import dask.array as da

        return da.from_zarr(self.array(name))

    def _index(self, t: int) -> int:
        t = int(t)
        if not 0 <= t < self.num_frames:
            raise IndexError(f"frame {t} is out of range for sequence {self.id!r} of {self.num_frames} frames")
        return t


_WRITES_IN_FLIGHT: dict[Future, str] = {}  # writes started on writer threads -> the array's path
_WRITES_LOCK = threading.Lock()


def _track_write(future: Future, path: str) -> None:
    with _WRITES_LOCK:
        _WRITES_IN_FLIGHT[future] = path

    def done(f: Future) -> None:
        with _WRITES_LOCK:
            _WRITES_IN_FLIGHT.pop(f, None)

    future.add_done_callback(done)


def wait_for_writes(path: str) -> None:
    """Wait until no writer thread of this process is writing an array at or under ``path``."""
    prefix = path.rstrip("/") + "/"
    with _WRITES_LOCK:
        pending = [f for f, p in _WRITES_IN_FLIGHT.items() if p == path or p.startswith(prefix)]
    futures_wait(pending)


class FrameArrayWriter:
    """Appends per-frame items to one array of a sequence, writing whole shards at a time.

    Each item is one chunk ``(1, *item_shape)``; when the array is sharded, items are buffered
    until a shard is full, so no shard is ever read back and rewritten. The array grows when more
    items arrive than announced and is trimmed to the real count by :meth:`close`.

    A full shard is compressed and written on a writer thread while the caller computes the next
    items (one write in flight: the next waits for it); a write's error is raised by the next
    append that fills a shard, or by :meth:`close`, which returns only once everything is written.
    A stage output that is discarded (the stage failed) first waits for its writes in flight.
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
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self.array = group.create_array(
            name, shape=(expected, *item_shape), chunks=(1, *item_shape),
            shards=(shard, *item_shape) if shard else None, dtype=dtype,
            compressors=layout.codec(), fill_value=fill_value, dimension_names=dimension_names,
            overwrite=True, config=WRITE_EVERY_CHUNK,
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
        block = np.stack(self._buf)
        self._buf = []
        self._settle()  # the write before this one is done (and raised if it failed)
        if self.count > self.array.shape[0]:
            self.array.resize((max(self.count, 2 * self.array.shape[0]), *self.array.shape[1:]))
        self._write_behind(start, block)

    def _write_behind(self, start: int, block: np.ndarray) -> None:
        """Start writing ``block`` (N, *item_shape) at item ``start`` on the writer thread."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autolabel-write")
        self._pending = self._writer.submit(self._write, start, block)
        _track_write(self._pending, self.array.path)

    def _write(self, start: int, block: np.ndarray) -> None:
        self.array[start:start + len(block)] = block

    def _settle(self) -> None:
        """Wait for the write in flight; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _stop_writer(self) -> None:
        try:
            self._settle()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def close(self) -> int:
        """Flush what is buffered, wait for every write and trim the array to the items written;
        returns the count."""
        try:
            self._flush()
        finally:
            self._stop_writer()
        if self.array.shape[0] != self.count:  # to 0 too: an unwritten row would read as a missing chunk
            self.array.resize((self.count, *self.array.shape[1:]))
        return self.count

    def discard(self) -> None:
        """Drop what is buffered; a write in flight is waited for, its error ignored."""
        self._buf.clear()
        try:
            self._stop_writer()
        except Exception:  # noqa: BLE001 - the output is being thrown away
            pass


class RangeWriter(FrameArrayWriter):
    """Writes per-frame items ``start, start + 1, ...`` into an existing array, a whole shard at a time.

    ``start`` must be a shard boundary, so a writer of one frame range never touches a shard of
    another range (segment jobs, ``storage.segmented``). Items are ``(1, *item_shape)`` chunks; the
    array keeps its shape.
    """

    def __init__(self, array: zarr.Array, start: int) -> None:  # noqa: D107 - no new array is made
        self.step = array.shards[0] if array.shards else 1
        if start % self.step:
            raise StoreError(f"{array.path}: a range writer must start on a shard boundary (multiple of "
                             f"{self.step}), not at {start}")
        # a reopened array forgets the writer's config: every chunk is stored, fill-valued ones too
        self.array, self.start, self.count = array.with_config(WRITE_EVERY_CHUNK), start, 0
        self._buf: list[np.ndarray] = []
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def _flush(self) -> None:
        if self._buf:
            end = self.start + self.count
            block = np.stack(self._buf)
            self._buf = []
            self._settle()
            self._write_behind(end - len(block), block)

    def close(self) -> int:
        """Write what is buffered and wait for every write; returns the items written."""
        try:
            self._flush()
        finally:
            self._stop_writer()
        return self.count


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
        self.source, self.fps = source, fps
        self.source_fingerprint: str | None = None
        self.expected = max(int(expected_frames), 1)
        self._lease: Any = None  # the ingest lease's context manager, set by SequenceStore.new_sequence
        if store._group(seq_id) is None:
            store.update_sequence(seq_id, lambda attrs: {**attrs, "source": source, "stages": {}}, create=True)
        lease = store._lease_of(seq_id, INGEST)
        self._output = StageOutput(store, seq_id, INGEST, "", lease)
        self.group = self._output.group
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

    def finish(self, annotated: SequenceABC[bool] | np.ndarray,
               stages: dict[str, dict[str, Any]] | None = None) -> Sequence:
        """Flush, write the masks and metadata, and mark the sequence complete.

        Args:
            annotated: bool (T,) which frames are manual annotations; each must have a label.
            stages: records of further stages written with the frames (``flow/exact``), published
                in the same metadata write; their arrays live in the ingest version.
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
                                          fill_value=False, dimension_names=("T",), config=WRITE_EVERY_CHUNK)
            arr[:] = values
        self._hash.update(b"annotated" + ann.tobytes())
        self._hash.update("|".join(self.store.classes.names).encode())
        height, width = self._shape or (0, 0)
        # metadata and the ingest stage go in one final write: only now is the sequence visible
        # (or, for a replacement, only now do the new frames replace the old ones and their results)
        content_hash = self._hash.hexdigest()
        previous = self.store._group(self.id)
        unchanged = previous is not None and previous.attrs.get("content_hash") == content_hash \
            and self.store._is_complete(self.id, previous)
        self._output.publish(
            {"frames": num, "annotated": int(ann.sum()), "ground_truth": int(has_gt.sum())},
            only=not unchanged,  # the same content keeps its results; changed content drops them
            also=stages,
            extra_attrs={
                "source": self.source,
                "fps": self.fps,
                "written_by": f"autolabel {autolabel.__version__}",
                "num_frames": num,
                "size": [width, height],
                "frame_names": self.names,
                "content_hash": content_hash,
                "source_fingerprint": self.source_fingerprint,
                "shard_frames": self._frames.step if self._frames.step > 1 else None,
            },
        )
        self._finished = True
        self._release()
        return self.store.sequence(self.id)

    def _release(self) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            lease.__exit__(None, None, None)

    def abort(self) -> None:
        """Delete what this writer wrote; a sequence that was complete before stays as it was."""
        try:
            if not self._finished:
                for w in (self._frames, self._gt):
                    if w is not None:
                        w.discard()
                try:
                    if self.store._is_complete(self.id):
                        self._output.discard()
                    else:  # nothing published ever: the whole group goes
                        del self.store._sequences[self.id]
                except Exception:  # noqa: BLE001 - best effort; leftovers are invisible and collected later
                    pass
        finally:
            self._release()
