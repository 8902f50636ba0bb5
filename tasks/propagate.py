"""Propagation stage: run a method over a sequence and store labels, confidence and distance."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from autolabel.models.propagation import (
    OutputFrame,
    PropagationConfig,
    WindowInputs,
    affected_windows,
    create_method,
    method_class,
    propagate_frames,
)
from autolabel.models.quality import annotation_fingerprint
from autolabel.models.segments import Segment, stage_key
from autolabel.models.refiner import Refiner
from autolabel.models.teacher_runtime import SemanticTeacher
from autolabel.storage.segmented import SegmentedStage
from autolabel.storage.stages import (
    DISTANCE_DTYPE,
    TEACHER,
    TEACHER_CONFIDENCE,
    TEACHER_LABELS,
    flow_stage,
    result_array_names,
    results_stage,
)
from autolabel.storage.store import (
    WRITE_EVERY_CHUNK,
    FrameArrayWriter,
    RangeWriter,
    Sequence,
    SequenceStore,
    StoreLayout,
)
from autolabel.tasks.flow_estimation import flow_arrays

from autolabel.errors import StageNotDoneError, StoreError


FRAME_CACHE = 48  # decoded frames kept (two per chain of a batch of 16, with room)


class StoreSequenceInputs:
    """:class:`models.propagation.SequenceInputs` read lazily from a stored sequence."""

    def __init__(self, seq: Sequence, flow_name: str | None, need_teacher: bool,
                 feature_teacher: SemanticTeacher | None = None) -> None:
        """``feature_teacher``: computes the teacher features of a frame on demand (warp-refine)."""
        self.seq = seq
        self.num_frames, self.height, self.width = seq.num_frames, seq.height, seq.width
        self.annotated = seq.annotated
        self.num_classes = seq.store.classes.num_classes
        self.ignore_index = seq.store.classes.ignore_index
        self._fw = self._bw = None
        if flow_name is not None:
            self._fw, self._bw = flow_arrays(seq, flow_name)
        if need_teacher and not seq.stage_done(TEACHER):
            raise StageNotDoneError(
                f"sequence {seq.id!r} has no teacher output yet; label with --teacher CHECKPOINT "
                "(train one with `autolabel train-teacher`)"
            )
        self._teacher_labels = seq.array(TEACHER_LABELS) if need_teacher else None
        self._teacher_conf = seq.array(TEACHER_CONFIDENCE) if need_teacher else None
        self._frames: dict[int, np.ndarray] = {}
        self._frames_lock = threading.Lock()
        self._feature_teacher = feature_teacher
        self.teacher_features = self._features if feature_teacher is not None else None
        self.teacher_features_batch = self._features_batch if feature_teacher is not None else None

    def annotation(self, t: int) -> np.ndarray:
        return self.seq.annotation(t)

    def frame(self, t: int) -> np.ndarray:
        # a batched step reads two frames per chain; keep enough to read every frame once
        # (the prefetching thread of models.prefetch reads here too: the cache is locked)
        with self._frames_lock:
            cached = self._frames.get(t)
        if cached is not None:
            return cached
        frame = self.seq.frame(t)
        with self._frames_lock:
            if t not in self._frames and len(self._frames) >= FRAME_CACHE:
                self._frames.pop(next(iter(self._frames)))
            self._frames[t] = frame
        return frame

    def flow_to_next(self, t: int) -> np.ndarray:
        assert self._fw is not None
        return np.asarray(self._fw[t], dtype=np.float32)

    def flow_to_prev(self, t: int) -> np.ndarray:
        assert self._bw is not None
        return np.asarray(self._bw[t - 1], dtype=np.float32)

    def _features(self, t: int) -> torch.Tensor:
        return self._features_batch([t])[0]

    def _features_batch(self, ts: list[int]) -> torch.Tensor:
        """float (B, F, h, w) teacher features of frames ``ts``, one batched forward pass; left where
        and as the teacher made them (its device, channels_last), which is where the refiner wants them."""
        assert self._feature_teacher is not None
        return self._feature_teacher.predict_features(np.stack([self.frame(t) for t in ts]))

    def teacher(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        assert self._teacher_labels is not None and self._teacher_conf is not None
        return np.asarray(self._teacher_labels[t]), np.asarray(self._teacher_conf[t], dtype=np.float32) / 255.0


def result_settings(config: PropagationConfig, flow: dict[str, Any] | None, teacher: dict[str, Any] | None,
                    refiner_sha256: str | None = None, keyframes: str | None = None) -> dict[str, Any]:
    # neither the device, the batch size nor prefetching changes the labels
    settings = {**config.model_dump(exclude={"device", "batch_size", "prefetch"}), "flow": flow, "teacher": teacher}
    if refiner_sha256 is not None:
        settings["refiner_sha256"] = refiner_sha256
    if keyframes is not None:  # keyframes added after ingest
        settings["keyframes"] = keyframes
    return settings


def expected_settings(seq: Sequence, config: PropagationConfig, flow_name: str | None,
                      refiner_sha256: str | None = None) -> dict[str, Any]:
    """The settings record that labelling ``seq`` with ``config`` now would write (needs its inputs' stages)."""
    method = method_class(config.method)
    flow_info = seq.stages[flow_stage(flow_name or "")].get("settings", {"backend": flow_name}) if method.needs_flow else None
    teacher_info = seq.stages[TEACHER]["settings"] if method.needs_teacher else None
    return result_settings(config, flow_info, teacher_info, refiner_sha256 if method.needs_refiner else None,
                           seq.keyframes_fingerprint)


def results_are_current(seq: Sequence, config: PropagationConfig, flow_name: str | None,
                        refiner_sha256: str | None = None) -> bool:
    """True when ``seq`` holds results of ``config.method`` made with exactly these settings and inputs."""
    stored = seq.stages.get(results_stage(config.method))
    if stored is None:
        return False
    try:
        return stored.get("settings") == expected_settings(seq, config, flow_name, refiner_sha256)
    except KeyError:  # an input stage is missing
        return False


def propagate_sequence(
    store: SequenceStore,
    seq_id: str,
    config: PropagationConfig,
    flow_name: str | None,
    *,
    on_step: Callable[[], None] | None = None,
    refiner: Refiner | None = None,
    refiner_sha256: str | None = None,
    feature_teacher: SemanticTeacher | None = None,
) -> bool:
    """Propagate the annotations of ``seq_id`` with ``config.method`` and store the results.

    Needs the flow stage ``flow_name`` (methods that warp) and the teacher stage (methods that
    use the teacher) to be done. Skips (returns False) when results with identical settings exist.
    Writes ``results/<method>/{labels,confidence,distance}`` and marks the stage done last.
    warp-refine also needs ``refiner`` (its sha256 goes into the settings) and ``feature_teacher``,
    the teacher the refiner was trained with (its features are computed per frame).

    After keyframes were added (:meth:`SequenceStore.add_keyframes`) with otherwise identical
    settings, only the frames between each new keyframe's old neighbours are propagated again
    (:func:`models.propagation.affected_windows`); the others are copied from the stored results.
    """
    stage = results_stage(config.method)
    with store.writing(seq_id, stage) as out:
        seq = store.writable_sequence(seq_id)
        method = create_method(config, refiner)
        inputs = StoreSequenceInputs(seq, flow_name if method.needs_flow else None, method.needs_teacher,
                                     feature_teacher if method.needs_refiner else None)
        settings = expected_settings(seq, config, flow_name, refiner_sha256)
        previous = seq.stages.get(stage, {})
        if previous.get("settings") == settings:
            return False
        annotations = {int(t): annotation_fingerprint(inputs.annotation(int(t)))
                       for t in np.flatnonzero(inputs.annotated)}
        windows = None
        if {k: v for k, v in previous.get("settings", {}).items() if k != "keyframes"} == \
                {k: v for k, v in settings.items() if k != "keyframes"} and "annotations" in previous:
            windows = affected_windows({int(t): fp for t, fp in previous["annotations"].items()}, annotations,
                                       seq.num_frames)
        shape = (seq.height, seq.width)
        dims = ("T", "H", "W")
        ignore = store.classes.ignore_index
        labels_w = FrameArrayWriter(out.group, "labels", shape, "uint8", seq.num_frames, StoreLayout(), ignore, dims)
        conf_w = FrameArrayWriter(out.group, "confidence", shape, "uint8", seq.num_frames, StoreLayout(), 0, dims)
        distance = np.full(seq.num_frames, -1, dtype=DISTANCE_DTYPE)
        if windows is None:
            frames = propagate_frames(inputs, config, on_step, refiner, config.chains_per_batch())
            relabelled = seq.num_frames
        else:
            frames = _partial_frames(seq, config, inputs, windows, on_step, refiner)
            relabelled = sum(b - a - 1 for a, b in windows)
        for out_frame in frames:
            labels_w.append(out_frame.labels)
            conf_w.append(out_frame.confidence)
            distance[out_frame.t] = out_frame.distance
        labels_w.close()
        conf_w.close()
        dist = out.group.create_array("distance", shape=(seq.num_frames,), chunks=(seq.num_frames,),
                                      dtype=DISTANCE_DTYPE, fill_value=-1, overwrite=True, dimension_names=("T",),
                                      config=WRITE_EVERY_CHUNK)
        dist[:] = distance
        out.publish({"settings": settings, "reached": int((distance > 0).sum()),
                     "annotations": {str(t): fp for t, fp in annotations.items()},
                     "relabelled_frames": relabelled, "partial": windows is not None})
    return True


def _partial_frames(seq: Sequence, config: PropagationConfig, inputs: StoreSequenceInputs,
                    windows: list[tuple[int, int]], on_step: Callable[[], None] | None,
                    refiner: Refiner | None) -> Iterator[OutputFrame]:
    """Every frame in time order: the stored results outside ``windows``, propagated again inside them."""
    labels_name, conf_name, distance_name = result_array_names(config.method)
    old_labels, old_conf = seq.array(labels_name), seq.array(conf_name)
    old_distance = np.asarray(seq.array(distance_name)[:])
    t = 0
    for a, b in windows:
        while t < a:
            yield OutputFrame(t, np.asarray(old_labels[t]), np.asarray(old_conf[t]), int(old_distance[t]))
            t += 1
        for frame in propagate_frames(WindowInputs(inputs, a, b + 1), config, on_step, refiner,
                                      config.chains_per_batch()):
            yield OutputFrame(frame.t + a, frame.labels, frame.confidence, frame.distance)
        t = b + 1
    while t < seq.num_frames:
        yield OutputFrame(t, np.asarray(old_labels[t]), np.asarray(old_conf[t]), int(old_distance[t]))
        t += 1


def _result_arrays(group: Any, seq: Sequence) -> None:
    """Full-length, empty result arrays of a segmented drive (distance chunked by shard: one writer each)."""
    shape, dims, ignore = (seq.height, seq.width), ("T", "H", "W"), seq.store.classes.ignore_index
    FrameArrayWriter(group, "labels", shape, "uint8", seq.num_frames, StoreLayout(), ignore, dims)
    FrameArrayWriter(group, "confidence", shape, "uint8", seq.num_frames, StoreLayout(), 0, dims)
    chunk = StoreLayout().shard_length(seq.num_frames) or seq.num_frames
    group.create_array("distance", shape=(seq.num_frames,), chunks=(chunk,), dtype=DISTANCE_DTYPE, fill_value=-1,
                       overwrite=True, dimension_names=("T",), config=WRITE_EVERY_CHUNK)


def propagate_segment(
    store: SequenceStore,
    seq_id: str,
    config: PropagationConfig,
    flow_name: str | None,
    segment: Segment,
    plan_key: str,
    segments: int,
    *,
    on_step: Callable[[], None] | None = None,
    refiner: Refiner | None = None,
    refiner_sha256: str | None = None,
    feature_teacher: SemanticTeacher | None = None,
) -> bool:
    """Labels of the frames ``segment`` owns, propagated over its span, into the drive's shared new version.

    Gives exactly the labels :func:`propagate_sequence` gives those frames (a frame depends only on
    the keyframes around it; ``models.segments``). Needs the drive's flow and teacher stages
    published. The job that writes the last segment publishes the stage.
    """
    seq = store.sequence(seq_id)
    method = create_method(config, refiner)
    inputs = StoreSequenceInputs(seq, flow_name if method.needs_flow else None, method.needs_teacher,
                                 feature_teacher if method.needs_refiner else None)
    settings = expected_settings(seq, config, flow_name, refiner_sha256)
    if seq.stages.get(results_stage(config.method), {}).get("settings") == settings:
        return False
    shared = SegmentedStage.open(store, seq_id, results_stage(config.method), stage_key(plan_key, settings),
                                 segments, lambda group: _result_arrays(group, seq))
    if shared.is_done(segment.index):
        return False
    group = shared.group
    labels_w = RangeWriter(group["labels"], segment.start)  # type: ignore[arg-type]
    conf_w = RangeWriter(group["confidence"], segment.start)  # type: ignore[arg-type]
    distance = np.full(segment.frames, -1, dtype=DISTANCE_DTYPE)
    window = WindowInputs(inputs, segment.span_start, segment.span_stop)
    owned = (segment.start - segment.span_start, segment.stop - segment.span_start)
    for frame in propagate_frames(window, config, on_step, refiner, config.chains_per_batch(), frames=owned):
        labels_w.append(frame.labels)
        conf_w.append(frame.confidence)
        distance[frame.t + segment.span_start - segment.start] = frame.distance
    if labels_w.close() != segment.frames or conf_w.close() != segment.frames:
        raise StoreError(f"sequence {seq_id!r}: segment {segment.index} produced {labels_w.count} of its "
                         f"{segment.frames} frames")
    group["distance"].with_config(WRITE_EVERY_CHUNK)[segment.start:segment.stop] = distance  # type: ignore[union-attr]
    keyframes = {str(t): annotation_fingerprint(inputs.annotation(int(t)))
                 for t in np.flatnonzero(inputs.annotated[segment.start:segment.stop]) + segment.start}

    def combine(infos: list[dict[str, Any]]) -> dict[str, Any]:
        return {"settings": settings, "reached": sum(i["reached"] for i in infos),
                "annotations": {t: fp for i in infos for t, fp in i["annotations"].items()},
                "relabelled_frames": seq.num_frames, "partial": False}

    shared.finish(segment.index, {"reached": int((distance > 0).sum()), "annotations": keyframes}, combine)
    return True
