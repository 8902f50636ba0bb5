"""Quality estimation without ground truth: calibration, expected IoU, cycles of any method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autolabel.errors import ConfigError
from autolabel.models.metrics import confusion_matrix, iou_per_class
from autolabel.models.propagation import PropagationConfig, create_method, propagate, propagate_frames_together, share_trust
from autolabel.models.quality import (
    Calibration,
    EstimateCalibration,
    EstimateConfig,
    ProbeAnswers,
    annotation_fingerprint,
    auroc,
    reliability,
    calibrate,
    calibrate_together,
    calibration_keyframes,
    estimate_plan,
    fit_class_offsets,
    probe_steps,
    expected_counts,
    expected_iou,
    expected_miou,
    fit_calibration,
    fit_probes,
    probes_to_run,
    run_cycle,
    run_path_together,
    run_paths_together,
    run_probe,
    run_probe_together,
    split_probes,
)

from autolabel.storage.synthetic import SyntheticConfig
from tests.conftest import DriveInputs

CFG = SyntheticConfig(width=96, height=72, frames=12, seed=2, ego_speed=(2.0, 3.0), fps=30.0)


class TestFitCalibration:
    def test_smoke_identity_when_calibrated(self) -> None:
        rng = np.random.default_rng(0)
        conf = rng.uniform(0.05, 0.95, 200_000)
        right = rng.random(conf.size) < conf
        cal = fit_calibration(conf, right)
        assert cal.a == pytest.approx(1.0, abs=0.05) and cal.b == pytest.approx(0.0, abs=0.05)

    def test_overconfident_scores_are_pulled_down(self) -> None:
        rng = np.random.default_rng(1)
        conf = rng.uniform(0.6, 1.0, 100_000)
        right = rng.random(conf.size) < (conf - 0.3)  # a pixel at 0.9 is right 60 % of the time
        cal = fit_calibration(conf, right)
        assert cal(np.array([0.9]))[0] == pytest.approx(0.6, abs=0.06)
        assert cal(np.array([0.7]))[0] == pytest.approx(0.4, abs=0.06)

    def test_constant_confidence_fits_the_rate(self) -> None:
        right = np.r_[np.ones(700, bool), np.zeros(300, bool)]
        cal = fit_calibration(np.full(1000, 1.0), right)
        assert cal(np.array([1.0]))[0] == pytest.approx(0.7, abs=0.01)

    def test_all_right_stays_finite(self) -> None:
        cal = fit_calibration(np.linspace(0.5, 1, 1000), np.ones(1000, bool))
        p = cal(np.array([0.5, 1.0]))
        assert np.isfinite([cal.a, cal.b]).all() and p[1] > 0.99

    def test_empty_is_identity(self) -> None:
        assert fit_calibration(np.zeros(0), np.zeros(0, bool)) == Calibration()


class TestCalibrationOfStored:
    @pytest.mark.parametrize("calibration", [Calibration(), Calibration(1.3, -0.4),
                                             Calibration(0.8, 0.2, (0.5, -1.0, 0.0, 2.0))])
    def test_the_computed_probabilities_to_the_bit(self, calibration: Calibration) -> None:
        rng = np.random.default_rng(0)
        conf = rng.integers(0, 256, (37, 53), dtype=np.uint8)
        conf[0, :4] = [0, 1, 254, 255]
        labels = rng.choice(np.array([0, 1, 2, 3, 7, 255], np.uint8), (37, 53))
        want = np.where(labels != 255, calibration(conf / 255.0, labels), 0.0)
        got = calibration.of_stored(conf, labels, 255)
        assert got.dtype == want.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        assert (got[labels == 255] == 0).all() and (got[labels != 255] > 0).all()

    def test_only_stored_dtypes(self) -> None:
        with pytest.raises(TypeError, match="uint8"):
            Calibration().of_stored(np.zeros((2, 2)), np.zeros((2, 2), np.uint8), 255)


class TestExpectedCounts:
    def test_stored_uint8_labels_count_as_any_integer_labels(self) -> None:
        rng = np.random.default_rng(3)
        labels = rng.choice(np.array([0, 1, 2, 4, 9, 200, 255], np.uint8), (40, 50))
        p = rng.random((40, 50)).astype(np.float32)
        for spread in (3, 9):
            np.testing.assert_array_equal(expected_counts(labels, p, 10, 255, spread),
                                          expected_counts(labels.astype(np.int64), p, 10, 255, spread))

    def test_certain_labels_give_exact_iou(self) -> None:
        labels = np.zeros((8, 8), np.uint8)
        labels[:, 4:] = 1
        counts = expected_counts(labels, np.ones((8, 8)), 3, 255)
        np.testing.assert_allclose(counts[:2], [[32, 32, 32], [32, 32, 32]])
        assert expected_miou(counts) == pytest.approx(100.0)
        assert np.isnan(expected_iou(counts)[2])  # never predicted: left out of the mean

    def test_matches_true_iou_when_errors_are_symmetric_boundary_errors(self) -> None:
        """A boundary shifted by one column, with p = the true rate on the boundary columns."""
        gt = np.zeros((20, 20), np.uint8)
        gt[:, 10:] = 1
        pred = np.zeros_like(gt)
        pred[:, 11:] = 1  # column 10 wrong
        p = np.ones(gt.shape)
        p[:, 10] = 0.0
        true = iou_per_class(confusion_matrix(gt, pred, 2))
        np.testing.assert_allclose(expected_iou(expected_counts(pred, p, 2, 255, spread=3)), true, atol=1e-6)

    def test_unlabelled_pixels_count_as_misses(self) -> None:
        labels = np.zeros((4, 8), np.uint8)
        labels[:, 4:] = 255
        counts = expected_counts(labels, np.ones(labels.shape), 2, 255, spread=9)
        assert counts[0, 2] > counts[0, 1]  # the ignore pixels near class 0 are its false negatives
        assert expected_miou(counts) < 100

    @pytest.mark.parametrize("spread", [3, 9])
    def test_missing_mass_goes_to_the_other_classes_in_the_box(self, spread: int) -> None:
        """Against the definition written out pixel by pixel: each pixel's ``1 - p`` (1 where
        unlabelled) is shared among the other classes in proportion to how many of their pixels its
        box holds (border pixels repeated), and goes nowhere where the box holds no other class."""
        rng = np.random.default_rng(3)
        labels = np.kron(rng.integers(0, 4, (4, 5)), np.ones((4, 4), np.int64)).astype(np.uint8)
        labels[0, :6] = 255
        labels[-4:, -4:] = 3  # one class alone in a corner: its mass there goes nowhere
        p = rng.uniform(0.3, 1.0, labels.shape)
        r = spread // 2
        padded = np.pad(labels, r, mode="edge")
        gt = np.zeros(4)
        for (y, x), label in np.ndenumerate(labels):
            box = padded[y:y + spread, x:x + spread]
            others = np.array([(box == k).sum() if k != label else 0 for k in range(4)], float)
            if others.sum():
                gt += (1.0 if label == 255 else 1.0 - p[y, x]) * others / others.sum()
        counts = expected_counts(labels, p, 4, 255, spread=spread)
        tp = [p[labels == k].sum() for k in range(4)]
        np.testing.assert_allclose(counts[:, 0], tp, rtol=1e-5)
        np.testing.assert_allclose(counts[:, 1], [(labels == k).sum() for k in range(4)])
        np.testing.assert_allclose(counts[:, 2], np.add(tp, gt), rtol=1e-5)

    def test_nothing_labelled(self) -> None:
        counts = expected_counts(np.full((4, 4), 255, np.uint8), np.zeros((4, 4)), 2, 255)
        assert not counts.any() and np.isnan(expected_miou(counts))

    def test_shape_mismatch_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="differ in shape"):
            expected_counts(np.zeros((4, 4)), np.zeros((4, 5)), 2, 255)


class TestCalibrateTogether:
    """Methods calibrated together: each gets its own calibration, each step's trust check made once."""

    def test_each_method_gets_what_it_gets_alone(self) -> None:
        inputs = DriveInputs(CFG, annotated=[1, 6, 11])
        configs = [PropagationConfig(method="warp-inpaint", max_distance=10, inpaint_confidence=c) for c in (0.0, 0.99)]
        configs.append(PropagationConfig(method="motion-only", max_distance=10))
        skips = [[], [annotation_fingerprint(inputs.annotation(11))], []]  # the second leaves keyframe 11 out
        steps: list[int] = []
        together = calibrate_together([create_method(c) for c in configs], inputs, EstimateConfig(), skips,
                                      on_step=lambda: steps.append(1))
        alone = [calibrate(create_method(c), inputs, EstimateConfig(), skip=skip) for c, skip in zip(configs, skips)]
        assert [t.record() for t in together] == [a.record() for a in alone]
        assert together[1].excluded == 1 and together[1].probes == together[0].probes - 1
        assert len(steps) == 3 * probe_steps(estimate_plan(inputs.annotated, EstimateConfig(), 10)) - 5
        assert together[0].record() != together[1].record()

    def test_the_trust_check_is_made_once_per_step(self) -> None:
        class Counting(DriveInputs):
            reads = 0

            def flow_to_next(self, t: int) -> np.ndarray:
                Counting.reads += 1
                return super().flow_to_next(t)

        inputs = Counting(CFG, annotated=[1, 6, 11])
        configs = [PropagationConfig(method="warp-inpaint", max_distance=10, inpaint_confidence=c) for c in (0.0, 0.99)]
        for config in configs:
            calibrate(create_method(config), inputs, EstimateConfig())
        alone, Counting.reads = Counting.reads, 0
        calibrate_together([create_method(c) for c in configs], inputs, EstimateConfig(), [[], []])
        assert Counting.reads * 2 == alone > 0

    def test_methods_need_the_same_k(self) -> None:
        inputs = DriveInputs(CFG, annotated=[1, 6, 11])
        methods = [create_method(PropagationConfig(method="motion-only", max_distance=k)) for k in (3, 4)]
        with pytest.raises(ConfigError, match="same K"):
            calibrate_together(methods, inputs, EstimateConfig(), [[], []])

    def test_a_probe_run_together_answers_as_each_method_alone(self) -> None:
        """What a segment job of the estimate runs: one probe, several methods, one trust check a step."""
        inputs = DriveInputs(CFG, annotated=[1, 6, 11])
        configs = [PropagationConfig(method="warp-inpaint", max_distance=10, inpaint_confidence=c) for c in (0.0, 0.99)]
        plan = estimate_plan(inputs.annotated, EstimateConfig(), 10)
        for probe in plan:
            methods = [create_method(c) for c in configs]
            share_trust(methods)
            together = run_probe_together(methods, inputs, probe)
            alone = [run_probe(create_method(c), inputs, probe) for c in configs]
            for (labels, conf), (labels_alone, conf_alone) in zip(together, alone):
                np.testing.assert_array_equal(labels, labels_alone)
                np.testing.assert_array_equal(conf, conf_alone)
        assert not np.array_equal(together[0][1], together[1][1])  # the two settings answer differently


class TestProbeAnswers:
    """Held-out probes resumed from the propagation's own chains (:class:`ProbeAnswers` as ``on_chains``)."""

    # chains stopping K out, or one frame before the next keyframe; resumed probes one, two or all at a time
    @pytest.mark.parametrize(("k", "batch"), [(2, 1), (2, 2), (10, 2), (10, 8)])
    def test_resumed_probes_give_the_calibrations_of_whole_probes(self, k: int, batch: int) -> None:
        inputs = DriveInputs(CFG, annotated=[1, 6, 11])
        configs = [PropagationConfig(method="warp-inpaint", max_distance=k, inpaint_confidence=c) for c in (0.0, 0.99)]
        configs.append(PropagationConfig(method="motion-only", max_distance=k))
        skips = [[], [annotation_fingerprint(inputs.annotation(11))], None]  # motion-only: no estimate wanted
        steps: list[int] = []
        probes = ProbeAnswers(inputs, EstimateConfig(), k, skips, on_step=lambda: steps.append(1), batch=batch)
        planned = probes.steps(resumed=True)
        frames = list(propagate_frames_together(inputs, configs, on_chains=probes))
        assert len(steps) == planned > 0  # only the rest of each probe ran during the pass
        methods = [create_method(c) for c in configs]
        resumed = probes.calibrations(methods, inputs)
        assert len(steps) == planned and resumed[2] is None  # nothing was left to run whole
        alone = [calibrate(create_method(c), inputs, EstimateConfig(), skip=skip)
                 for c, skip in zip(configs[:2], skips[:2])]
        assert [r.record() for r in resumed[:2]] == [a.record() for a in alone]
        for outputs, t in zip(frames, range(CFG.frames)):  # the labels are the pass's own
            for output, config in zip(outputs, configs):
                np.testing.assert_array_equal(output.labels, propagate(inputs, config)[t].labels)

    def test_paths_stepped_together_end_where_each_alone_does(self) -> None:
        inputs = DriveInputs(CFG, annotated=[1, 6, 11])
        methods = [create_method(PropagationConfig(method="warp-inpaint", max_distance=10, inpaint_confidence=c))
                   for c in (0.0, 0.99)]
        paths = [[1, 2, 3, 4, 5, 6], [11, 10, 9], [6, 7, 8, 9]]  # different lengths and directions
        steps: list[int] = []
        together = run_paths_together(methods, inputs, paths, on_step=lambda: steps.append(1))
        assert len(steps) == 2 * (5 + 2 + 3)
        for p, path in enumerate(paths):
            alone = run_path_together(methods, inputs, path)
            for m in range(2):
                assert torch.equal(together[m][p].labels, alone[m].labels)
                assert torch.equal(together[m][p].confidence, alone[m].confidence)

    def test_batch_must_be_positive(self) -> None:
        with pytest.raises(ConfigError, match="batches of at least one"):
            ProbeAnswers(DriveInputs(CFG, annotated=[1, 6, 11]), EstimateConfig(), 2, [[]], batch=0)

    def test_fewer_steps_than_whole_probes(self) -> None:
        inputs = DriveInputs(CFG, annotated=[1, 6, 11])
        probes = ProbeAnswers(inputs, EstimateConfig(), 2, [[]])
        whole = probe_steps(estimate_plan(inputs.annotated, EstimateConfig(), 2))
        assert probes.steps(resumed=False) == whole and probes.steps(resumed=True) == whole - 4 * 2

    def test_probes_no_chain_started_run_whole(self) -> None:
        inputs = DriveInputs(CFG, annotated=[1, 6, 11])
        config = PropagationConfig(method="warp-inpaint", max_distance=3)
        probes = ProbeAnswers(inputs, EstimateConfig(), 3, [[]])
        calibration = probes.calibrations([create_method(config)], inputs)[0]
        assert calibration is not None
        assert calibration.record() == calibrate(create_method(config), inputs, EstimateConfig()).record()


class TestCycles:
    def test_motion_only_cycles_cancel_on_consistent_flow(self) -> None:
        """Why cycles alone make a poor estimate: exact flow there and back restores the label."""
        inputs = DriveInputs(CFG, annotated=[3])
        method = create_method(PropagationConfig(method="motion-only", max_distance=10))
        state = run_cycle(method, inputs, 3, 8, 1)
        assert (state.labels.numpy() == inputs.annotation(3)).mean() > 0.98

    def test_warp_inpaint_cycles_drift_with_a_noisy_teacher(self) -> None:
        inputs = DriveInputs(CFG.model_copy(update={"fps": 10.0}), annotated=[3], teacher_noise=0.5)
        method = create_method(PropagationConfig(method="warp-inpaint", max_distance=10, inpaint_confidence=0))
        right = [(run_cycle(method, inputs, 3, n, 1).labels.numpy() == inputs.annotation(3)).mean() for n in (1, 8)]
        assert right[1] < right[0] < 1

    def test_cycle_leaving_the_sequence_is_an_error(self) -> None:
        inputs = DriveInputs(CFG.model_copy(update={"frames": 4}), annotated=[3])
        method = create_method(PropagationConfig(method="motion-only"))
        with pytest.raises(ConfigError, match="leaves the sequence"):
            run_cycle(method, inputs, 3, 2, 1)

    def test_plan_prefers_held_out_chains_between_keyframes(self) -> None:
        annotated = np.zeros(63, bool)
        annotated[[10, 31, 52]] = True
        plan = estimate_plan(annotated, EstimateConfig(), 10)
        assert [(p.kind, p.source, p.target) for p in plan] == [
            ("held-out", 10, 31, ), ("held-out", 31, 10), ("held-out", 31, 52), ("held-out", 52, 31)]
        assert probe_steps(plan) == 84
        far = estimate_plan(annotated, EstimateConfig(max_gap=20, cycle_lengths=(1, 3)), 10)
        assert {p.kind for p in far} == {"cycle"} and len(far) == 12 and probe_steps(far) == 48

    def test_calibrate_on_held_out_chains_and_skips_trained_keyframes(self) -> None:
        inputs = DriveInputs(CFG.model_copy(update={"frames": 20}), annotated=[2, 9, 16])
        method = create_method(PropagationConfig(method="motion-only", max_distance=6))
        steps: list[int] = []
        cal = calibrate(method, inputs, EstimateConfig(), on_step=lambda: steps.append(1))
        assert (cal.kind, cal.probes, cal.keyframes, len(steps)) == ("held-out", 4, [2, 9, 16], 28)
        assert cal.confusion is not None and cal.confusion.sum() == 4 * 96 * 72
        assert 0.25 <= cal.deficit_ratio <= 4
        skipped = calibrate(method, inputs, EstimateConfig(), skip=[annotation_fingerprint(inputs.annotation(9))])
        assert skipped.probes == 2 and skipped.excluded == 1  # the two chains ending on frame 9 are left out
        again = EstimateCalibration.from_record(cal.record())
        assert again.calibration.a == pytest.approx(cal.calibration.a, abs=1e-5)
        assert again.probes == cal.probes and again.kind == "held-out"

    def test_cycles_when_keyframes_are_far_apart(self) -> None:
        inputs = DriveInputs(CFG, annotated=[2, 9])
        method = create_method(PropagationConfig(method="warp-inpaint", max_distance=6))
        cal = calibrate(method, inputs, EstimateConfig(max_gap=4, cycle_lengths=(1, 3)))
        # of 12 frames: keyframe 2: l=1 both ways, l=3 forward only; keyframe 9: l=1 both, l=3 backward only
        assert (cal.kind, cal.probes, cal.deficit_ratio) == ("cycle", 6, 1.0)

    def test_probes_fitted_in_parts_give_the_one_job_calibration(self) -> None:
        """Answers run in any order, by any job, fit to the calibration :func:`calibrate` gives."""
        inputs = DriveInputs(CFG.model_copy(update={"frames": 20}), annotated=[2, 9, 16])
        method = create_method(PropagationConfig(method="motion-only", max_distance=6))
        whole = calibrate(method, inputs, EstimateConfig())
        plan = estimate_plan(inputs.annotated, EstimateConfig(), 6)
        kept, excluded = probes_to_run(plan, inputs)
        answers = {i: run_probe(method, inputs, plan[i]) for i in reversed(kept)}
        assert fit_probes(plan, answers, inputs, EstimateConfig(), len(excluded)).record() == whole.record()

    def test_keyframes_are_spread(self) -> None:
        annotated = np.zeros(100, bool)
        annotated[::5] = True
        assert calibration_keyframes(annotated, 3) == [0, 50, 95]


class TestSplitProbes:
    def test_every_probe_once_and_the_steps_balanced(self) -> None:
        annotated = np.zeros(200, bool)
        annotated[[0, 10, 50, 60, 120, 199]] = True  # gaps of 10, 40, 10, 60, 79 frames
        plan = estimate_plan(annotated, EstimateConfig(), 10)
        parts = split_probes(plan, 3)
        assert sorted(i for part in parts for i in part) == list(range(len(plan)))
        assert all(part == sorted(part) for part in parts)
        loads = [probe_steps([plan[i] for i in part]) for part in parts]
        assert max(loads) - min(loads) <= max(p.length for p in plan)
        assert split_probes(plan, 3) == parts  # every job computes the same split

    def test_more_parts_than_probes_leaves_some_empty(self) -> None:
        annotated = np.zeros(40, bool)
        annotated[[5, 26]] = True
        assert split_probes(estimate_plan(annotated, EstimateConfig(), 10), 3) == [[0], [1], []]

    def test_no_parts_is_an_error(self) -> None:
        with pytest.raises(ConfigError, match="at least one part"):
            split_probes([], 0)


class TestClassOffsets:
    def test_a_class_wrong_more_often_gets_a_negative_offset(self) -> None:
        rng = np.random.default_rng(3)
        conf = rng.uniform(0.5, 1.0, 50_000)
        labels = rng.integers(0, 3, conf.size)
        right = rng.random(conf.size) < np.where(labels == 2, conf - 0.3, conf)
        cal = fit_class_offsets(fit_calibration(conf, right), conf, right, labels, 4)
        assert cal.offsets[2] < -0.5 < cal.offsets[0] and cal.offsets[3] == 0.0  # class 3: no pixel, no offset
        p = cal(np.full(3, 0.8), np.array([0, 1, 2]))
        assert p[2] == pytest.approx(0.5, abs=0.06) and p[0] > 0.75


class TestDeficitCorrection:
    def test_counts_are_corrected_per_class(self) -> None:
        counts = np.array([[90.0, 100.0, 100.0], [0.0, 0.0, 0.0]])  # IoU 90/110
        cal = EstimateCalibration(Calibration(), "held-out", 1, 1, [], 0, deficit_ratio=2.0)
        fixed = cal.correct_counts(counts)
        iou = expected_iou(fixed)
        assert iou[0] == pytest.approx(1 - 2 * (1 - 90 / 110)) and np.isnan(iou[1])


class TestCalibrationMetrics:
    def test_auroc_perfect_random_and_ties(self) -> None:
        assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool)) == 1.0
        assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1], bool)) == 0.0
        assert auroc(np.ones(4), np.array([0, 1, 0, 1], bool)) == 0.5
        rng = np.random.default_rng(0)
        assert auroc(rng.random(20_000), rng.random(20_000) < 0.3) == pytest.approx(0.5, abs=0.02)
        assert np.isnan(auroc(np.ones(3), np.ones(3, bool)))

    def test_reliability_and_ece(self) -> None:
        rng = np.random.default_rng(0)
        p = rng.random(100_000)
        calibrated = reliability(p, rng.random(p.size) < p)
        assert calibrated.ece < 1.0
        over = reliability(p, rng.random(p.size) < p / 2)
        assert over.ece == pytest.approx(25, abs=1.0)  # |p - p/2| averaged over uniform p
        assert over.count.sum() == p.size and len(over.accuracy) == 10
