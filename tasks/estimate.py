"""Estimate stage: calibrate a method's confidence on probes between a sequence's keyframes.

Runs after the method's propagation with the same flow, teacher and refiner, and stores a small
record (stage ``estimate/<method>``: the calibration, the deficit ratio, the probes' confusion
matrix, which keyframes were used or left out; :mod:`models.quality`). The evaluate stage turns it into estimated mIoU
(:mod:`models.quality`). A store labelled before estimates existed gets them without relabelling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autolabel.models.propagation import PropagationConfig, create_method
from autolabel.models.quality import (
    ESTIMATE_VERSION,
    EstimateCalibration,
    EstimateConfig,
    calibrate,
)
from autolabel.models.refiner import Refiner
from autolabel.models.teacher_runtime import SemanticTeacher
from autolabel.storage.stages import estimate_stage, results_stage
from autolabel.storage.store import Sequence, SequenceStore
from autolabel.tasks.propagate import StoreSequenceInputs


def estimate_settings(seq: Sequence, method: str, config: EstimateConfig) -> dict[str, Any]:
    """What a stored estimate depends on: the results it calibrates (when finished) and the config."""
    results = seq.stages.get(results_stage(method), {})
    return {"results_finished_at": results.get("finished_at"), "config": config.model_dump(mode="json"),
            "version": ESTIMATE_VERSION}


def stored_calibration(seq: Sequence, method: str) -> EstimateCalibration | None:
    """The calibration stored for the method's current results, or None."""
    record = seq.stages.get(estimate_stage(method))
    results = seq.stages.get(results_stage(method))
    if record is None or results is None:
        return None
    if record.get("settings", {}).get("results_finished_at") != results.get("finished_at"):
        return None
    return EstimateCalibration.from_record(record["calibration"])


def estimate_is_current(seq: Sequence, method: str, config: EstimateConfig) -> bool:
    record = seq.stages.get(estimate_stage(method))
    return record is not None and record.get("settings") == estimate_settings(seq, method, config)


def estimate_sequence(store: SequenceStore, seq_id: str, config: PropagationConfig, flow_name: str | None,
                      estimate: EstimateConfig, *, refiner: Refiner | None = None,
                      feature_teacher: SemanticTeacher | None = None,
                      on_step: Callable[[], None] | None = None) -> bool:
    """Run the calibration cycles of ``config.method`` on ``seq_id`` and store them; False when current.

    Needs the method's results (the estimate belongs to them) and its input stages. Probes ending
    on a refiner's training keyframes (``train_info['keyframes']``, annotation fingerprints) are
    left out. A teacher adapted on this sequence's keyframes is noted in the record.
    """
    stage = estimate_stage(config.method)
    with store.lease(seq_id, stage):
        seq = store.writable_sequence(seq_id)
        if estimate_is_current(seq, config.method, estimate):
            return False
        method = create_method(config, refiner)
        inputs = StoreSequenceInputs(seq, flow_name if method.needs_flow else None, method.needs_teacher,
                                     feature_teacher if method.needs_refiner else None)
        skip = refiner.train_info.get("keyframes", []) if (refiner is not None and method.needs_refiner) else []
        calibration = calibrate(method, inputs, estimate, skip=skip, on_step=on_step)
        adapted = method.needs_teacher and seq.stages.get("teacher", {}).get("settings", {}).get("adapt_steps", 0) > 0
        store.mark_stage_done(seq_id, stage, {"settings": estimate_settings(seq, config.method, estimate),
                                              "calibration": calibration.record(), "teacher_adapted": adapted})
    return True

