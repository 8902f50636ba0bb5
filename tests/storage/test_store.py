"""The Zarr sequence store: round trip, lazy reads, sharding, stage status, bad input."""

from __future__ import annotations

import multiprocessing
import re
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from autolabel.storage.classes import CAMVID11, DAVIS_BINARY
from autolabel.storage.store import FrameArrayWriter, RangeWriter, SequenceStore, StoreLayout

from autolabel.errors import (
    ClassSetMismatchError,
    InvalidSequenceIdError,
    NotAnnotatedError,
    SchemaVersionError,
    SequenceNotFoundError,
    SizeMismatchError,
    StoreNotFoundError,
)

RNG = np.random.default_rng(0)


def _write(store: SequenceStore, seq_id: str, frames: int, *, h: int = 10, w: int = 14,
           layout: StoreLayout | None = None, labelled_every: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rgb = RNG.integers(0, 256, size=(frames, h, w, 3), dtype=np.uint8)
    labels = RNG.integers(0, store.classes.num_classes, size=(frames, h, w), dtype=np.uint8)
    with store.new_sequence(seq_id, expected_frames=frames, source="test", fps=10.0, layout=layout) as writer:
        for t in range(frames):
            writer.write(f"f{t:03d}", rgb[t], labels[t] if t % labelled_every == 0 else None)
        has = np.arange(frames) % labelled_every == 0
        writer.finish(annotated=has & (np.arange(frames) == 0))
    return rgb, labels


class TestRoundTrip:
    def test_frames_labels_and_metadata_come_back(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        rgb, labels = _write(store, "drive-a", 5, labelled_every=2)
        reopened = SequenceStore.open(store_url)
        assert reopened.classes == CAMVID11
        seq = reopened.sequence("drive-a")
        assert (seq.num_frames, seq.height, seq.width, seq.fps) == (5, 10, 14, 10.0)
        assert seq.frame_names == [f"f{t:03d}" for t in range(5)]
        for t in range(5):
            np.testing.assert_array_equal(seq.frame(t), rgb[t])
        np.testing.assert_array_equal(seq.has_gt, [True, False, True, False, True])
        np.testing.assert_array_equal(seq.annotated, [True, False, False, False, False])
        np.testing.assert_array_equal(seq.ground_truth(2), labels[2])
        assert (seq.ground_truth(1) == CAMVID11.ignore_index).all()
        np.testing.assert_array_equal(seq.annotation(0), labels[0])
        assert seq.stage_done("ingest") and seq.stages["ingest"]["annotated"] == 1

    def test_annotation_of_a_ground_truth_only_frame_is_refused(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        _write(store, "drive-a", 3)
        with pytest.raises(NotAnnotatedError, match="frame 2 .*not an annotated frame"):
            store.sequence("drive-a").annotation(2)

    def test_content_hash_tracks_content(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        frame = np.zeros((4, 4, 3), np.uint8)
        hashes = []
        for value in (0, 0, 1):
            with store.new_sequence("s", expected_frames=1, source="x", fps=None) as w:
                w.write("a", frame + value, None)
                w.finish([False])
            hashes.append(store.sequence("s").content_hash)
        assert hashes[0] == hashes[1] != hashes[2]

    def test_sharded_long_sequence_round_trips_and_is_sharded(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, DAVIS_BINARY)
        layout = StoreLayout(shard_threshold=4, shard_frames=3)
        rgb, labels = _write(store, "long", 11, layout=layout)
        seq = store.sequence("long")
        assert seq.array("frames").shards == (3, 10, 14, 3)
        assert seq.array("frames").chunks == (1, 10, 14, 3)
        np.testing.assert_array_equal(seq.array("frames")[:], rgb)
        np.testing.assert_array_equal(seq.array("gt")[:], labels)

    def test_video_longer_than_announced_grows(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, DAVIS_BINARY)
        with store.new_sequence("v", expected_frames=2, source="x", fps=None) as w:
            for t in range(5):
                w.write(str(t), np.full((4, 4, 3), t, np.uint8), None)
            seq = w.finish(np.zeros(5, bool))
        assert seq.num_frames == 5 and seq.array("frames").shape[0] == 5
        assert seq.frame(4)[0, 0, 0] == 4

    def test_dask_view_is_lazy_and_matches(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        rgb, _ = _write(store, "d", 4)
        arr = store.sequence("d").to_dask("frames")
        assert arr.chunks[0] == (1, 1, 1, 1)
        np.testing.assert_array_equal(arr[2].compute(), rgb[2])


class _RecordingStore(zarr.storage.WrapperStore):
    """Records the key of every read that reaches the underlying store."""

    def __init__(self, store: zarr.abc.store.Store) -> None:
        super().__init__(store)
        self.keys: list[str] = []

    async def get(self, key, prototype, byte_range=None):  # noqa: ANN001, ANN201
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)


class TestLazyReads:
    @pytest.mark.parametrize("sharded", [False, True])
    def test_reading_one_frame_reads_only_its_chunk(self, local_store_url: str, sharded: bool) -> None:
        store = SequenceStore.create(local_store_url, CAMVID11)
        layout = StoreLayout(shard_threshold=4, shard_frames=4) if sharded else None
        _write(store, "lazy", 12, layout=layout)
        recording = _RecordingStore(zarr.storage.LocalStore(local_store_url, read_only=True))
        path = f"sequences/lazy/{store.sequence('lazy').stages['ingest']['at']}/frames"
        frames = zarr.open_group(recording, mode="r")[path]
        recording.keys.clear()
        frames[5]
        # unsharded: the chunk of frame 5; sharded: the shard index plus one chunk of shard 1
        expected = f"{path}/c/1/0/0/0" if sharded else f"{path}/c/5/0/0/0"
        assert set(recording.keys) == {expected}, recording.keys


class TestIncompleteSequences:
    def test_an_aborted_writer_leaves_nothing(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        with pytest.raises(RuntimeError, match="boom"):
            with store.new_sequence("half", expected_frames=4, source="x", fps=None) as w:
                w.write("a", np.zeros((4, 4, 3), np.uint8), None)
                raise RuntimeError("boom")
        assert "half" not in store and store.incomplete_ids() == [] and store.sequence_ids() == []

    def test_a_killed_writer_leaves_an_invisible_incomplete_group(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        _write(store, "done", 2)
        writer = store.new_sequence("killed", expected_frames=4, source="x", fps=None)
        writer.write("a", np.zeros((4, 4, 3), np.uint8), None)  # then the process dies: no finish
        reopened = SequenceStore.open(store_url)
        assert reopened.sequence_ids() == ["done"]
        assert reopened.incomplete_ids() == ["killed"]
        with pytest.raises(SequenceNotFoundError, match="incomplete.*ingest"):
            reopened.sequence("killed")

    def test_stage_marked_only_when_asked(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        _write(store, "s", 2)
        assert not store.sequence("s").stage_done("flow/exact")
        store.mark_stage_done("s", "flow/exact", {"pairs": 1})
        assert store.sequence("s").stages["flow/exact"]["pairs"] == 1


class TestWritesBehind:
    """Full shards are written on a writer thread while the caller goes on; close waits for them."""

    def _writer(self, tmp_path, frames: int = 10) -> FrameArrayWriter:
        group = zarr.open_group(str(tmp_path / "w.zarr"), mode="w")
        return FrameArrayWriter(group, "x", (4, 5), "uint8", frames, StoreLayout(shard_threshold=4, shard_frames=3),
                                0, ("T", "H", "W"))

    @pytest.mark.parametrize("frames", [2, 10])  # unsharded (a write per item) and sharded
    def test_everything_is_written_by_close(self, tmp_path, frames: int) -> None:
        writer = self._writer(tmp_path, frames)
        items = RNG.integers(0, 255, size=(frames + 3, 4, 5), dtype=np.uint8)  # more than announced: grows
        for item in items:
            writer.append(item)
        assert writer.close() == frames + 3
        np.testing.assert_array_equal(writer.array[:], items)
        assert writer._writer is None  # the writer thread ended

    def test_a_failed_write_is_raised_by_close_and_the_thread_ends(self, tmp_path, monkeypatch) -> None:
        writer = self._writer(tmp_path)
        written = []

        def write(start: int, block: np.ndarray) -> None:
            if start >= 3:
                raise OSError("No space left on device")
            written.append(start)

        monkeypatch.setattr(writer, "_write", write)
        for t in range(5):
            writer.append(np.full((4, 5), t, np.uint8))  # frames 0-2: one shard written behind
        with pytest.raises(OSError, match="No space left"):
            writer.close()  # frames 3-4: written at close, which fails
        assert written == [0] and writer._writer is None

    def test_a_failed_write_is_raised_by_the_next_full_shard(self, tmp_path, monkeypatch) -> None:
        writer = self._writer(tmp_path)
        monkeypatch.setattr(writer, "_write", lambda start, block: (_ for _ in ()).throw(OSError("I/O error")))
        for t in range(3):
            writer.append(np.zeros((4, 5), np.uint8))
        with pytest.raises(OSError, match="I/O error"):
            for t in range(3):  # the second shard waits for the first write, which failed
                writer.append(np.zeros((4, 5), np.uint8))
        writer.discard()  # throwing the output away raises nothing and ends the thread
        assert writer._writer is None

    def test_range_writer_writes_its_range_only(self, tmp_path) -> None:
        writer = self._writer(tmp_path, 9)
        for t in range(9):
            writer.append(np.zeros((4, 5), np.uint8))
        writer.close()
        ranged = RangeWriter(writer.array, 3)
        for t in range(4):
            ranged.append(np.full((4, 5), t + 1, np.uint8))
        assert ranged.close() == 4
        assert writer.array[:, 0, 0].tolist() == [0, 0, 0, 1, 2, 3, 4, 0, 0]


class TestStoreErrors:
    def test_missing_store(self, tmp_path) -> None:
        with pytest.raises(StoreNotFoundError, match="no autolabel store"):
            SequenceStore.open(str(tmp_path / "nothing.zarr"))

    def test_other_schema_version(self, store_url: str) -> None:
        SequenceStore.create(store_url, CAMVID11)
        zarr.open_group(store_url, mode="r+").attrs["schema_version"] = 99
        with pytest.raises(SchemaVersionError, match="schema version 99.*reads version 1"):
            SequenceStore.open(store_url)

    def test_zarr_group_that_is_not_a_store(self, store_url: str) -> None:
        zarr.open_group(store_url, mode="w")
        with pytest.raises(StoreNotFoundError, match="not an autolabel store"):
            SequenceStore.open(store_url)

    def test_class_set_mismatch(self, store_url: str) -> None:
        SequenceStore.create(store_url, CAMVID11)
        with pytest.raises(ClassSetMismatchError, match="holds classes"):
            SequenceStore.create(store_url, DAVIS_BINARY)

    @pytest.mark.parametrize("bad", ["../escape", "a/b", "", ".hidden", "x..y", "/abs", "spa ce", "a" * 201])
    def test_sequence_ids_that_could_escape_are_refused(self, store_url: str, bad: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        with pytest.raises(InvalidSequenceIdError, match=re.escape(repr(bad))):
            store.new_sequence(bad, expected_frames=1, source="x", fps=None)

    def test_frame_size_change_inside_a_sequence(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        with pytest.raises(SizeMismatchError, match="frame is 5x4 but sequence 's' started with 4x4"):
            with store.new_sequence("s", expected_frames=2, source="x", fps=None) as w:
                w.write("a", np.zeros((4, 4, 3), np.uint8), None, origin="a.png")
                w.write("b", np.zeros((4, 5, 3), np.uint8), None, origin="b.png")
        assert store.sequence_ids() == [] and store.incomplete_ids() == []

    def test_frame_index_out_of_range(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        _write(store, "s", 2)
        with pytest.raises(IndexError, match="frame 2 is out of range"):
            store.sequence("s").frame(2)


class TestSelectIds:
    def test_globs_and_exact_ids(self) -> None:
        from autolabel.storage.ids import select_ids

        ids = ["dense_0016E5_07959", "train_0001TP_006690", "train_0006R0_f02400"]
        assert select_ids(ids, ["train_*"], "x") == ids[1:]
        assert select_ids(ids, ["dense_0016E5_07959"], "x") == ids[:1]
        assert select_ids(ids, None, "x") == ids

    def test_a_pattern_matching_nothing_is_an_error(self) -> None:
        from autolabel.storage.ids import select_ids

        from autolabel.errors import SelectionError

        with pytest.raises(SelectionError, match=r"store s: no sequence \['val_\*'\]; found 1 sequence,"):
            select_ids(["a"], ["val_*"], "store s")


def _publish(store: SequenceStore, seq_id: str, stage: str, value: int) -> None:
    with store.writing(seq_id, stage) as out:
        out.group.create_array("labels", shape=(3,), dtype="uint8", fill_value=0)[:] = value
        out.publish({"value": value})


def _mark_many(url: str, seq_id: str, worker: int) -> None:
    store = SequenceStore.open(url, mode="r+")
    for i in range(8):
        store.mark_stage_done(seq_id, f"check/{worker}-{i}")


class TestPublish:
    """Stages write a new version and publish it with one metadata write."""

    def test_a_reader_sees_the_old_version_until_publish(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        _write(store, "s", 3)
        _publish(store, "s", "results/m", 1)
        with store.writing("s", "results/m") as out:
            out.group.create_array("labels", shape=(3,), dtype="uint8", fill_value=0)[:] = 2
            assert store.sequence("s").array("results/m/labels")[:].tolist() == [1, 1, 1]
            out.publish({"value": 2})
        assert store.sequence("s").array("results/m/labels")[:].tolist() == [2, 2, 2]

    def test_a_failed_write_keeps_the_previous_result_and_leaves_no_scratch(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        _write(store, "s", 3)
        _publish(store, "s", "results/m", 1)
        record = store.sequence("s").stages["results/m"]
        with pytest.raises(RuntimeError, match="disk on fire"):
            with store.writing("s", "results/m") as out:
                out.group.create_array("labels", shape=(3,), dtype="uint8", fill_value=0)[:] = 9
                raise RuntimeError("disk on fire")
        seq = store.sequence("s")
        assert seq.stages["results/m"] == record and seq.array("results/m/labels")[:].tolist() == [1, 1, 1]
        assert list(seq.group["results/m"].group_keys()) == [record["at"].rsplit("/", 1)[1]]

    def test_a_failed_stage_waits_for_its_writes_in_flight_before_deleting(self, local_store_url: str,
                                                                           monkeypatch) -> None:
        store = SequenceStore.create(local_store_url, CAMVID11)
        _write(store, "s", 3)
        slow_write, finished = FrameArrayWriter._write, []

        def write(self, start: int, block: np.ndarray) -> None:
            time.sleep(0.5)  # still writing when the stage fails
            slow_write(self, start, block)
            finished.append(time.monotonic())

        monkeypatch.setattr(FrameArrayWriter, "_write", write)
        with pytest.raises(RuntimeError, match="frame 1 is corrupt"):
            with store.writing("s", "results/m") as out:
                writer = FrameArrayWriter(out.group, "labels", (10, 14), "uint8", 3, StoreLayout(), 0,
                                          ("T", "H", "W"))
                writer.append(np.ones((10, 14), np.uint8))  # unsharded: written behind at once
                raise RuntimeError("frame 1 is corrupt")
        assert finished  # the write ended before the version was deleted, so no chunk of it came back
        stage_dir = Path(local_store_url) / "s" / "results" / "m"
        assert not stage_dir.exists() or not any(p.is_file() for p in stage_dir.rglob("*"))

    def test_superseded_versions_are_collected_after_their_grace_time(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        _write(store, "s", 3)
        _publish(store, "s", "results/m", 1)
        _publish(store, "s", "results/m", 2)
        assert len(list(store.sequence("s").group["results/m"].group_keys())) == 2  # the old one is kept a while
        store.leases = store.leases.model_copy(update={"keep_superseded_s": 0.0})
        deleted = store.collect_garbage("s", now=time.time() + 1)
        assert len(deleted) == 1
        seq = store.sequence("s")
        assert list(seq.group["results/m"].group_keys()) == [seq.stages["results/m"]["at"].rsplit("/", 1)[1]]
        assert seq.array("results/m/labels")[:].tolist() == [2, 2, 2]

    def test_concurrent_metadata_updates_lose_nothing(self, local_store_url: str) -> None:
        store = SequenceStore.create(local_store_url, CAMVID11)
        _write(store, "s", 3)
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_mark_many, args=(local_store_url, "s", w)) for w in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        stages = SequenceStore.open(local_store_url).sequence("s").stages
        assert {s for s in stages if s.startswith("check/")} == {f"check/{w}-{i}" for w in range(4) for i in range(8)}

    def test_replacing_a_sequence_keeps_it_until_the_new_one_is_complete(self, store_url: str) -> None:
        store = SequenceStore.create(store_url, CAMVID11)
        rgb, _ = _write(store, "s", 3)
        _publish(store, "s", "results/m", 1)
        with pytest.raises(SizeMismatchError):
            with store.new_sequence("s", expected_frames=3, source="test", fps=10.0) as writer:
                writer.write("f000", rgb[0][:5], None)
                writer.write("f001", rgb[1], None)  # another size: the replacement fails
        seq = store.sequence("s")
        np.testing.assert_array_equal(seq.frame(0), rgb[0])
        assert seq.stage_done("results/m")
        _write(store, "s", 3)  # different content: swapped in, old results dropped
        assert not store.sequence("s").stage_done("results/m")
