"""A stage written by several jobs at once: the segments of a long drive (``models.segments``).

Every segment job writes its own frames into one shared *version* of the stage (the same kind of
version group :meth:`SequenceStore.writing` makes), whose arrays are created once, at full length,
by whichever job comes first. Ranges are shard-aligned, so each shard file has one writer. A job
records that its segment is finished in the sequence's metadata (``segmented/<stage>``); the job
that records the last one publishes the version as the stage's result in the same atomic metadata
write. Readers never see a half-written stage: until then the stage record is the previous one
(or absent). A version in progress is kept by garbage collection however long it takes.

The *key* names what is being written (settings, inputs, segment plan): a run with other settings
starts a new version and the old one's late writers fail on :meth:`SegmentedStage.finish` instead
of publishing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zarr

import autolabel
from autolabel.errors import StoreError
from autolabel.storage.store import SEGMENTED, Sequence, SequenceStore, new_version_path


class SegmentedStage:
    """One stage of one sequence being written segment by segment (see the module docstring)."""

    def __init__(self, store: SequenceStore, seq_id: str, stage: str, key: str, record: dict[str, Any]) -> None:
        self.store, self.seq_id, self.stage, self.key = store, seq_id, stage, key
        self.path: str = record["at"]
        self.segments: int = record["segments"]
        self.done: dict[str, Any] = dict(record.get("done", {}))

    @classmethod
    def open(cls, store: SequenceStore, seq_id: str, stage: str, key: str, segments: int,
             create_arrays: Callable[[zarr.Group], None], *,
             published: Callable[[Sequence], bool]) -> SegmentedStage | None:
        """The shared version of ``stage`` for ``key``: joined when it exists, else created; None when
        the stage is already published.

        ``published(seq)`` says whether ``seq``'s stage record already holds what this key writes.
        Callers look before they open, but another job can publish the last segment in between (a
        job whose segment was written by another stage's pass, warp-refine's writing warp-inpaint's,
        finds it so): it is asked again under the stage's lease before a version is created, so no
        orphan version is recorded that no job would ever finish. ``create_arrays(group)`` makes the
        version's (full-length, empty) arrays; it runs once, under the stage's lease, before the
        version is recorded.
        """
        with store.lease(seq_id, stage):
            seq = store.sequence(seq_id)
            record = seq.attrs.get(SEGMENTED, {}).get(stage)
            if record is not None and record.get("key") == key:
                return cls(store, seq_id, stage, key, record)
            if published(seq):
                return None
            path = new_version_path(stage)
            group = store._group(seq_id)
            if group is None:
                raise StoreError(f"store {store.url!r} has no sequence {seq_id!r}")
            create_arrays(group.require_group(path))
            fresh = {"at": path, "key": key, "segments": segments, "done": {}, "created": time.time()}
            replaced: list[str] = []

            def change(attrs: dict[str, Any]) -> dict[str, Any]:
                records = dict(attrs.get(SEGMENTED, {}))
                old = records.get(stage)
                if old is not None and old.get("at"):
                    replaced.append(old["at"])
                records[stage] = fresh
                return {**attrs, SEGMENTED: records}

            store.update_sequence(seq_id, change)
            store._supersede(seq_id, replaced)
            return cls(store, seq_id, stage, key, fresh)

    @property
    def group(self) -> zarr.Group:
        group = self.store._group(self.seq_id)
        if group is None:
            raise StoreError(f"store {self.store.url!r} has no sequence {self.seq_id!r}")
        return group[self.path]  # type: ignore[return-value]

    def is_done(self, index: int) -> bool:
        return str(index) in self.done

    def finish(self, index: int, info: dict[str, Any], combine: Callable[[list[dict[str, Any]]], dict[str, Any]]) \
            -> bool:
        """Record segment ``index`` as written; the last one publishes the stage. Returns whether it did.

        ``combine(infos)`` makes the stage record's information from every segment's ``info`` (in
        segment order). Raises StoreError when another run replaced this version meanwhile.
        """
        published: list[bool] = []
        previous: list[str] = []

        def change(attrs: dict[str, Any]) -> dict[str, Any]:
            records = dict(attrs.get(SEGMENTED, {}))
            record = records.get(self.stage)
            if record is None or record.get("at") != self.path:
                raise StoreError(f"sequence {self.seq_id!r}: the {self.stage} version this segment wrote was "
                                 "replaced or published by another run; label the drive again")
            done = {**record.get("done", {}), str(index): info}
            if len(done) < record["segments"]:
                records[self.stage] = {**record, "done": done}
                return {**attrs, SEGMENTED: records}
            del records[self.stage]
            stages = dict(attrs.get("stages", {}))
            if stages.get(self.stage, {}).get("at"):
                previous.append(stages[self.stage]["at"])
            infos = [done[str(i)] for i in range(record["segments"])]
            stages[self.stage] = {"finished_at": time.time(), "code_version": autolabel.__version__,
                                  **combine(infos), "at": self.path, "prefix": self.stage,
                                  "segments": record["segments"]}
            published.append(True)
            rest = {k: v for k, v in attrs.items() if k != SEGMENTED}
            return {**rest, **({SEGMENTED: records} if records else {}), "stages": stages}

        self.store.update_sequence(self.seq_id, change)
        self.done[str(index)] = info
        if published:
            self.store._supersede(self.seq_id, previous)
            self.store.collect_garbage(self.seq_id)
        return bool(published)


__all__ = ["SegmentedStage"]
