"""Evaluation stage, the one evaluator: mIoU by propagation distance, per class and per sequence.

Scored frames (:func:`scored_frames`): ground truth present, not an annotation, reached by the
method at distance 1..K. Each sequence's frames are read one chunk (frame) at a time and reduced
to one confusion matrix per distance; the sequence's row and every pooled number come from those
matrices (summed over sequences, never averaged as mIoUs). The evaluate stage of the pipeline
stores each sequence's matrices in the store (stage ``evaluation/<method>``), so a report over
many sequences - the CLI's, the dashboard's, a benchmark's - reads no label array twice.

Every number is a percentage (0-100) rounded to two decimals; None where undefined (no frame
scored, or a class absent from ground truth and prediction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from autolabel.models.metrics import confusion_matrix, iou_per_class, mean_iou
from autolabel.models.quality import EstimateCalibration, expected_counts, expected_iou, expected_miou
from autolabel.models.segments import Segment, stage_key
from autolabel.storage.segmented import SegmentedStage
from autolabel.storage.stages import estimate_stage, evaluation_stage, result_array_names, results_stage
from autolabel.storage.store import WRITE_EVERY_CHUNK, Sequence, SequenceStore
from autolabel.wording import count
from pydantic import BaseModel, Field, computed_field


def percent(value: float | None) -> float | None:
    """A percentage rounded for reports; None for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 2)


def scored_frames(seq: Sequence, distance: np.ndarray, max_distance: int) -> np.ndarray:
    """bool (T,): frames scored against ground truth (labelled, not annotated, distance 1..K)."""
    return seq.has_gt & ~seq.annotated & (distance >= 1) & (distance <= max_distance)


def results_max_distance(seq: Sequence, method: str) -> int | None:
    """The K that ``method``'s stored results of ``seq`` were propagated with (None: not labelled)."""
    stage = seq.stages.get(results_stage(method))
    if stage is None:
        return None
    return int(stage.get("settings", {}).get("max_distance", 0)) or None


class SequenceEvaluation(BaseModel):
    """One sequence scored for one method (a dashboard row)."""

    sequence: str
    method: str
    max_distance: int
    frames: int
    annotated: int
    frames_labelled: int = Field(description="frames holding a label (annotated or reached)")
    frames_scored: int
    has_gt: bool = Field(description="whether any frame was scored against ground truth")
    miou: float | None = None
    miou_by_distance: dict[str, float | None] = Field(default_factory=dict)
    per_class_iou: dict[str, float | None] = Field(default_factory=dict)
    coverage: float | None = Field(None, description="share of pixels of reached frames holding a class")
    mean_confidence: float | None = Field(None, description="mean confidence over reached frames")
    estimated_miou: float | None = Field(None, description="mIoU estimated without ground truth (cycles)")
    estimated_miou_by_distance: dict[str, float | None] = Field(default_factory=dict)
    estimated_per_class_iou: dict[str, float | None] = Field(default_factory=dict)
    estimate_basis: str | None = Field(None, description="what the estimate rests on, or why there is none")
    worst_frames: list[tuple[int, float | None, float | None]] = Field(
        default_factory=list, description="up to 5 (frame, estimated %, true % of pixels right) lowest first")
    confusion: dict[str, list[list[int]]] = Field(
        default_factory=dict, exclude=True, repr=False,
        description="(C, C+1) confusion matrix per distance; kept for pooling, left out of reports")
    expected: dict[str, list[list[float]]] = Field(
        default_factory=dict, exclude=True, repr=False,
        description="(C, 3) expected TP / predicted / true counts per distance (models.quality); for pooling")

    def confusions(self) -> dict[int, np.ndarray]:
        return {int(d): np.asarray(cm, dtype=np.int64) for d, cm in self.confusion.items()}

    def expectations(self) -> dict[int, np.ndarray]:
        return {int(d): np.asarray(e, dtype=np.float64) for d, e in self.expected.items()}


class MethodEvaluation(BaseModel):
    """One method pooled over sequences."""

    method: str
    miou_mean: float | None = Field(description="mean of the mIoU at each distance 1..K that was scored")
    miou_by_distance: dict[str, float | None]
    per_class_iou: dict[str, float | None]
    frames_scored: int
    estimated_miou_mean: float | None = Field(None, description="estimated mIoU, mean over distances, all sequences")
    estimated_miou_by_distance: dict[str, float | None] = Field(default_factory=dict)
    estimated_per_class_iou: dict[str, float | None] = Field(default_factory=dict)
    sequences: list[SequenceEvaluation]
    sequences_missing: list[str] = Field(description="selected sequences with no results of this method")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def per_sequence_miou(self) -> dict[str, float | None]:
        return {s.sequence: s.miou for s in self.sequences if s.has_gt}

    @computed_field  # type: ignore[prop-decorator]
    @property
    def estimated_per_sequence_miou(self) -> dict[str, float | None]:
        return {s.sequence: s.estimated_miou for s in self.sequences}


class EvaluationReport(BaseModel):
    """What ``autolabel evaluate --json`` writes, the dashboard shows and the benchmarks record."""

    store: str
    max_distance: int
    methods: dict[str, MethodEvaluation]


def _class_ious(cm: np.ndarray, names: list[str]) -> dict[str, float | None]:
    return {n: percent(v * 100) for n, v in zip(names, iou_per_class(cm))}


def _class_ious_expected(counts: np.ndarray, names: list[str]) -> dict[str, float | None]:
    return {n: percent(v * 100) for n, v in zip(names, expected_iou(counts))}


def sequence_calibration(seq: Sequence, method: str) -> tuple[EstimateCalibration | None, str]:
    """The estimate stage's calibration of ``method`` on ``seq`` and a one-line basis (or why none)."""
    record = seq.stages.get(estimate_stage(method))
    results = seq.stages.get(results_stage(method), {})
    if record is None:
        return None, "no estimate: label with the estimate enabled (the default) to run the cycles"
    if record.get("settings", {}).get("results_finished_at") != results.get("finished_at"):
        return None, "no estimate: the results changed since the cycles ran; label again"
    cal = EstimateCalibration.from_record(record["calibration"])
    if cal.probes == 0:
        why = (f"all {cal.excluded} keyframes were the refiner's training keyframes" if cal.excluded
               else "no keyframe has neighbouring frames")
        return None, f"no estimate: {why}"
    what = "held-out keyframe chains" if cal.kind == "held-out" else "cycles (optimistic: they come back)"
    basis = f"{cal.probes} {what} over {count(len(cal.keyframes), 'keyframe')}"
    if cal.excluded:
        basis += f"; {count(cal.excluded, 'keyframe')} left out (the refiner trained on them)"
    if record.get("teacher_adapted"):
        basis += "; the teacher was adapted on these keyframes (optimistic)"
    return cal, basis


READ_BLOCK = 16  # frames read at once (a shard of StoreLayout's default)
EXPECTED_SCALE = 2.0 ** 16  # expected counts add up in fixed point: the same sums in any order (segments)


@dataclass
class FrameTally:
    """What scoring some frames of one sequence adds up; tallies of disjoint frame ranges add.

    ``confusion``: (C, C+1) int64 per distance; ``expected``: (C, 3) expected counts per distance in
    fixed point (``EXPECTED_SCALE``), before the calibration's correction; ``worst``: the 5 lowest
    (frame, estimated %, true %) of the range.
    """

    confusion: dict[int, np.ndarray] = field(default_factory=dict)
    expected: dict[int, np.ndarray] = field(default_factory=dict)
    covered: int = 0
    pixels: int = 0
    confidence: int = 0
    worst: list[tuple[int, float | None, float | None]] = field(default_factory=list)

    def __add__(self, other: FrameTally) -> FrameTally:
        def merged(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
            return {d: a[d] + b[d] if d in a and d in b else (a[d] if d in a else b[d]) for d in sorted({*a, *b})}

        return FrameTally(merged(self.confusion, other.confusion), merged(self.expected, other.expected),
                          self.covered + other.covered, self.pixels + other.pixels,
                          self.confidence + other.confidence, _worst(self.worst + other.worst))

    def to_json(self) -> dict[str, Any]:
        return {"confusion": {str(d): cm.tolist() for d, cm in self.confusion.items()},
                "expected": {str(d): e.tolist() for d, e in self.expected.items()},
                "covered": self.covered, "pixels": self.pixels, "confidence": self.confidence,
                "worst": [list(w) for w in self.worst]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FrameTally:
        return cls({int(d): np.asarray(cm, np.int64) for d, cm in data["confusion"].items()},
                   {int(d): np.asarray(e, np.int64) for d, e in data["expected"].items()},
                   int(data["covered"]), int(data["pixels"]), int(data["confidence"]),
                   [(int(t), e, r) for t, e, r in data["worst"]])


def _worst(scores: list[tuple[int, float | None, float | None]]) -> list[tuple[int, float | None, float | None]]:
    """The 5 lowest frames (true % where known, else estimated %), earlier frames first among equals."""
    return sorted(scores, key=lambda f: (f[2] if f[2] is not None else f[1], f[0]))[:5]


def tally_frames(seq: Sequence, method: str, max_distance: int, calibration: EstimateCalibration | None,
                 frames: tuple[int, int] | None = None, on_frame: Callable[[], None] | None = None) -> FrameTally:
    """Score the stored results of ``method`` on the frames ``start..stop-1`` of ``seq`` (default: all).

    Reads ``READ_BLOCK`` frames at a time (one shard); frames the method did not reach add nothing.
    ``on_frame`` is called once per frame of the range, reached or not.
    """
    classes = seq.store.classes
    c, ignore = classes.num_classes, classes.ignore_index
    labels_name, conf_name, distance_name = result_array_names(method)
    labels, conf = seq.array(labels_name), seq.array(conf_name)
    start, stop = frames or (0, seq.num_frames)
    distance = np.asarray(seq.array(distance_name)[start:stop])
    scored = scored_frames(seq, np.asarray(seq.array(distance_name)[:]), max_distance)
    tally = FrameTally()
    scores: list[tuple[int, float | None, float | None]] = []
    reached = np.flatnonzero(distance >= 1) + start
    for block_start in range(start, stop, READ_BLOCK):  # one read per array and block, not per frame
        mine = reached[(reached >= block_start) & (reached < block_start + READ_BLOCK)]
        if not len(mine):
            continue
        a, b = int(mine[0]), int(mine[-1]) + 1
        block_labels, block_conf = np.asarray(labels[a:b]), np.asarray(conf[a:b])
        block_gt = seq.ground_truths(a, b) if scored[a:b].any() else None
        for t in mine:
            t = int(t)
            lab, frame_conf = block_labels[t - a], block_conf[t - a]
            tally.covered += int((lab != ignore).sum())
            tally.pixels += lab.size
            tally.confidence += int(frame_conf.sum(dtype=np.int64))
            d = int(distance[t - start])
            right = estimated = None
            if scored[t]:
                assert block_gt is not None
                cm = confusion_matrix(block_gt[t - a], lab, c, ignore)
                tally.confusion[d] = tally.confusion[d] + cm if d in tally.confusion else cm
                right = percent(100 * np.trace(cm[:, :c]) / max(int(cm.sum()), 1))
            if calibration is not None and d <= max_distance:
                prob = calibration.calibration.of_stored(frame_conf, lab, ignore)
                e = np.round(expected_counts(lab, prob, c, ignore, calibration.spread) * EXPECTED_SCALE).astype(np.int64)
                tally.expected[d] = tally.expected[d] + e if d in tally.expected else e
                estimated = percent(100 * float(prob.mean()))
            if right is not None or estimated is not None:
                scores.append((t, estimated, right))
            if on_frame is not None:
                on_frame()
    if on_frame is not None:  # frames the method did not reach are done too: the progress ends at its total
        for _ in range(stop - start - len(reached)):
            on_frame()
    tally.worst = _worst(scores)
    return tally


def sequence_row(seq: Sequence, method: str, max_distance: int, tally: FrameTally,
                 calibration: EstimateCalibration | None, basis: str) -> SequenceEvaluation:
    """The sequence's evaluation from the tally of all its frames."""
    classes = seq.store.classes
    distance = np.asarray(seq.array(result_array_names(method)[2])[:])
    scored = scored_frames(seq, distance, max_distance)
    expected = {d: e / EXPECTED_SCALE for d, e in tally.expected.items()}
    if calibration is not None:  # the deficit ratio: errors concentrate more than confidence says
        expected = {d: calibration.correct_counts(e) for d, e in expected.items()}
    by_d, pixels = tally.confusion, tally.pixels
    row = SequenceEvaluation(
        sequence=seq.id, method=method, max_distance=max_distance, frames=seq.num_frames,
        annotated=int(seq.annotated.sum()), frames_labelled=int((distance >= 0).sum()),
        frames_scored=int(scored.sum()), has_gt=bool(by_d),
        coverage=percent(100 * tally.covered / pixels) if pixels else None,
        mean_confidence=percent(100 * tally.confidence / 255 / pixels) if pixels else None,
        confusion={str(d): cm.tolist() for d, cm in sorted(by_d.items())},
        expected={str(d): e.round(3).tolist() for d, e in sorted(expected.items())},
        estimate_basis=basis, worst_frames=tally.worst,
    )
    if expected:
        pooled_e = sum(expected.values())
        row.estimated_miou = percent(expected_miou(pooled_e))
        row.estimated_miou_by_distance = {str(d): percent(expected_miou(e)) for d, e in sorted(expected.items())}
        row.estimated_per_class_iou = _class_ious_expected(pooled_e, classes.names)
    if by_d:
        pooled = sum(by_d.values())
        row.miou = percent(mean_iou(pooled))
        row.miou_by_distance = {str(d): percent(mean_iou(cm)) for d, cm in sorted(by_d.items())}
        row.per_class_iou = _class_ious(pooled, classes.names)
    return row


def score_sequence(seq: Sequence, method: str, max_distance: int,
                   on_frame: Callable[[], None] | None = None) -> SequenceEvaluation:
    """Score the stored results of ``method`` on ``seq``, reading one frame at a time.

    Needs the method's results stage to be done. Without ground truth the row still carries
    frames labelled, coverage and mean confidence.
    """
    calibration, basis = sequence_calibration(seq, method)
    tally = tally_frames(seq, method, max_distance, calibration, None, on_frame)
    return sequence_row(seq, method, max_distance, tally, calibration, basis)


def _evaluation_settings(seq: Sequence, method: str, max_distance: int) -> dict[str, Any]:
    """What a stored evaluation depends on: the results it scored (when they were finished) and K."""
    results = seq.stages.get(results_stage(method), {})
    estimate = seq.stages.get(estimate_stage(method), {})
    return {"results_finished_at": results.get("finished_at"), "max_distance": max_distance,
            "estimate_finished_at": estimate.get("finished_at")}


def stored_evaluation(seq: Sequence, method: str, max_distance: int) -> SequenceEvaluation | None:
    """The evaluation the evaluate stage stored for these results and K, or None when it is not current."""
    stage = seq.stages.get(evaluation_stage(method))
    if stage is None or stage.get("settings") != _evaluation_settings(seq, method, max_distance):
        return None
    return SequenceEvaluation(**stage["evaluation"], confusion=stage["confusion"], expected=stage.get("expected", {}))


def evaluation_is_current(seq: Sequence, methods: Iterable[str], max_distance: int) -> bool:
    return all(stored_evaluation(seq, m, max_distance) is not None for m in methods)


def evaluate_sequence(store: SequenceStore, seq_id: str, methods: Iterable[str], max_distance: int,
                      on_frame: Callable[[], None] | None = None) -> list[SequenceEvaluation]:
    """The evaluate stage: score each method's results of ``seq_id`` and store the matrices.

    A method whose stored evaluation is current is not scored again.
    """
    rows = []
    for method in methods:
        with store.lease(seq_id, evaluation_stage(method)):
            seq = store.writable_sequence(seq_id)
            row = stored_evaluation(seq, method, max_distance)
            if row is None:
                row = score_sequence(seq, method, max_distance, on_frame)
                store.mark_stage_done(seq_id, evaluation_stage(method), {
                    "settings": _evaluation_settings(seq, method, max_distance),
                    "evaluation": row.model_dump(), "confusion": row.confusion, "expected": row.expected})
        rows.append(row)
    return rows


def _tally_arrays(group: Any, segments: int, max_distance: int, num_classes: int) -> None:
    """Each segment's confusion and expected counts, one chunk (row) per segment: one writer each."""
    c, k = num_classes, max_distance
    for name, shape in (("confusion", (k, c, c + 1)), ("expected", (k, c, 3))):
        group.create_array(name, shape=(segments, *shape), chunks=(1, *shape), dtype="int64", fill_value=0,
                           overwrite=True, config=WRITE_EVERY_CHUNK)


def _segment_tally(group: Any, index: int, info: dict[str, Any]) -> FrameTally:
    confusion, expected = np.asarray(group["confusion"][index]), np.asarray(group["expected"][index])
    return FrameTally({d: confusion[d - 1] for d in info["confusion"]}, {d: expected[d - 1] for d in info["expected"]},
                      info["covered"], info["pixels"], info["confidence"],
                      [(int(t), e, r) for t, e, r in info["worst"]])


def evaluate_segment(store: SequenceStore, seq_id: str, methods: Iterable[str], max_distance: int,
                     segment: Segment, plan_key: str, segments: int,
                     on_frame: Callable[[], None] | None = None) -> bool:
    """The evaluate stage for the frames ``segment`` owns; the job finishing the last segment publishes it.

    Each segment tallies its frames (:func:`tally_frames`) into its row of the stage's shared
    version; the publisher adds the rows up into the very evaluation :func:`evaluate_sequence` gives
    (integer tallies: the order of the additions does not matter). Needs the methods' results (and
    estimates, where enabled) published. Returns whether anything was computed.
    """
    computed = False
    c = store.classes.num_classes
    for method in methods:
        seq = store.sequence(seq_id)
        if stored_evaluation(seq, method, max_distance) is not None:
            continue
        settings = _evaluation_settings(seq, method, max_distance)
        stage = evaluation_stage(method)
        shared = SegmentedStage.open(
            store, seq_id, stage, stage_key(plan_key, settings), segments,
            lambda group: _tally_arrays(group, segments, max_distance, c),
            published=lambda now, m=method: stored_evaluation(now, m, max_distance) is not None)
        if shared is None or shared.is_done(segment.index):
            continue
        calibration, basis = sequence_calibration(seq, method)
        tally = tally_frames(seq, method, max_distance, calibration, (segment.start, segment.stop), on_frame)
        group = shared.group
        for name, parts, shape in (("confusion", tally.confusion, (c, c + 1)), ("expected", tally.expected, (c, 3))):
            rows = np.zeros((max_distance, *shape), np.int64)
            for d, part in parts.items():
                rows[d - 1] = part
            group[name].with_config(WRITE_EVERY_CHUNK)[segment.index] = rows  # type: ignore[union-attr]
        info = {"confusion": sorted(tally.confusion), "expected": sorted(tally.expected), "covered": tally.covered,
                "pixels": tally.pixels, "confidence": tally.confidence, "worst": [list(w) for w in tally.worst]}

        def combine(infos: list[dict[str, Any]], seq: Sequence = seq, method: str = method,
                    calibration: EstimateCalibration | None = calibration, basis: str = basis,
                    settings: dict[str, Any] = settings) -> dict[str, Any]:
            total = sum((_segment_tally(shared.group, i, part) for i, part in enumerate(infos)), FrameTally())
            row = sequence_row(seq, method, max_distance, total, calibration, basis)
            return {"settings": settings, "evaluation": row.model_dump(), "confusion": row.confusion,
                    "expected": row.expected}

        shared.finish(segment.index, info, combine)
        computed = True
    return computed


def pool(method: str, rows: list[SequenceEvaluation], missing: list[str], max_distance: int,
         class_names: list[str]) -> MethodEvaluation:
    """One method's numbers over many sequences, from the sum of their confusion matrices."""
    c = len(class_names)
    by_distance = {d: np.zeros((c, c + 1), np.int64) for d in range(1, max_distance + 1)}
    for row in rows:
        for d, cm in row.confusions().items():
            if d <= max_distance:
                by_distance[d] += cm
    expected = {d: np.zeros((c, 3), np.float64) for d in range(1, max_distance + 1)}
    for row in rows:
        for d, e in row.expectations().items():
            if d <= max_distance:
                expected[d] += e
    miou_d = {str(d): percent(mean_iou(cm)) if cm.sum() else None for d, cm in by_distance.items()}
    est_d = {str(d): percent(expected_miou(e)) if e[:, 1].sum() else None for d, e in expected.items()}
    scored = [v for v in miou_d.values() if v is not None]
    estimated = [v for v in est_d.values() if v is not None]
    return MethodEvaluation(
        method=method, miou_mean=percent(float(np.mean(scored))) if scored else None,
        miou_by_distance=miou_d, per_class_iou=_class_ious(sum(by_distance.values()), class_names),
        estimated_miou_mean=percent(float(np.mean(estimated))) if estimated else None,
        estimated_miou_by_distance=est_d,
        estimated_per_class_iou=_class_ious_expected(sum(expected.values()), class_names),
        frames_scored=sum(r.frames_scored for r in rows), sequences=rows, sequences_missing=missing)


def evaluate_store(
    store: SequenceStore,
    methods: Iterable[str],
    max_distance: int | None = None,
    sequences: Iterable[str] | None = None,
    on_sequence: Callable[[str, str], None] | None = None,
) -> EvaluationReport:
    """Score ``methods`` on the (selected) sequences of ``store``.

    Args:
        max_distance: score distances 1..K; None takes the K each method's results were made with.
        sequences: ids to score (default: all); those without results of a method are listed in
            ``sequences_missing``.
        on_sequence: called with (method, sequence id) after each sequence.

    Stored evaluations of the evaluate stage are used where current; others are scored here.
    """
    ids = list(sequences) if sequences is not None else store.sequence_ids()
    methods = list(methods)
    report_k = max_distance
    pooled: dict[str, MethodEvaluation] = {}
    for method in methods:
        rows: list[SequenceEvaluation] = []
        missing: list[str] = []
        method_k = max_distance or 1
        for seq_id in ids:
            seq = store.sequence(seq_id)
            k = max_distance or results_max_distance(seq, method)
            if k is None:
                missing.append(seq_id)
                continue
            method_k = max(method_k, k)
            row = stored_evaluation(seq, method, k) or score_sequence(seq, method, k)
            rows.append(row)
            if on_sequence is not None:
                on_sequence(method, seq_id)
        pooled[method] = pool(method, rows, missing, method_k, store.classes.names)
        report_k = max(report_k or 1, method_k)
    return EvaluationReport(store=store.url, max_distance=report_k or 1, methods=pooled)
