"""Ingest: every bad-input case fails only its own sequence, nothing half-written remains,
and an interrupted ingest (exception or killed process) resumes where it stopped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from autolabel.storage.ingest import IngestOptions, ingest
from autolabel.storage.readers import ReaderOptions, read_dataset
from autolabel.storage.readers.base import FrameItem, SequenceSource
from autolabel.storage.store import SequenceStore

from tests.conftest import (
    classes_file,
    good_sequence,
    random_label,
    random_rgb,
    save_label,
    save_rgb,
)

RNG = np.random.default_rng(3)


def _folder(tmp_path: Path, bad: str) -> tuple[Path, Path, Path]:
    """Sequences good-a, bad, good-b; ``bad`` is broken in the way named. Returns (root, labels, culprit)."""
    root, labels = tmp_path / "drives", tmp_path / "labels"
    good_sequence(root, labels, "good-a")
    good_sequence(root, labels, "good-b")
    seq = root / "bad"
    seq.mkdir(parents=True)
    culprit = seq
    if bad != "empty":
        for i in range(3):
            save_rgb(seq / f"{i:04d}.jpg", random_rgb(RNG))
    if bad in ("truncated-jpeg", "garbage-image", "frame-size"):  # labelled, so only the frames are wrong
        save_label(labels / "bad" / "0000.png", random_label(RNG, [0, 1]))
    if bad == "truncated-jpeg":
        culprit = seq / "0001.jpg"
        data = culprit.read_bytes()
        culprit.write_bytes(data[: len(data) // 2])
    elif bad == "garbage-image":
        culprit = seq / "0002.jpg"
        culprit.write_bytes(b"this is not an image")
    elif bad == "size-mismatch":
        culprit = save_label(labels / "bad" / "0001.png", random_label(RNG, [0, 1], h=5, w=5))
    elif bad == "label-value":
        culprit = save_label(labels / "bad" / "0000.png", random_label(RNG, [0, 7]))
    elif bad == "frame-size":
        culprit = save_rgb(seq / "0002.jpg", random_rgb(RNG, h=20, w=20))
    return root, labels, culprit


@pytest.mark.parametrize(("bad", "message"), [
    ("truncated-jpeg", "cannot decode image"),
    ("garbage-image", "cannot decode image"),
    ("size-mismatch", "label is 5x5 but frame '0001.jpg' is 16x12"),
    ("label-value", r"label values \[7\] are outside the class set"),
    ("frame-size", "frame is 20x20 but sequence 'bad' started with 16x12"),
    ("empty", "has no frames"),
])
def test_bad_sequence_fails_alone(tmp_path: Path, store_url: str, bad: str, message: str) -> None:
    root, labels, culprit = _folder(tmp_path, bad)
    ds = read_dataset("folder", root, ReaderOptions(labels=labels, classes_file=classes_file(tmp_path)))
    report = ingest(ds, store_url)
    assert [o.id for o in report.failed] == ["bad"]
    error = report.failed[0].error or ""
    assert str(culprit) in error, error
    assert re.search(message, error), error
    store = SequenceStore.open(store_url)
    assert store.sequence_ids() == ["good-a", "good-b"]
    assert store.incomplete_ids() == []  # no partial sequence left behind


def test_unsafe_sequence_id_fails_alone(tmp_path: Path, store_url: str) -> None:
    root, labels = tmp_path / "drives", tmp_path / "labels"
    good_sequence(root, labels, "good")
    good_sequence(root, labels, "..evil")
    ds = read_dataset("folder", root, ReaderOptions(labels=labels, classes_file=classes_file(tmp_path)))
    report = ingest(ds, store_url)
    assert [o.id for o in report.failed] == ["..evil"]
    assert str(root / "..evil") in (report.failed[0].error or "")
    assert "never escape the store root" in (report.failed[0].error or "")
    assert SequenceStore.open(store_url).sequence_ids() == ["good"]


def test_selecting_an_unknown_sequence_is_refused(tmp_path: Path, store_url: str) -> None:
    root, labels = tmp_path / "drives", tmp_path / "labels"
    good_sequence(root, labels, "good")
    ds = read_dataset("folder", root, ReaderOptions(labels=labels, classes_file=classes_file(tmp_path)))
    with pytest.raises(Exception, match=r"no sequence \['../x'\].*found 1 sequence, e.g. good"):
        ingest(ds, store_url, IngestOptions(sequences=["../x"]))


class _Interrupted(SequenceSource):
    """Yields frames of ``inner`` and raises KeyboardInterrupt after ``after`` frames."""

    def __init__(self, inner: SequenceSource, after: int) -> None:
        self.inner, self.after = inner, after
        self.id, self.source, self.fps = inner.id, inner.source, inner.fps

    def __len__(self) -> int:
        return len(self.inner)

    def iter_items(self, prefetch: int = 4) -> Iterator[FrameItem]:
        for i, item in enumerate(self.inner.iter_items(prefetch)):
            if i == self.after:
                raise KeyboardInterrupt
            yield item


def test_ctrl_c_leaves_no_partial_sequence_and_a_rerun_resumes(tmp_path: Path, store_url: str) -> None:
    root, labels = tmp_path / "drives", tmp_path / "labels"
    for name in ("a", "b", "c"):
        good_sequence(root, labels, name, frames=4)
    options = ReaderOptions(labels=labels, classes_file=classes_file(tmp_path))
    ds = read_dataset("folder", root, options)
    ds.sequences[1] = _Interrupted(ds.sequences[1], after=2)
    with pytest.raises(KeyboardInterrupt):
        ingest(ds, store_url)
    store = SequenceStore.open(store_url)
    assert store.sequence_ids() == ["a"] and store.incomplete_ids() == []
    report = ingest(read_dataset("folder", root, options), store_url)
    assert [(o.id, o.status) for o in report.outcomes] == [("a", "skipped"), ("b", "ingested"), ("c", "ingested")]
    assert SequenceStore.open(store_url).sequence("b").num_frames == 4


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from autolabel.storage.ingest import ingest, NoProgress
    from autolabel.storage.readers import ReaderOptions, read_dataset

    root, labels, classes, store = sys.argv[1:5]

    class KillMidSecondSequence(NoProgress):
        sequences = frames = 0
        def sequence_started(self, seq_id, n):
            self.sequences, self.frames = self.sequences + 1, 0
        def frame_written(self, seq_id):
            self.frames += 1
            if self.sequences == 2 and self.frames == 3:
                os.kill(os.getpid(), signal.SIGKILL)   # no cleanup of any kind runs

    ds = read_dataset("folder", Path(root), ReaderOptions(labels=Path(labels), classes_file=Path(classes)))
    ingest(ds, store, progress=KillMidSecondSequence())
""")


def test_killed_process_leaves_an_invisible_partial_that_the_rerun_replaces(tmp_path: Path, local_store_url: str) -> None:
    root, labels = tmp_path / "drives", tmp_path / "labels"
    for name in ("a", "b", "c"):
        good_sequence(root, labels, name, frames=6)
    classes = classes_file(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(root), str(labels), str(classes), local_store_url],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    store = SequenceStore.open(local_store_url)
    assert store.sequence_ids() == ["a"]
    assert store.incomplete_ids() == ["b"]  # chunks of b exist on disk, but b is not visible
    assert list((Path(local_store_url) / "sequences" / "b" / "data").glob("v-*/frames/c/*"))
    assert (Path(local_store_url) / "_leases" / "b~ingest.json").exists()  # the killed run's lease stays

    options = ReaderOptions(labels=labels, classes_file=classes)
    report = ingest(read_dataset("folder", root, options), local_store_url)
    assert [(o.id, o.status) for o in report.outcomes] == [("a", "skipped"), ("b", "ingested"), ("c", "ingested")]
    store = SequenceStore.open(local_store_url)
    assert store.incomplete_ids() == []
    assert not (Path(local_store_url) / "_leases" / "b~ingest.json").exists()  # taken over: its owner is dead
    seq = store.sequence("b")
    source = list(read_dataset("folder", root, options).sequences[1].iter_items())
    assert seq.num_frames == 6
    for t, item in enumerate(source):
        np.testing.assert_array_equal(seq.frame(t), item.rgb)
