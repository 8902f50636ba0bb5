"""The refiner network, cycle generation, refiner training and the warp-refine method."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from autolabel.errors import CheckpointError, ClassSetMismatchError, ConfigError, ShapeError
from autolabel.models.cycle import cycle_path, cycle_plan, cycle_sample, run_cycle
from autolabel.models.propagation import PropagationConfig, WarpInpaint, create_method, propagate
from autolabel.models.refiner import Refiner, RefinerInput
from autolabel.models.refiner_training import RefinerTrainConfig, augment_cycle, score_on_samples, train_refiner
from autolabel.models.teacher import Teacher
from autolabel.storage.classes import CAMVID11
from autolabel.storage.synthetic import SyntheticConfig
from tests.conftest import DriveInputs

CFG = SyntheticConfig(width=96, height=72, frames=13, seed=4)


def _teacher(classes: list[str] = CAMVID11.names) -> Teacher:
    torch.manual_seed(0)
    return Teacher.create("unet-tiny", classes, [[0, 0, 0]] * len(classes))


def _refiner(teacher: Teacher, sha: str = "t" * 64) -> Refiner:
    torch.manual_seed(0)
    return Refiner.create("refine-tiny", teacher.classes, teacher.net.feature_channels, sha)


class StillInputs(DriveInputs):
    """A drive frozen in time: every frame is frame 0 and the flow is zero; the teacher is wrong."""

    def __init__(self) -> None:
        super().__init__(CFG, annotated=[6], teacher_conf=0.5, teacher_noise=1.0)
        self.frames = [self.frames[0]] * CFG.frames
        self._teacher = [self._teacher[0]] * CFG.frames

    def flow_to_next(self, t: int) -> np.ndarray:
        return np.zeros((2, CFG.height, CFG.width), np.float32)

    flow_to_prev = flow_to_next


class FeatureInputs(DriveInputs):
    """DriveInputs plus teacher features from a real (tiny) teacher."""

    def __init__(self, teacher: Teacher, **kw) -> None:  # noqa: ANN003
        super().__init__(CFG, **kw)
        self.net = teacher

    def teacher_features(self, t: int) -> np.ndarray:
        return self.net.predict(self.frame(t)).features[0].numpy()


class TestCycles:
    def test_path_goes_out_and_back(self) -> None:
        assert cycle_path(5, 3, 1) == [5, 6, 7, 8, 7, 6, 5]
        assert cycle_path(5, 2, -1) == [5, 4, 3, 4, 5]

    def test_plan_covers_every_length_inside_the_sequence(self) -> None:
        annotated = np.zeros(10, bool)
        annotated[[1, 8]] = True
        plan = list(cycle_plan(annotated, 3))
        assert (1, 1, -1) in plan and (1, 2, -1) not in plan and (1, 3, 1) in plan
        assert (8, 1, 1) in plan and (8, 2, 1) not in plan and (8, 3, -1) in plan
        assert len(plan) == 2 * 3 + 1 + 1

    def test_zero_flow_returns_the_original_label(self) -> None:
        inputs = StillInputs()
        method = WarpInpaint(PropagationConfig(method="warp-inpaint"))
        for length in (1, 6):
            sample = cycle_sample(method, inputs, 6, length, 1)
            np.testing.assert_array_equal(sample.labels, inputs.annotation(6))
            assert sample.trusted.all() and (sample.confidence == 255).all()
            np.testing.assert_array_equal(sample.warped_image, inputs.frame(6))

    def test_motion_changes_the_label_and_more_with_longer_cycles(self) -> None:
        inputs = DriveInputs(CFG, annotated=[6], teacher_conf=0.5, teacher_noise=1.0)
        method = WarpInpaint(PropagationConfig(method="warp-inpaint"))
        errors = [float((cycle_sample(method, inputs, 6, n, 1).labels != inputs.annotation(6)).mean()) for n in (1, 6)]
        assert 0 < errors[0] < errors[1] < 0.5
        sample = cycle_sample(method, inputs, 6, 3, -1)
        assert sample.t == 6 and sample.length == 3 and sample.direction == -1
        np.testing.assert_array_equal(sample.annotation, inputs.annotation(6))

    def test_reads_only_the_start_frames_annotation(self) -> None:
        inputs = DriveInputs(CFG, annotated=[6])  # annotation() asserts on non-annotated frames
        run_cycle(WarpInpaint(PropagationConfig()), inputs, 6, 6, -1)

    @pytest.mark.parametrize(("length", "direction"), [(0, 1), (2, 0), (7, 1), (7, -1)])
    def test_impossible_cycles(self, length: int, direction: int) -> None:
        with pytest.raises(ConfigError):
            run_cycle(WarpInpaint(PropagationConfig()), DriveInputs(CFG, [6]), 6, length, direction)


class TestRefinerNet:
    def _input(self, teacher: Teacher, b: int = 2, h: int = 40, w: int = 56) -> RefinerInput:
        return RefinerInput(
            labels=torch.randint(0, 11, (b, h, w)), confidence=torch.rand(b, h, w), trusted=torch.rand(b, h, w) > 0.5,
            warped_image=torch.rand(b, 3, h, w), target_image=torch.rand(b, 3, h, w),
            features=torch.randn(b, teacher.net.feature_channels, h // 4, w // 4))

    def test_smoke_shapes_and_probabilities(self) -> None:
        teacher = _teacher()
        probs = _refiner(teacher).refine(self._input(teacher))
        assert probs.shape == (2, 11, 40, 56)
        torch.testing.assert_close(probs.sum(1), torch.ones(2, 40, 56))

    def test_ignore_labels_are_accepted(self) -> None:
        teacher = _teacher()
        x = self._input(teacher)
        x.labels[:, :5] = 255
        assert torch.isfinite(_refiner(teacher).refine(x)).all()

    def test_input_channels_and_layout(self) -> None:
        """One-hot label (all zero where ignored), confidence, trust and both normalised images,
        built channels_last (what the channels_last weights read without a copy)."""
        teacher = _teacher()
        net = _refiner(teacher).net
        x = self._input(teacher)
        x.labels[:, :5] = 255
        inp = net._input(x, torch.float32)
        valid = (x.labels < 11)[:, None].float()
        onehot = torch.nn.functional.one_hot(x.labels.clamp(max=10), 11).permute(0, 3, 1, 2).float() * valid
        mean, std = net.mean, net.std
        want = torch.cat([onehot, x.confidence[:, None], x.trusted[:, None].float(),
                          (x.warped_image - mean) / std, (x.target_image - mean) / std], 1)
        assert torch.equal(inp, want) and (inp[:, :11, :5] == 0).all()
        assert inp.is_contiguous(memory_format=torch.channels_last)

    def test_untrained_net_keeps_the_input_label_mostly(self) -> None:
        teacher = _teacher()
        x = self._input(teacher)
        kept = (_refiner(teacher).refine(x).argmax(1) == x.labels).float().mean()
        assert kept > 0.6  # the residual on the one-hot label starts the net near identity

    @pytest.mark.parametrize("field", ["features", "target_image", "labels"])
    def test_bad_shapes(self, field: str) -> None:
        teacher = _teacher()
        x = self._input(teacher)
        bad = {"features": torch.randn(2, 3, 10, 14), "target_image": torch.rand(2, 3, 41, 56),
               "labels": torch.zeros(2, 1, 40, 56, dtype=torch.long)}[field]
        setattr(x, field, bad)
        with pytest.raises(ShapeError):
            _refiner(teacher).refine(x)

    def test_save_load_roundtrip(self, tmp_path: Path) -> None:
        teacher = _teacher()
        refiner = _refiner(teacher)
        refiner.train_info = {"steps": 3}
        with torch.no_grad():
            refiner.net.head.bias.add_(torch.linspace(-1, 1, 11))
        sha = refiner.save(tmp_path / "r.pt")
        loaded = Refiner.load(tmp_path / "r.pt")
        x = self._input(teacher)
        torch.testing.assert_close(loaded.refine(x), refiner.refine(x))
        assert loaded.train_info == {"steps": 3} and loaded.teacher_sha256 == "t" * 64 and len(sha) == 64

    def test_load_errors(self, tmp_path: Path) -> None:
        with pytest.raises(CheckpointError, match="train-refiner"):
            Refiner.load(tmp_path / "missing.pt")
        _teacher().save(tmp_path / "teacher.pt")
        with pytest.raises(CheckpointError, match="not an autolabel refiner"):
            Refiner.load(tmp_path / "teacher.pt")

    def test_compatibility_checks(self) -> None:
        refiner = _refiner(_teacher())
        refiner.check_compatible(CAMVID11.names, "t" * 64, "here")
        with pytest.raises(ClassSetMismatchError, match="train a refiner"):
            refiner.check_compatible(["a", "b"], "t" * 64, "here")
        with pytest.raises(CheckpointError, match="retrain the refiner"):
            refiner.check_compatible(CAMVID11.names, "u" * 64, "here")


class TestRefinerTraining:
    def _samples(self) -> list:
        inputs = DriveInputs(CFG, annotated=[3, 9], teacher_conf=0.5, teacher_noise=0.3)
        method = WarpInpaint(PropagationConfig())
        return [cycle_sample(method, inputs, t, n, d) for t, n, d in cycle_plan(inputs.annotated, 3)]

    def test_augmentation_keeps_maps_aligned(self) -> None:
        sample = self._samples()[0]
        sample.labels = sample.annotation.copy()  # identical maps must stay identical after augmentation
        cfg = RefinerTrainConfig(crop=48, scale=(0.5, 2.0))
        rng = np.random.default_rng(0)
        for _ in range(5):
            maps = augment_cycle(sample, cfg, rng, 255)
            assert {m.shape[:2] for m in maps.values()} == {(48, 48)}
            valid = maps["annotation"] != 255
            np.testing.assert_array_equal(maps["labels"][valid], maps["annotation"][valid])

    def test_training_lowers_the_loss_and_learns_to_undo_a_corruption(self) -> None:
        # every cycled label shifted by one class: a systematic error the refiner must learn to undo
        teacher = _teacher()
        samples = [dataclasses.replace(s, labels=((s.annotation.astype(int) + 1) % 11).astype(np.uint8))
                   for s in self._samples()]
        refiner = _refiner(teacher)
        losses: list[float] = []
        info = train_refiner(refiner, teacher, samples, RefinerTrainConfig(
            arch="refine-tiny", steps=100, batch_size=4, crop=48, lr=1e-2), lambda s, n, loss: losses.append(loss))
        assert info["steps"] == 100 and info["samples"] == len(samples) == 12 and info["samples_per_second"] > 0
        assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0
        fit = score_on_samples(refiner, teacher, samples)
        assert fit["cycled_miou"] == 0.0 and fit["refined_miou"] > 15

    def test_no_samples(self) -> None:
        teacher = _teacher()
        with pytest.raises(ConfigError, match="no cycle samples"):
            train_refiner(_refiner(teacher), teacher, [], RefinerTrainConfig())


class TestWarpRefine:
    def test_needs_a_refiner(self) -> None:
        with pytest.raises(ConfigError, match="--refiner"):
            create_method(PropagationConfig(method="warp-refine"))

    def test_needs_teacher_features(self) -> None:
        teacher = _teacher()
        with pytest.raises(ConfigError, match="features"):
            propagate(DriveInputs(CFG, [6]), PropagationConfig(method="warp-refine"), _refiner(teacher))

    def test_output_is_the_refiners(self) -> None:
        # a refiner rigged to answer class 7 everywhere: warp-refine must follow it, warp-inpaint not
        teacher = _teacher()
        refiner = _refiner(teacher)
        with torch.no_grad():
            refiner.net.label_gain.zero_()
            refiner.net.head.weight.zero_()
            refiner.net.head.bias.copy_(torch.where(torch.arange(11) == 7, 5.0, 0.0))
        inputs = FeatureInputs(teacher, annotated=[6], teacher_conf=0.95)
        refined = propagate(inputs, PropagationConfig(method="warp-refine", max_distance=3), refiner)
        inpainted = propagate(inputs, PropagationConfig(method="warp-inpaint", max_distance=3))
        expected_conf = round(float(torch.softmax(refiner.net.head.bias.detach(), 0)[7]) * 255)
        for t in (3, 4, 5, 7, 8, 9):
            assert (refined[t].labels == 7).all()
            assert (np.abs(refined[t].confidence.astype(int) - expected_conf) <= 1).all()
            assert (inpainted[t].labels != 7).any()
        np.testing.assert_array_equal(refined[6].labels, inputs.annotation(6))
