"""Flow-estimation stage: compute a sequence's forward and backward flow once and store it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing

import numpy as np
import zarr
from autolabel.models.optical_flow import EXACT, FlowConfig, FlowEstimator
from autolabel.models.prefetch import read_ahead
from autolabel.models.segments import Segment, stage_key
from autolabel.storage.segmented import SegmentedStage
from autolabel.storage.stages import flow_array_names, flow_stage
from autolabel.storage.store import (
    FrameArrayWriter,
    WRITE_EVERY_CHUNK,
    RangeWriter,
    Sequence,
    SequenceStore,
    StageOutput,
    StoreLayout,
)

from autolabel.errors import StageNotDoneError

# flow compresses little (about 1.8x at best); zstd-1 with byte shuffle encodes 2.5x faster
# than zstd-3 bitshuffle for nearly the same ratio
FLOW_LAYOUT = StoreLayout(clevel=1, shuffle="shuffle")
FRAMES_AHEAD = 4  # frames read and decoded on a reader thread ahead of the flow (models.prefetch.read_ahead)


def flow_is_current(seq: Sequence, config: FlowConfig) -> bool:
    """True when this sequence already holds flow computed with ``config``'s settings."""
    stage = seq.stages.get(flow_stage(config.stored_name))
    if stage is None:
        return False
    return config.backend == EXACT or stage.get("settings") == config.settings_key()


def estimate_flow(
    store: SequenceStore,
    seq_id: str,
    config: FlowConfig,
    estimator: FlowEstimator | None = None,
    on_pair: Callable[[], None] | None = None,
) -> bool:
    """Compute and store the flow of every consecutive frame pair of ``seq_id``.

    Skips the work (returns False) when flow with the same settings is already stored. Writes
    ``flow/<name>/fw`` and ``flow/<name>/bw`` (float16, (T-1, 2, H, W)) into a new version under
    the stage's lease and publishes it after the last pair. The ``exact`` backend is never
    computed: it must already exist.
    """
    name = config.stored_name
    with store.writing(seq_id, flow_stage(name)) as out:
        seq = store.writable_sequence(seq_id)
        if flow_is_current(seq, config):
            return False
        _refuse_exact(seq_id, config)
        pairs = max(seq.num_frames - 1, 0)
        fw, bw = _flow_writers(out.group, seq, pairs)
        own = estimator is None
        estimator = estimator or FlowEstimator(config)
        try:
            with closing(read_ahead(seq.iter_frames(), FRAMES_AHEAD)) as frames:
                for f, b in estimator.pairs(frames):
                    fw.append(f.astype(np.float16))
                    bw.append(b.astype(np.float16))
                    if on_pair is not None:
                        on_pair()
        finally:
            if own:
                estimator.close()
        fw.close()
        bw.close()
        out.publish({"pairs": pairs, "settings": config.settings_key()})
    return True


def _refuse_exact(seq_id: str, config: FlowConfig) -> None:
    if config.backend == EXACT:
        raise StageNotDoneError(
            f"sequence {seq_id!r} has no exact flow: only synthetic drives store it; choose a "
            "computed backend such as --flow dis-medium"
        )


def _flow_writers(group: zarr.Group, seq: Sequence, pairs: int) -> tuple[FrameArrayWriter, FrameArrayWriter]:
    shape, dims = (2, seq.height, seq.width), ("T", "XY", "H", "W")
    return (FrameArrayWriter(group, "fw", shape, "float16", max(pairs, 1), FLOW_LAYOUT, 0, dims),
            FrameArrayWriter(group, "bw", shape, "float16", max(pairs, 1), FLOW_LAYOUT, 0, dims))


def flow_arrays(seq: Sequence, name: str):  # noqa: ANN201 - two zarr arrays
    """The stored forward and backward flow arrays of backend ``name``; raises if not computed."""
    if not seq.stage_done(flow_stage(name)):
        raise StageNotDoneError(
            f"sequence {seq.id!r} has no {name} flow yet; run `autolabel flow {seq.store.url} --flow {name}` "
            f"or label with --flow {name} (flows present: {[s for s in seq.stages if s.startswith('flow/')]})"
        )
    fw_name, bw_name = flow_array_names(name)
    return seq.array(fw_name), seq.array(bw_name)


def flow_pieces(out: StageOutput, config: FlowConfig, piece_pairs: int = 32) -> list[tuple[int, int]]:
    """Prepare a parallel flow computation in ``out`` (see :meth:`SequenceStore.writing`).

    Creates empty ``fw``/``bw`` arrays in the new version and returns the pair ranges; each range
    covers whole shards, so pieces written by different processes never share a shard. Call
    :func:`estimate_flow_piece` for every range (in any order, anywhere, with ``out.path``), then
    :func:`finish_flow`.
    """
    _refuse_exact(out.seq_id, config)
    seq = out.store.sequence(out.seq_id)
    fw, bw = _flow_writers(out.group, seq, max(seq.num_frames - 1, 1))
    step = fw.step
    if seq.num_frames < 2:  # no pair, no piece: trimmed to 0 rows now (an unwritten row reads as missing)
        fw.close()
        bw.close()
    size = max(step, piece_pairs // step * step)
    return [(a, min(a + size, seq.num_frames - 1)) for a in range(0, seq.num_frames - 1, size)]


def estimate_flow_piece(store: SequenceStore, seq_id: str, config: FlowConfig, version: str,
                        start: int, stop: int) -> int:
    """Compute the flow of pairs ``start..stop-1`` into the arrays of :func:`flow_pieces` at ``version``."""
    seq = store.sequence(seq_id)
    group = seq.group[version]
    # reopened arrays forget the writer's config: store every chunk, all-zero flow (a still camera) too
    fw, bw = group["fw"].with_config(WRITE_EVERY_CHUNK), group["bw"].with_config(WRITE_EVERY_CHUNK)
    forward, backward = [], []
    with (FlowEstimator(config.model_copy(update={"workers": 1})) as estimator,
          closing(read_ahead(seq.iter_frames(start, stop + 1), FRAMES_AHEAD)) as frames):
        for f, b in estimator.pairs(frames):
            forward.append(f.astype(np.float16))
            backward.append(b.astype(np.float16))
    fw[start:stop] = np.stack(forward)
    bw[start:stop] = np.stack(backward)
    return stop - start


def finish_flow(out: StageOutput, config: FlowConfig) -> None:
    """Publish the flow of a parallel computation (after every piece is written)."""
    seq = out.store.sequence(out.seq_id)
    out.publish({"pairs": max(seq.num_frames - 1, 0), "settings": config.settings_key()})


def estimate_flow_segment(store: SequenceStore, seq_id: str, config: FlowConfig, segment: Segment, plan_key: str,
                          segments: int, on_pair: Callable[[], None] | None = None) -> bool:
    """The flow pairs ``segment`` owns, written into the drive's shared new version (``storage.segmented``).

    Returns False when the stage is current or this segment is already written; the job that
    writes the last segment publishes the stage.
    """
    seq = store.sequence(seq_id)
    if flow_is_current(seq, config):
        return False
    _refuse_exact(seq_id, config)
    pairs = max(seq.num_frames - 1, 0)
    key = stage_key(plan_key, config.settings_key())
    shared = SegmentedStage.open(store, seq_id, flow_stage(config.stored_name), key, segments,
                                 lambda group: _flow_writers(group, seq, pairs),
                                 published=lambda now: flow_is_current(now, config))
    if shared is None or shared.is_done(segment.index):
        return False
    start, stop = segment.pairs(seq.num_frames)
    if stop > start:
        group = shared.group
        fw, bw = RangeWriter(group["fw"], start), RangeWriter(group["bw"], start)  # type: ignore[arg-type]
        with (FlowEstimator(config) as estimator,
              closing(read_ahead(seq.iter_frames(start, stop + 1), FRAMES_AHEAD)) as frames):
            for f, b in estimator.pairs(frames):
                fw.append(f.astype(np.float16))
                bw.append(b.astype(np.float16))
                if on_pair is not None:
                    on_pair()
        fw.close()
        bw.close()
    shared.finish(segment.index, {"pairs": stop - start},
                  lambda infos: {"pairs": pairs, "settings": config.settings_key()})
    return True
