"""Export labels of a store as PNG files: class index, colour, and an alpha overlay on the frame."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from autolabel.errors import StageNotDoneError
from storage.images import write_png_atomic
from storage.stages import GROUND_TRUTH, result_array_names, results_stage
from storage.store import Sequence

def label_frames(seq: Sequence, method: str) -> tuple[list[int], Callable[[int], np.ndarray]]:
    """Frames that carry labels of ``method`` and a reader for one frame's (H, W) uint8 labels.

    ``method == "gt"`` gives the stored labels (annotations and ground truth).
    """
    if method == GROUND_TRUTH:
        return np.flatnonzero(seq.has_gt).tolist(), seq.ground_truth
    if not seq.stage_done(results_stage(method)):
        raise StageNotDoneError(
            f"sequence {seq.id!r} has no finished results for method {method!r}; run "
            f"`autolabel label {seq.store.url} --method {method}` first (stages done: {sorted(seq.stages)})"
        )
    labels_name, _, distance_name = result_array_names(method)
    labels = seq.array(labels_name)
    distance = np.asarray(seq.array(distance_name)[:])
    frames = np.flatnonzero(distance >= 0).tolist()
    return frames, lambda t: np.asarray(labels[t])


def overlay(frame: np.ndarray, colours: np.ndarray, valid: np.ndarray, alpha: float) -> np.ndarray:
    """Blend ``colours`` (H, W, 3) over ``frame`` (H, W, 3) where ``valid`` (H, W); uint8 out."""
    out = frame.astype(np.float32)
    out[valid] = (1 - alpha) * out[valid] + alpha * colours[valid].astype(np.float32)
    return out.round().astype(np.uint8)


def export_sequence(
    seq: Sequence, method: str, out: Path, *, with_overlay: bool = False, alpha: float = 0.5,
    on_frame: Callable[[], None] | None = None,
) -> int:
    """Write ``out/<seq>/{index,color[,overlay]}/<frame>.png`` for every labelled frame.

    Index PNGs are palette PNGs whose pixel values are the class ids (ignore index kept), so
    they read back as class indices and display in colour. Returns the number of frames written.
    """
    frames, read = label_frames(seq, method)
    classes = seq.store.classes
    lut = classes.colour_lut()
    names = seq.frame_names
    base = out / seq.id
    for t in frames:
        label = read(t)
        colours = lut[label]
        write_png_atomic(base / "index" / f"{names[t]}.png", label, palette=lut)
        write_png_atomic(base / "color" / f"{names[t]}.png", colours)
        if with_overlay:
            blended = overlay(seq.frame(t), colours, label != classes.ignore_index, alpha)
            write_png_atomic(base / "overlay" / f"{names[t]}.png", blended)
        if on_frame is not None:
            on_frame()
    return len(frames)
