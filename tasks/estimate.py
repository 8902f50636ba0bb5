"""Estimate stage: calibrate a method's confidence on probes between a sequence's keyframes.

Runs after the method's propagation with the same flow, teacher and refiner, and stores a small
record (stage ``estimate/<method>``: the calibration, the deficit ratio, the probes' confusion
matrix, which keyframes were used or left out; :mod:`models.quality`). The evaluate stage turns it into estimated mIoU
(:mod:`models.quality`). A store labelled before estimates existed gets them without relabelling.

A long drive's probes can be split over several jobs (:func:`estimate_part`): each runs its share
and stores the answers (labels and confidence at each probe's target) in the stage's shared
version; the job finishing the last part fits them and publishes the very record one job gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import numpy as np

from autolabel.errors import ConfigError
from autolabel.models.propagation import PropagationConfig, create_method, method_class, share_trust
from autolabel.models.quality import (
    ESTIMATE_VERSION,
    EstimateCalibration,
    EstimateConfig,
    Probe,
    ProbeAnswers,
    calibrate_together,
    estimate_plan,
    fit_probes,
    probes_to_run,
    run_probe_together,
    split_probes,
)
from autolabel.models.segments import stage_key
from autolabel.models.refiner import Refiner
from autolabel.models.teacher_runtime import SemanticTeacher
from autolabel.storage.segmented import SegmentedStage
from autolabel.storage.stages import estimate_stage, results_stage
from autolabel.storage.store import WRITE_EVERY_CHUNK, Sequence, SequenceStore
from autolabel.tasks.propagate import StoreSequenceInputs, inputs_for_methods, propagate_methods, propagates_whole


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


def estimate_methods(store: SequenceStore, seq_id: str, configs: list[PropagationConfig], flow_name: str | None,
                     estimate: EstimateConfig, *, refiner: Refiner | None = None,
                     feature_teacher: SemanticTeacher | None = None,
                     on_step: Callable[[], None] | None = None) -> list[bool]:
    """Run the probes of each method of ``configs`` (same K) on ``seq_id`` and store its calibration;
    per method, whether it computed (False: current already).

    Needs each method's results (the estimate belongs to them) and their input stages. The probes
    are stepped together (:func:`~models.quality.calibrate_together`: one trust check per step for
    warp-inpaint and warp-refine); each record is the one its method gets alone. Probes ending on
    a refiner's training keyframes (``train_info['keyframes']``, annotation fingerprints) are left
    out of that method's. A teacher adapted on this sequence's keyframes is noted in the record.
    """
    stages = [estimate_stage(c.method) for c in configs]
    with ExitStack() as held:
        for stage in sorted(set(stages)):  # in name order: concurrent runs cannot deadlock
            held.enter_context(store.lease(seq_id, stage))
        seq = store.writable_sequence(seq_id)
        due = [not estimate_is_current(seq, c.method, estimate) for c in configs]
        running = [c for c, d in zip(configs, due) if d]
        if running:
            inputs = inputs_for_methods(seq, running, flow_name, feature_teacher, probes=True)
            methods = [create_method(c, refiner) for c in running]
            skips = [_refiner_keyframes(refiner, m) for m in methods]
            calibrations = calibrate_together(methods, inputs, estimate, skips, on_step)
            for config, method, calibration in zip(running, methods, calibrations):
                _publish(store, seq, config.method, estimate, calibration, method.needs_teacher)
    return due


def _publish(store: SequenceStore, seq: Sequence, method: str, estimate: EstimateConfig,
             calibration: EstimateCalibration, needs_teacher: bool) -> None:
    """Store ``method``'s estimate record (``seq``: as it stands after its results were published)."""
    store.mark_stage_done(seq.id, estimate_stage(method),
                          {"settings": estimate_settings(seq, method, estimate), "calibration": calibration.record(),
                           "teacher_adapted": _teacher_adapted(seq, needs_teacher)})


def resumed_steps(seq: Sequence, configs: list[PropagationConfig], flow_name: str | None, estimate: EstimateConfig,
                  refiner: Refiner | None = None, refiner_sha256: str | None = None) -> int:
    """The probe steps :func:`propagate_and_estimate` adds to the propagation's (progress)."""
    group = [c for c in configs if propagates_whole(seq, c, flow_name, refiner_sha256)]
    if not group:
        return 0
    skips: list[Iterable[str] | None] = [_refiner_keyframes(refiner, method_class(c.method)) for c in group]
    return ProbeAnswers(seq, estimate, group[0].max_distance, skips).steps(resumed=True)


def propagate_and_estimate(store: SequenceStore, seq_id: str, configs: list[PropagationConfig],
                           flow_name: str | None, estimate: EstimateConfig, *,
                           on_step: Callable[[], None] | None = None, refiner: Refiner | None = None,
                           refiner_sha256: str | None = None, feature_teacher: SemanticTeacher | None = None
                           ) -> tuple[list[bool], list[bool]]:
    """:func:`~tasks.propagate.propagate_methods`, and the estimate of each method it propagates over
    the whole sequence in the same pass; per method, whether its results and whether its estimate
    were computed.

    A held-out probe starts exactly as the propagation's chain from its keyframe, so it resumes
    from that chain's final state (:class:`~models.quality.ProbeAnswers`): at K = 10 and keyframes
    21 apart about half the estimate's steps, and each step's inputs already at hand. The records
    are the ones :func:`estimate_methods` writes (tests check them equal), so the estimate stage
    then finds them current; after added keyframes (windows relabelled) it runs on its own as
    before. Holds the estimate leases, taken before the results' (stage-name order).
    """
    fused: list[tuple[list[PropagationConfig], StoreSequenceInputs, ProbeAnswers]] = []

    def resume(group: list[PropagationConfig], inputs: StoreSequenceInputs) -> ProbeAnswers:
        skips: list[Iterable[str] | None] = [_refiner_keyframes(refiner, method_class(c.method)) for c in group]
        # resumed probes stepped as the chains are: a gap's two at a time on CPU, a batch's worth on CUDA
        answers = ProbeAnswers(inputs, estimate, group[0].max_distance, skips, on_step,
                               batch=max(2, group[0].chains_per_batch()))
        fused.append((group, inputs, answers))
        return answers

    estimated = [False] * len(configs)
    with ExitStack() as held:
        for stage in sorted({estimate_stage(c.method) for c in configs}):
            held.enter_context(store.lease(seq_id, stage))
        computed = propagate_methods(store, seq_id, configs, flow_name, on_step=on_step, refiner=refiner,
                                     refiner_sha256=refiner_sha256, feature_teacher=feature_teacher,
                                     whole_drive=resume)
        seq = store.writable_sequence(seq_id)  # with the results just published: the records name them
        for group, inputs, answers in fused:
            methods = [create_method(c, refiner) for c in group]
            share_trust(methods)
            for config, method, calibration in zip(group, methods, answers.calibrations(methods, inputs)):
                assert calibration is not None  # every method of the group wanted its estimate
                _publish(store, seq, config.method, estimate, calibration, method.needs_teacher)
                estimated[configs.index(config)] = True
    return computed, estimated


def _refiner_keyframes(refiner: Refiner | None, method: Any) -> list[str]:
    """Annotation fingerprints of the keyframes the refiner trained on (probes ending there are left out)."""
    return refiner.train_info.get("keyframes", []) if (refiner is not None and method.needs_refiner) else []


def _teacher_adapted(seq: Sequence, needs_teacher: bool) -> bool:
    return needs_teacher and seq.stages.get("teacher", {}).get("settings", {}).get("adapt_steps", 0) > 0


def estimate_parts(seq: Sequence, config: PropagationConfig, estimate: EstimateConfig, most: int) -> int:
    """How many jobs share the drive's probes: at most ``most`` (and one per probe at most; at least one)."""
    return max(1, min(most, len(estimate_plan(seq.annotated, estimate, config.max_distance))))


def _answer_arrays(group: Any, plan: list[Probe], height: int, width: int) -> None:
    """Each probe's answer at its target, one chunk per probe: one writer each."""
    for name, dtype in (("labels", "uint8"), ("confidence", "float32")):
        group.create_array(name, shape=(max(len(plan), 1), height, width), chunks=(1, height, width),
                           dtype=dtype, fill_value=0, overwrite=True, config=WRITE_EVERY_CHUNK)


def estimate_part(store: SequenceStore, seq_id: str, configs: list[PropagationConfig], flow_name: str | None,
                  estimate: EstimateConfig, part: int, parts: int, plan_key: str, *,
                  refiner: Refiner | None = None, feature_teacher: SemanticTeacher | None = None,
                  on_step: Callable[[], None] | None = None) -> list[bool]:
    """Run part ``part`` of ``parts`` of the probes of each method of ``configs`` (same K) on ``seq_id``
    (a long drive's job); per method, whether it ran anything.

    The probes are dealt to the parts by :func:`~models.quality.split_probes`; this part stores
    its probes' answers in each method's shared version of its stage, and the job finishing a
    method's last part fits all of them and publishes the record :func:`estimate_methods` would
    (the fit reads the answers in plan order: which job ran a probe changes nothing). The methods
    whose part is due step each probe together (:func:`~models.quality.run_probe_together`: one
    trust check per step for warp-inpaint and warp-refine), as :func:`estimate_methods` does.
    """
    if len({c.max_distance for c in configs}) > 1:
        raise ConfigError("methods estimated together need the same K (max_distance), got "
                          f"{[c.max_distance for c in configs]}")
    seq = store.sequence(seq_id)
    plan = estimate_plan(seq.annotated, estimate, configs[0].max_distance)
    due: list[tuple[int, PropagationConfig, dict[str, Any], SegmentedStage]] = []
    for index, config in enumerate(configs):
        if estimate_is_current(seq, config.method, estimate):
            continue
        settings = estimate_settings(seq, config.method, estimate)
        shared = SegmentedStage.open(store, seq_id, estimate_stage(config.method),
                                     stage_key(plan_key, {**settings, "parts": parts}), parts,
                                     lambda group: _answer_arrays(group, plan, seq.height, seq.width),
                                     published=lambda now, m=config.method: estimate_is_current(now, m, estimate))
        if shared is not None and not shared.is_done(part):
            due.append((index, config, settings, shared))
    ran = [False] * len(configs)
    if not due:
        return ran
    inputs = inputs_for_methods(seq, [config for _, config, _, _ in due], flow_name, feature_teacher, probes=True)
    methods = [create_method(config, refiner) for _, config, _, _ in due]
    share_trust(methods)
    kept_excluded = [probes_to_run(plan, inputs, _refiner_keyframes(refiner, method)) for method in methods]
    mine = split_probes(plan, parts)[part]
    for i in mine:
        who = [k for k, (kept, _) in enumerate(kept_excluded) if i in kept]
        if not who:
            continue
        answers = run_probe_together([methods[k] for k in who], inputs, plan[i], on_step)
        for k, (labels, conf) in zip(who, answers):
            group = due[k][3].group
            group["labels"].with_config(WRITE_EVERY_CHUNK)[i] = labels  # type: ignore[union-attr]
            group["confidence"].with_config(WRITE_EVERY_CHUNK)[i] = conf  # type: ignore[union-attr]
    for (index, _, settings, shared), method, (kept, excluded) in zip(due, methods, kept_excluded):
        shared.finish(part, {"probes": [i for i in mine if i in kept]},
                      _fit_parts(shared.group, plan, inputs, estimate, excluded, settings,
                                 _teacher_adapted(seq, method.needs_teacher)))
        ran[index] = True
    return ran


def _fit_parts(group: Any, plan: list[Probe], inputs: StoreSequenceInputs, estimate: EstimateConfig,
               excluded: set[int], settings: dict[str, Any], adapted: bool
               ) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The record of a method's estimate from every part's answers (``infos``: each part's probes)."""

    def combine(infos: list[dict[str, Any]]) -> dict[str, Any]:
        answers = {i: (np.asarray(group["labels"][i]), np.asarray(group["confidence"][i]))
                   for info in infos for i in info["probes"]}
        calibration = fit_probes(plan, answers, inputs, estimate, len(excluded))
        return {"settings": settings, "calibration": calibration.record(), "teacher_adapted": adapted}

    return combine
