"""Teacher-inference stage: the teacher's label and confidence for every frame of a sequence."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from autolabel.errors import ConfigError
from autolabel.models.teacher import Teacher
from autolabel.models.teacher_runtime import SemanticTeacher
from autolabel.models.teacher_training import adapt_teacher
from autolabel.models.segments import Segment, stage_key
from autolabel.storage import feature_scratch
from autolabel.storage.segmented import SegmentedStage
from autolabel.storage.stages import TEACHER
from autolabel.storage.store import (
    FrameArrayWriter,
    RangeWriter,
    Sequence,
    SequenceStore,
    StoreLayout,
)
from autolabel.storage.training_data import AnnotatedFrames


def teacher_settings(teacher_hash: str, adapt_steps: int, keyframes: str | None = None) -> dict[str, object]:
    """What the teacher stage's output depends on; an adapted teacher also on keyframes added after ingest."""
    settings: dict[str, object] = {"checkpoint_sha256": teacher_hash, "adapt_steps": adapt_steps}
    if adapt_steps > 0 and keyframes is not None:
        settings["keyframes"] = keyframes
    return settings


def teacher_is_current(seq: Sequence, teacher_hash: str, adapt_steps: int) -> bool:
    stage = seq.stages.get(TEACHER)
    return stage is not None and stage.get("settings") == teacher_settings(teacher_hash, adapt_steps,
                                                                            seq.keyframes_fingerprint)


def infer_teacher(
    store: SequenceStore,
    seq_id: str,
    teacher: SemanticTeacher,
    teacher_hash: str,
    *,
    adapt_steps: int = 0,
    batch_size: int = 4,
    on_frame: Callable[[], None] | None = None,
    keep_features_bytes: int = 0,
) -> bool:
    """Store ``teacher/labels`` and ``teacher/confidence`` (uint8, x255) for every frame.

    With ``adapt_steps`` > 0 a copy of the teacher is first fine-tuned on this sequence's own
    annotated frames (per-sequence adaptation). Skips (returns False) when the stage already holds
    the output of the same checkpoint and adaptation. A mapped teacher's *unknown* pixels are
    stored with the ignore label (inpainting never copies them). With ``keep_features_bytes`` > 0
    (and no adaptation) the features warp-refine's refiner takes are kept for this process's
    propagation stage (:mod:`storage.feature_scratch`), up to that many bytes.
    """
    teacher.check_classes(store.classes.names, store.classes.ignore_index, f"store {store.url!r}")
    with store.writing(seq_id, TEACHER) as out:
        seq = store.writable_sequence(seq_id)
        if teacher_is_current(seq, teacher_hash, adapt_steps):
            return False
        model = teacher
        if adapt_steps > 0 and not isinstance(teacher, Teacher):
            raise ConfigError(f"sequence {seq_id!r}: per-sequence adaptation needs a built-in teacher checkpoint (.pt); "
                              "use --adapt-steps 0 with exported or mapped teachers")
        if adapt_steps > 0:
            samples = AnnotatedFrames.from_sequence(seq)
            if len(samples):
                model = adapt_teacher(teacher, samples, adapt_steps)  # type: ignore[arg-type]
        labels_w, conf_w = _teacher_writers(out.group, seq)
        scratch = feature_scratch.open_scratch(store.url, seq_id, out.path, model, keep_features_bytes) \
            if model is teacher else None
        try:
            _predict_into(model, seq, 0, seq.num_frames, batch_size, labels_w, conf_w, on_frame, scratch)
        except BaseException:
            feature_scratch.release(store.url, seq_id)
            raise
        labels_w.close()
        conf_w.close()
        out.publish({"settings": teacher_settings(teacher_hash, adapt_steps, seq.keyframes_fingerprint),
                     "classes": teacher.classes})
    return True


def _teacher_writers(group: Any, seq: Sequence) -> tuple[FrameArrayWriter, FrameArrayWriter]:
    shape = (seq.height, seq.width)
    return (FrameArrayWriter(group, "labels", shape, "uint8", seq.num_frames, StoreLayout(),
                             seq.store.classes.ignore_index, ("T", "H", "W")),
            FrameArrayWriter(group, "confidence", shape, "uint8", seq.num_frames, StoreLayout(), 0, ("T", "H", "W")))


def _predict_into(model: SemanticTeacher, seq: Sequence, start: int, stop: int, batch_size: int,
                  labels_w: FrameArrayWriter | RangeWriter, conf_w: FrameArrayWriter | RangeWriter,
                  on_frame: Callable[[], None] | None,
                  scratch: feature_scratch.FeatureScratch | None = None) -> None:
    """The teacher on frames ``start..stop-1`` in batches on the drive's grid (multiples of ``batch_size``).

    Batches start at multiples of ``batch_size`` whatever ``start`` is, so a segment's frames see
    exactly the batches a whole-drive run gives them. ``scratch``: where the features of the same
    forward passes are kept.
    """
    for first in range(start - start % batch_size, stop, batch_size):
        a, b = max(first, start), min(first + batch_size, stop)
        frames = np.stack(list(seq.iter_frames(first, min(first + batch_size, seq.num_frames))))
        if scratch is None:
            labels, conf = model.predict_labels(frames)
        else:
            labels, conf, features = model.predict_labels_and_features(frames)
            if features is not None:
                scratch.put(list(range(a, b)), features[a - first:b - first])
        for lab, c in list(zip(labels, conf))[a - first:b - first]:
            labels_w.append(lab)
            conf_w.append(np.clip(np.round(c * 255), 0, 255).astype(np.uint8))
            if on_frame is not None:
                on_frame()


def infer_teacher_segment(store: SequenceStore, seq_id: str, teacher: SemanticTeacher, teacher_hash: str,
                          segment: Segment, plan_key: str, segments: int, *, batch_size: int = 4,
                          on_frame: Callable[[], None] | None = None, keep_features_bytes: int = 0) -> bool:
    """The teacher's output for the frames ``segment`` owns, into the drive's shared new version.

    Like :func:`infer_teacher` without adaptation (a segmented drive is refused with
    ``adapt_steps``); the job that writes the last segment publishes the stage.
    """
    teacher.check_classes(store.classes.names, store.classes.ignore_index, f"store {store.url!r}")
    seq = store.sequence(seq_id)
    if teacher_is_current(seq, teacher_hash, 0):
        return False
    settings = teacher_settings(teacher_hash, 0, seq.keyframes_fingerprint)
    shared = SegmentedStage.open(store, seq_id, TEACHER, stage_key(plan_key, settings), segments,
                                 lambda group: _teacher_writers(group, seq),
                                 published=lambda now: teacher_is_current(now, teacher_hash, 0))
    if shared is None or shared.is_done(segment.index):
        return False
    group = shared.group
    labels_w = RangeWriter(group["labels"], segment.start)  # type: ignore[arg-type]
    conf_w = RangeWriter(group["confidence"], segment.start)  # type: ignore[arg-type]
    scratch = feature_scratch.open_scratch(store.url, seq_id, shared.path, teacher, keep_features_bytes)
    _predict_into(teacher, seq, segment.start, segment.stop, batch_size, labels_w, conf_w, on_frame, scratch)
    labels_w.close()
    conf_w.close()
    shared.finish(segment.index, {"frames": segment.frames},
                  lambda infos: {"settings": settings, "classes": teacher.classes})
    return True
