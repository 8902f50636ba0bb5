"""Flow-estimation stage: compute a sequence's forward and backward flow once and store it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from autolabel.errors import StageNotDoneError
from autolabel.models.optical_flow import EXACT, FlowConfig, FlowEstimator
from autolabel.storage.stages import flow_array_names, flow_stage
from autolabel.storage.store import FrameArrayWriter, Sequence, SequenceStore, StoreLayout

# flow compresses little (about 1.8x at best); zstd-1 with byte shuffle encodes 2.5x faster
# than zstd-3 bitshuffle for nearly the same ratio
FLOW_LAYOUT = StoreLayout(clevel=1, shuffle="shuffle")


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
    ``flow/<name>/fw`` and ``flow/<name>/bw`` (float16, (T-1, 2, H, W)) and marks the stage done
    only after the last pair. The ``exact`` backend is never computed: it must already exist.
    """
    seq = store.writable_sequence(seq_id)
    if flow_is_current(seq, config):
        return False
    if config.backend == EXACT:
        raise StageNotDoneError(
            f"sequence {seq_id!r} has no exact flow: only synthetic drives store it; choose a "
            "computed backend such as --flow dis-medium"
        )
    name = config.stored_name
    store.clear_stage(seq_id, flow_stage(name))
    pairs = max(seq.num_frames - 1, 0)
    group = seq.group.require_group("flow").require_group(name)
    layout = FLOW_LAYOUT
    dims = ("T", "XY", "H", "W")
    shape = (2, seq.height, seq.width)
    fw = FrameArrayWriter(group, "fw", shape, "float16", max(pairs, 1), layout, 0, dims)
    bw = FrameArrayWriter(group, "bw", shape, "float16", max(pairs, 1), layout, 0, dims)
    own = estimator is None
    estimator = estimator or FlowEstimator(config)
    try:
        for f, b in estimator.pairs(seq.iter_frames()):
            fw.append(f.astype(np.float16))
            bw.append(b.astype(np.float16))
            if on_pair is not None:
                on_pair()
    finally:
        if own:
            estimator.close()
    fw.close()
    bw.close()
    store.mark_stage_done(seq_id, flow_stage(name), {"pairs": pairs, "settings": config.settings_key()})
    return True


def flow_arrays(seq: Sequence, name: str):  # noqa: ANN201 - two zarr arrays
    """The stored forward and backward flow arrays of backend ``name``; raises if not computed."""
    if not seq.stage_done(flow_stage(name)):
        raise StageNotDoneError(
            f"sequence {seq.id!r} has no {name} flow yet; run `autolabel flow {seq.store.url} --flow {name}` "
            f"or label with --flow {name} (flows present: {[s for s in seq.stages if s.startswith('flow/')]})"
        )
    fw_name, bw_name = flow_array_names(name)
    return seq.array(fw_name), seq.array(bw_name)


def flow_pieces(store: SequenceStore, seq_id: str, config: FlowConfig, piece_pairs: int = 32) -> list[tuple[int, int]]:
    """Prepare a parallel flow computation: create empty ``fw``/``bw`` arrays, return the pair ranges.

    Each range covers whole shards, so pieces written by different processes never share a shard.
    Call :func:`estimate_flow_piece` for every range (in any order, anywhere), then
    :func:`finish_flow`.
    """
    if config.backend == EXACT:
        raise StageNotDoneError(f"sequence {seq_id!r}: the exact flow is stored at ingest, not computed")
    seq = store.writable_sequence(seq_id)
    name = config.stored_name
    store.clear_stage(seq_id, flow_stage(name))
    pairs = max(seq.num_frames - 1, 1)
    group = seq.group.require_group("flow").require_group(name)
    shape = (2, seq.height, seq.width)
    step = 1
    for array_name in ("fw", "bw"):
        writer = FrameArrayWriter(group, array_name, shape, "float16", pairs, FLOW_LAYOUT, 0, ("T", "XY", "H", "W"))
        step = writer.step
    size = max(step, piece_pairs // step * step)
    return [(a, min(a + size, seq.num_frames - 1)) for a in range(0, seq.num_frames - 1, size)]


def estimate_flow_piece(store: SequenceStore, seq_id: str, config: FlowConfig, start: int, stop: int) -> int:
    """Compute the flow of pairs ``start..stop-1`` and write them into the arrays of :func:`flow_pieces`."""
    seq = store.sequence(seq_id)
    fw_name, bw_name = flow_array_names(config.stored_name)
    fw, bw = seq.array(fw_name), seq.array(bw_name)
    forward, backward = [], []
    with FlowEstimator(config.model_copy(update={"workers": 1})) as estimator:
        for f, b in estimator.pairs(seq.iter_frames(start, stop + 1)):
            forward.append(f.astype(np.float16))
            backward.append(b.astype(np.float16))
    fw[start:stop] = np.stack(forward)
    bw[start:stop] = np.stack(backward)
    return stop - start


def finish_flow(store: SequenceStore, seq_id: str, config: FlowConfig) -> None:
    """Mark the flow stage of a parallel computation done (after every piece is written)."""
    seq = store.sequence(seq_id)
    store.mark_stage_done(seq_id, flow_stage(config.stored_name),
                          {"pairs": max(seq.num_frames - 1, 0), "settings": config.settings_key()})
