"""Prefetching propagation inputs: the next step is read on another thread, labels do not change."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

from autolabel.models.prefetch import PrefetchingInputs, read_ahead
from autolabel.models.propagation import PropagationConfig, create_method, propagate_frames
from autolabel.models.quality import run_path_together
from autolabel.storage.synthetic import SyntheticConfig
from tests.conftest import DriveInputs


class CountingInputs(DriveInputs):
    """DriveInputs that records each read and the thread it ran on; frame ``broken`` fails to read."""

    def __init__(self, *args: object, broken: int | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reads: Counter[tuple[str, int]] = Counter()
        self.threads: set[str] = set()
        self.broken = broken

    def _note(self, name: str, t: int) -> None:
        self.reads[(name, t)] += 1
        self.threads.add(threading.current_thread().name)
        if t == self.broken:
            raise OSError(f"frame {t}: chunk is corrupt")

    def frame(self, t: int) -> np.ndarray:
        self._note("frame", t)
        return super().frame(t)

    def flow_to_next(self, t: int) -> np.ndarray:
        self._note("flow_to_next", t)
        return super().flow_to_next(t)

    def flow_to_prev(self, t: int) -> np.ndarray:
        self._note("flow_to_prev", t)
        return super().flow_to_prev(t)

    def teacher(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        self._note("teacher", t)
        return super().teacher(t)


CFG = SyntheticConfig(width=32, height=24, frames=30, seed=0)
KEYS = [4, 10, 25]


class TestPrefetchingInputs:
    def test_smoke_reads_what_the_inputs_read(self) -> None:
        inputs = CountingInputs(CFG, KEYS)
        with PrefetchingInputs(inputs) as reading:
            reading.prefetch([("frame", 3), ("flow_to_next", 3)])
            reading.prefetch([])  # step 3 is now the current one
            np.testing.assert_array_equal(reading.frame(3), inputs.frames[3].rgb)
            np.testing.assert_array_equal(reading.flow_to_next(3), inputs.frames[3].flow_next)
            assert reading.num_frames == 30 and reading.annotated[4]  # everything else passes through
        assert inputs.reads == Counter({("frame", 3): 1, ("flow_to_next", 3): 1})
        assert all(name.startswith("autolabel-prefetch") for name in inputs.threads)

    def test_keeps_two_steps_only(self) -> None:
        inputs = CountingInputs(CFG, KEYS)
        with PrefetchingInputs(inputs) as reading:
            reading.prefetch([("frame", 1)])
            reading.prefetch([("frame", 2)])
            reading.prefetch([("frame", 3)])  # frame 1's read is let go
            reading.frame(2)
            reading.frame(1)  # read again, here
        assert inputs.reads[("frame", 1)] == 2 and inputs.reads[("frame", 2)] == 1
        assert threading.current_thread().name in inputs.threads

    def test_exceptions(self) -> None:
        inputs = CountingInputs(CFG, KEYS, broken=7)
        with PrefetchingInputs(inputs) as reading:
            reading.prefetch([("frame", 7)])  # the reader thread fails; nothing is raised yet
            with pytest.raises(OSError, match="frame 7: chunk is corrupt"):
                reading.frame(7)
            with pytest.raises(ValueError, match="cannot prefetch 'annotation'"):
                reading.prefetch([("annotation", 4)])

    def test_close_ends_the_reader_thread(self) -> None:
        reading = PrefetchingInputs(CountingInputs(CFG, KEYS))
        reading.prefetch([("frame", 0), ("frame", 1)])
        reading.close()
        assert not any(t.name.startswith("autolabel-prefetch") for t in threading.enumerate())


@pytest.mark.parametrize("method", ["motion-only", "semantic-only", "warp-inpaint"])
def test_propagation_reads_ahead_and_gives_the_same_labels(method: str) -> None:
    inputs = CountingInputs(CFG, KEYS)
    config = PropagationConfig(method=method, max_distance=4)
    ahead = list(propagate_frames(inputs, config, batch_size=2))
    read_ahead = sum(inputs.reads.values())
    assert any(name.startswith("autolabel-prefetch") for name in inputs.threads)
    inputs.reads.clear()
    inputs.threads.clear()
    plain = list(propagate_frames(inputs, config.model_copy(update={"prefetch": False}), batch_size=2))
    assert inputs.threads == {threading.current_thread().name}
    assert read_ahead <= sum(inputs.reads.values())  # nothing read twice for being read ahead
    for a, b in zip(ahead, plain, strict=True):
        assert (a.t, a.distance) == (b.t, b.distance)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.confidence, b.confidence)


def test_a_read_error_stops_propagation_with_that_error() -> None:
    inputs = CountingInputs(CFG, KEYS, broken=12)
    with pytest.raises(OSError, match="frame 12: chunk is corrupt"):
        list(propagate_frames(inputs, PropagationConfig(method="warp-inpaint", max_distance=4)))
    assert not any(t.name.startswith("autolabel-prefetch") for t in threading.enumerate())


def test_a_probe_reads_ahead_once_and_gives_the_same_answer() -> None:
    """The estimate's probes resumed in the propagation's pass read their next step ahead too."""
    inputs = CountingInputs(CFG, KEYS)
    method = create_method(PropagationConfig(method="warp-inpaint", max_distance=4))
    path = list(range(10, 26))  # keyframe 10 to keyframe 25
    plain = run_path_together([method], inputs, path)[0]
    assert inputs.threads == {threading.current_thread().name}
    reads = Counter(inputs.reads)
    inputs.reads.clear()
    with PrefetchingInputs(inputs) as reading:
        ahead = run_path_together([method], reading, path)[0]
    assert any(name.startswith("autolabel-prefetch") for name in inputs.threads)
    assert set(inputs.reads) == set(reads)  # the same reads, none twice for being read ahead
    assert all(inputs.reads[k] <= reads[k] for k in reads)
    assert torch.equal(ahead.labels, plain.labels) and torch.equal(ahead.confidence, plain.confidence)


class TestReadAhead:
    """A stream read in order on a reader thread, at most ``depth`` items ahead of its consumer."""

    def test_same_items_in_order_read_on_another_thread(self) -> None:
        threads = set()

        def items():
            for i in range(20):
                threads.add(threading.current_thread().name)
                yield i

        assert list(read_ahead(items(), 3)) == list(range(20))
        assert threads == {"autolabel-read-ahead"}

    def test_never_more_than_depth_ahead(self) -> None:
        produced, consumed, ahead = [], [], []

        def items():
            for i in range(12):
                produced.append(i)
                ahead.append(len(produced) - len(consumed))
                yield i

        for item in read_ahead(items(), 2):
            consumed.append(item)
            time.sleep(0.01)  # a slow consumer: the reader fills up and waits
        assert consumed == list(range(12))
        assert max(ahead) <= 2 + 2  # waiting in the queue, plus the one being handed over and the one being read

    def test_an_error_comes_out_where_its_item_would(self) -> None:
        def items():
            yield 0
            yield 1
            raise OSError("frame 2: chunk is corrupt")

        got = []
        with pytest.raises(OSError, match="frame 2: chunk is corrupt"):
            for item in read_ahead(items(), 4):
                got.append(item)
        assert got == [0, 1]

    def test_a_consumer_that_stops_early_stops_the_reader(self) -> None:
        produced = []

        def items():
            for i in range(1000):
                produced.append(i)
                yield i

        stream = read_ahead(items(), 2)
        assert [next(stream), next(stream)] == [0, 1]
        stream.close()
        assert not any(t.name == "autolabel-read-ahead" for t in threading.enumerate())
        assert len(produced) < 10

    def test_depth_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="depth of at least 1"):
            list(read_ahead([1], 0))
