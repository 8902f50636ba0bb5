"""Propagation stage: run a method over a sequence and store labels, confidence and distance."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any, TypeVar

import numpy as np
import torch
from autolabel.models.propagation import (
    OnChains,
    OutputFrame,
    PropagationConfig,
    WindowInputs,
    affected_windows,
    method_class,
    propagate_frames_together,
)
from autolabel.models.quality import annotation_fingerprint
from autolabel.models.segments import Segment, stage_key
from autolabel.models.refiner import Refiner
from autolabel.models.teacher_runtime import SemanticTeacher
from autolabel.storage import feature_scratch
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
    StageOutput,
    StoreLayout,
)
from autolabel.tasks.flow_estimation import flow_arrays

from autolabel.errors import StageNotDoneError, StoreError
from autolabel.runtime import release_free_memory


FRAME_CACHE = 48  # decoded frames kept (two per chain of a batch of 16, with room)
RELEASE_EVERY_FRAMES = 16  # propagated frames between handing the allocator's free pages back
T = TypeVar("T")
FEATURE_CACHE_BYTES = 256 * 2**20  # at most, for the teacher features kept (2.8 MB a frame at 480x360)


def features_to_keep(config: PropagationConfig) -> int:
    """Frames whose teacher features warp-refine keeps while the estimate's probes run: about a
    keyframe gap's worth (2K + 2 frames) per gap stepped together. A probe resumed from a chain
    passes the frames the other direction's chain has just passed, and a probe the frames of the
    one the other way; a fixed count keeps memory independent of the drive's length."""
    return (2 * config.max_distance + 2) * max(1, config.chains_per_batch() // 2)


class StoreSequenceInputs:
    """:class:`models.propagation.SequenceInputs` read lazily from a stored sequence."""

    def __init__(self, seq: Sequence, flow_name: str | None, need_teacher: bool,
                 feature_teacher: SemanticTeacher | None = None, keep_features: int = 0) -> None:
        """``feature_teacher``: computes the teacher features of a frame on demand (warp-refine);
        the last ``keep_features`` frames' are kept (up to ``FEATURE_CACHE_BYTES``) for frames asked
        for again (:func:`features_to_keep`)."""
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
        self._keep_frames = keep_features
        self._features_kept: dict[int, torch.Tensor] = {}  # frame -> (1, F, h, w), oldest first
        self._features_bytes = 0
        # features the teacher stage kept in this process for this very teacher output (and teacher)
        self._scratch = feature_scratch.find(seq.store.url, seq.id, seq.stages.get(TEACHER, {}).get("at"),
                                             feature_teacher) if feature_teacher is not None else None
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
        """float (B, F, h, w) teacher features of frames ``ts``, one batched forward pass for those
        neither kept from an earlier call (the most recent ``keep_features`` frames') nor by this
        process's teacher stage (:mod:`storage.feature_scratch`); left where and as the teacher made
        them (its device, channels_last), which is where the refiner wants them."""
        assert self._feature_teacher is not None
        found = {t: self._features_kept[t] for t in ts if t in self._features_kept}  # before new ones push them out
        if self._scratch is not None and len(found) < len(ts):
            found.update(self._scratch.get([t for t in ts if t not in found]))
        missing = [t for t in dict.fromkeys(ts) if t not in found]
        if not missing:
            return torch.cat([found[t] for t in ts])
        computed = self._feature_teacher.predict_features(np.stack([self.frame(t) for t in missing]))
        for i, t in enumerate(missing):  # views, no copy: a batch's memory goes when its last frame does
            found[t] = computed[i:i + 1]
            self._keep_features(t, found[t])
        return computed if missing == ts else torch.cat([found[t] for t in ts])

    def _keep_features(self, t: int, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if self._keep_frames < 1 or size > FEATURE_CACHE_BYTES:
            return
        while self._features_kept and (len(self._features_kept) >= self._keep_frames
                                       or self._features_bytes + size > FEATURE_CACHE_BYTES):
            oldest = self._features_kept.pop(next(iter(self._features_kept)))
            self._features_bytes -= oldest.numel() * oldest.element_size()
        self._features_kept[t] = features
        self._features_bytes += size

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
    return propagate_methods(store, seq_id, [config], flow_name, on_step=on_step, refiner=refiner,
                             refiner_sha256=refiner_sha256, feature_teacher=feature_teacher)[0]


def inputs_for_methods(seq: Sequence, configs: list[PropagationConfig], flow_name: str | None,
                       feature_teacher: SemanticTeacher | None, probes: bool = False) -> StoreSequenceInputs:
    """What the methods of ``configs`` read from ``seq`` (flow, teacher output, features as they need);
    with ``probes`` (the estimate's run on them), recent teacher features are kept for reuse."""
    classes = [method_class(c.method) for c in configs]
    return StoreSequenceInputs(seq, flow_name if any(c.needs_flow for c in classes) else None,
                               any(c.needs_teacher for c in classes),
                               feature_teacher if any(c.needs_refiner for c in classes) else None,
                               features_to_keep(configs[0]) if probes else 0)


class _SequenceResults:
    """One method's new results of a whole sequence, written frame by frame into ``out``."""

    def __init__(self, seq: Sequence, config: PropagationConfig, out: StageOutput, settings: dict[str, Any],
                 annotations: dict[int, str], windows: list[tuple[int, int]] | None) -> None:
        self.seq, self.config, self.out, self.settings = seq, config, out, settings
        self.annotations, self.windows = annotations, windows
        shape, dims, ignore = (seq.height, seq.width), ("T", "H", "W"), seq.store.classes.ignore_index
        self.labels = FrameArrayWriter(out.group, "labels", shape, "uint8", seq.num_frames, StoreLayout(), ignore, dims)
        self.confidence = FrameArrayWriter(out.group, "confidence", shape, "uint8", seq.num_frames, StoreLayout(), 0,
                                           dims)
        self.distance = np.full(seq.num_frames, -1, dtype=DISTANCE_DTYPE)

    def append(self, frame: OutputFrame) -> None:
        self.labels.append(frame.labels)
        self.confidence.append(frame.confidence)
        self.distance[frame.t] = frame.distance

    def publish(self) -> None:
        self.labels.close()
        self.confidence.close()
        dist = self.out.group.create_array("distance", shape=(self.seq.num_frames,), chunks=(self.seq.num_frames,),
                                           dtype=DISTANCE_DTYPE, fill_value=-1, overwrite=True,
                                           dimension_names=("T",), config=WRITE_EVERY_CHUNK)
        dist[:] = self.distance
        relabelled = self.seq.num_frames if self.windows is None else sum(b - a - 1 for a, b in self.windows)
        self.out.publish({"settings": self.settings, "reached": int((self.distance > 0).sum()),
                          "annotations": {str(t): fp for t, fp in self.annotations.items()},
                          "relabelled_frames": relabelled, "partial": self.windows is not None})


def _due_results(seq: Sequence, config: PropagationConfig, out: StageOutput, inputs: StoreSequenceInputs,
                 flow_name: str | None, refiner_sha256: str | None) -> _SequenceResults | None:
    """The results ``config`` has to write now (with the windows to relabel after added keyframes),
    or None when the stored ones have exactly these settings."""
    settings = expected_settings(seq, config, flow_name, refiner_sha256)
    previous = seq.stages.get(results_stage(config.method), {})
    if previous.get("settings") == settings:
        return None
    annotations = _annotations(seq)
    return _SequenceResults(seq, config, out, settings, annotations,
                            _relabel_windows(seq, previous, settings, annotations))


def _annotations(seq: Sequence) -> dict[int, str]:
    """Annotated frame -> fingerprint of its annotation."""
    return {int(t): annotation_fingerprint(seq.annotation(int(t))) for t in np.flatnonzero(seq.annotated)}


def _relabel_windows(seq: Sequence, previous: dict[str, Any], settings: dict[str, Any],
                     annotations: dict[int, str]) -> list[tuple[int, int]] | None:
    """Where the stored results ``previous`` differ from ``settings`` only by added keyframes, the
    windows around them to propagate again (:func:`~models.propagation.affected_windows`); else None
    (the whole sequence)."""
    if {k: v for k, v in previous.get("settings", {}).items() if k != "keyframes"} == \
            {k: v for k, v in settings.items() if k != "keyframes"} and "annotations" in previous:
        return affected_windows({int(t): fp for t, fp in previous["annotations"].items()}, annotations,
                                seq.num_frames)
    return None


def propagates_whole(seq: Sequence, config: PropagationConfig, flow_name: str | None,
                     refiner_sha256: str | None = None) -> bool:
    """True when labelling ``seq`` with ``config`` now propagates the whole sequence (its results are
    due, and not just in windows around added keyframes)."""
    settings = expected_settings(seq, config, flow_name, refiner_sha256)
    previous = seq.stages.get(results_stage(config.method), {})
    return previous.get("settings") != settings and \
        _relabel_windows(seq, previous, settings, _annotations(seq)) is None


def propagate_methods(
    store: SequenceStore,
    seq_id: str,
    configs: list[PropagationConfig],
    flow_name: str | None,
    *,
    on_step: Callable[[], None] | None = None,
    refiner: Refiner | None = None,
    refiner_sha256: str | None = None,
    feature_teacher: SemanticTeacher | None = None,
    whole_drive: Callable[[list[PropagationConfig], StoreSequenceInputs], OnChains | None] | None = None,
) -> list[bool]:
    """:func:`propagate_sequence` for several methods (same K) at once; per method, whether it computed.

    Methods that relabel the same frames (the whole sequence, or the same windows around added
    keyframes) run in one pass (:func:`~models.propagation.propagate_frames_together`: each step's
    inputs read once, one trust check for warp-inpaint and warp-refine), with exactly the labels
    each gets alone. Holds every method's
    lease (taken in stage-name order, so concurrent runs cannot deadlock); each method's results
    are published when all are written. ``whole_drive``, given the methods propagated over the whole
    sequence and their inputs, may return an ``on_chains`` for that pass (the estimate's probes
    resume from its chains: :func:`tasks.estimate.propagate_and_estimate`).
    """
    stages = [results_stage(c.method) for c in configs]
    if len(set(stages)) != len(stages):
        raise StoreError(f"sequence {seq_id!r}: a method is given twice in {[c.method for c in configs]}")
    with ExitStack() as held:
        outs = {stage: held.enter_context(store.writing(seq_id, stage)) for stage in sorted(stages)}
        seq = store.writable_sequence(seq_id)
        inputs = inputs_for_methods(seq, configs, flow_name, feature_teacher, probes=whole_drive is not None)
        due = [_due_results(seq, config, outs[stage], inputs, flow_name, refiner_sha256)
               for config, stage in zip(configs, stages)]
        # methods relabelling the same frames (all of them, or the same windows) run together
        together: dict[tuple[tuple[int, int], ...] | None, list[_SequenceResults]] = {}
        for results in due:
            if results is not None:
                together.setdefault(None if results.windows is None else tuple(results.windows), []).append(results)
        for windows, group in together.items():
            group_configs = [r.config for r in group]
            frames = (propagate_frames_together(inputs, group_configs, on_step, refiner,
                                                group_configs[0].chains_per_batch(),
                                                on_chains=whole_drive(group_configs, inputs) if whole_drive else None)
                      if windows is None else _partial_frames(seq, group_configs, inputs, list(windows), on_step,
                                                               refiner))
            for outputs in _releasing_memory(frames):
                for results, frame in zip(group, outputs):
                    results.append(frame)
        for results in due:
            if results is not None:
                results.publish()
    return [r is not None for r in due]


def _releasing_memory(frames: Iterable[T]) -> Iterator[T]:
    """``frames`` as they come, handing the allocator's free pages back after every
    ``RELEASE_EVERY_FRAMES`` of them (:func:`autolabel.runtime.release_free_memory`: a long drive's
    high-water RSS stays flat)."""
    for i, item in enumerate(frames, 1):
        yield item
        if i % RELEASE_EVERY_FRAMES == 0:
            release_free_memory()


def _partial_frames(seq: Sequence, configs: list[PropagationConfig], inputs: StoreSequenceInputs,
                    windows: list[tuple[int, int]], on_step: Callable[[], None] | None,
                    refiner: Refiner | None) -> Iterator[list[OutputFrame]]:
    """Every frame in time order, one output per method: its stored results outside ``windows``,
    propagated again inside them (the methods together, :func:`propagate_frames_together`)."""
    stored = []
    for config in configs:
        labels_name, conf_name, distance_name = result_array_names(config.method)
        stored.append((seq.array(labels_name), seq.array(conf_name), np.asarray(seq.array(distance_name)[:])))

    def kept(t: int) -> list[OutputFrame]:
        return [OutputFrame(t, np.asarray(labels[t]), np.asarray(conf[t]), int(distance[t]))
                for labels, conf, distance in stored]

    t = 0
    for a, b in windows:
        while t < a:
            yield kept(t)
            t += 1
        for frames in propagate_frames_together(WindowInputs(inputs, a, b + 1), configs, on_step, refiner,
                                                configs[0].chains_per_batch()):
            yield [OutputFrame(f.t + a, f.labels, f.confidence, f.distance) for f in frames]
        t = b + 1
    while t < seq.num_frames:
        yield kept(t)
        t += 1


def _result_arrays(group: Any, seq: Sequence) -> None:
    """Full-length, empty result arrays of a segmented drive (distance chunked by shard: one writer each)."""
    shape, dims, ignore = (seq.height, seq.width), ("T", "H", "W"), seq.store.classes.ignore_index
    FrameArrayWriter(group, "labels", shape, "uint8", seq.num_frames, StoreLayout(), ignore, dims)
    FrameArrayWriter(group, "confidence", shape, "uint8", seq.num_frames, StoreLayout(), 0, dims)
    chunk = StoreLayout().shard_length(seq.num_frames) or seq.num_frames
    group.create_array("distance", shape=(seq.num_frames,), chunks=(chunk,), dtype=DISTANCE_DTYPE, fill_value=-1,
                       overwrite=True, dimension_names=("T",), config=WRITE_EVERY_CHUNK)


class _SegmentResults:
    """One method's labels of the frames a segment owns, written into the drive's shared new version."""

    def __init__(self, seq: Sequence, config: PropagationConfig, settings: dict[str, Any], shared: SegmentedStage,
                 segment: Segment) -> None:
        self.seq, self.config, self.settings, self.shared, self.segment = seq, config, settings, shared, segment
        self.labels = RangeWriter(shared.group["labels"], segment.start)  # type: ignore[arg-type]
        self.confidence = RangeWriter(shared.group["confidence"], segment.start)  # type: ignore[arg-type]
        self.distance = np.full(segment.frames, -1, dtype=DISTANCE_DTYPE)

    def append(self, frame: OutputFrame) -> None:
        """``frame`` numbered within the segment's span."""
        self.labels.append(frame.labels)
        self.confidence.append(frame.confidence)
        self.distance[frame.t + self.segment.span_start - self.segment.start] = frame.distance

    def finish(self, keyframes: dict[str, str]) -> None:
        segment, seq = self.segment, self.seq
        if self.labels.close() != segment.frames or self.confidence.close() != segment.frames:
            raise StoreError(f"sequence {seq.id!r}: segment {segment.index} produced {self.labels.count} of its "
                             f"{segment.frames} frames")
        self.shared.group["distance"].with_config(WRITE_EVERY_CHUNK)[segment.start:segment.stop] = \
            self.distance  # type: ignore[union-attr]
        settings = self.settings

        def combine(infos: list[dict[str, Any]]) -> dict[str, Any]:
            return {"settings": settings, "reached": sum(i["reached"] for i in infos),
                    "annotations": {t: fp for i in infos for t, fp in i["annotations"].items()},
                    "relabelled_frames": seq.num_frames, "partial": False}

        self.shared.finish(segment.index, {"reached": int((self.distance > 0).sum()), "annotations": keyframes},
                           combine)


def propagate_segment_methods(
    store: SequenceStore,
    seq_id: str,
    configs: list[PropagationConfig],
    flow_name: str | None,
    segment: Segment,
    plan_key: str,
    segments: int,
    *,
    on_step: Callable[[], None] | None = None,
    refiner: Refiner | None = None,
    refiner_sha256: str | None = None,
    feature_teacher: SemanticTeacher | None = None,
) -> list[bool]:
    """Labels of the frames ``segment`` owns, propagated over its span, into the drive's shared new
    version, for each method of ``configs`` (same K) in one pass
    (:func:`~models.propagation.propagate_frames_together`); per method, whether it computed.

    Gives exactly the labels :func:`propagate_methods` gives those frames (a frame depends only on
    the keyframes around it; ``models.segments``). Needs the drive's flow and teacher stages
    published. The job that writes a method's last segment publishes its stage.
    """
    seq = store.sequence(seq_id)
    inputs = inputs_for_methods(seq, configs, flow_name, feature_teacher)
    due: list[_SegmentResults | None] = []
    for config in configs:
        settings = expected_settings(seq, config, flow_name, refiner_sha256)
        if seq.stages.get(results_stage(config.method), {}).get("settings") == settings:
            due.append(None)
            continue
        stage = results_stage(config.method)
        shared = SegmentedStage.open(store, seq_id, stage, stage_key(plan_key, settings), segments,
                                     lambda group: _result_arrays(group, seq),
                                     published=lambda now: now.stages.get(stage, {}).get("settings") == settings)
        due.append(None if shared is None or shared.is_done(segment.index)
                   else _SegmentResults(seq, config, settings, shared, segment))
    running = [r for r in due if r is not None]
    if running:
        window = WindowInputs(inputs, segment.span_start, segment.span_stop)
        owned = (segment.start - segment.span_start, segment.stop - segment.span_start)
        for frames in _releasing_memory(propagate_frames_together(
                window, [r.config for r in running], on_step, refiner, running[0].config.chains_per_batch(),
                frames=owned)):
            for results, frame in zip(running, frames):
                results.append(frame)
        keyframes = {str(t): annotation_fingerprint(inputs.annotation(int(t)))
                     for t in np.flatnonzero(inputs.annotated[segment.start:segment.stop]) + segment.start}
        for results in running:
            results.finish(keyframes)
    return [r is not None for r in due]
