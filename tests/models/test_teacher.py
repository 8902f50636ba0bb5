"""The teacher: shapes, training on a learnable task, checkpoints (weights_only), errors, adaptation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from autolabel.errors import CheckpointError, ClassSetMismatchError, ConfigError, ShapeError
from autolabel.models.teacher import TEACHER_ARCHS, Teacher
from autolabel.models.teacher_training import TeacherTrainConfig, adapt_teacher, augment, class_weights, train_teacher

NAMES = ["red", "green", "blue"]
PALETTE = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def _colour_task(n: int, seed: int = 0, size: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Images of coloured blocks; the label of a pixel is its dominant colour channel."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        label = np.kron(rng.integers(0, 3, size=(4, 4)), np.ones((size // 4, size // 4), int)).astype(np.uint8)
        image = np.zeros((size, size, 3), np.uint8)
        for c in range(3):
            image[..., c] = np.where(label == c, 200, 30)
        image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        samples.append((image, label))
    return samples


def _tiny() -> Teacher:
    torch.manual_seed(0)
    return Teacher.create("unet-tiny", NAMES, PALETTE)


class TestNetwork:
    def test_registry(self) -> None:
        assert {"unet-lite", "unet-tiny"} <= set(TEACHER_ARCHS.names())

    @pytest.mark.parametrize("arch", ["unet-tiny", "unet-lite"])
    def test_shapes_for_odd_sizes(self, arch: str) -> None:
        net = TEACHER_ARCHS.get(arch)(num_classes=5).eval()
        out = net(torch.rand(2, 3, 45, 61))
        assert out.logits.shape == (2, 5, 45, 61)
        assert out.features.shape[:2] == (2, net.feature_channels) and out.features.shape[-2:] == (12, 16)

    def test_shape_error(self) -> None:
        with pytest.raises(ShapeError, match=r"images must have shape \(B, 3, H, W\)"):
            TEACHER_ARCHS.get("unet-tiny")(num_classes=2)(torch.rand(1, 4, 8, 8))

    def test_predict_gives_probabilities(self) -> None:
        probs = _tiny().predict(np.zeros((2, 24, 40, 3), np.uint8)).logits
        assert probs.shape == (2, 3, 24, 40)
        torch.testing.assert_close(probs.sum(1), torch.ones(2, 24, 40))

    @pytest.mark.parametrize("arch", ["unet-tiny", "unet-lite"])
    def test_features_alone_equal_those_of_predict(self, arch: str) -> None:
        torch.manual_seed(0)
        teacher = Teacher.create(arch, NAMES, PALETTE).to("cpu")
        frames = np.random.default_rng(1).integers(0, 255, (2, 45, 61, 3), dtype=np.uint8)
        features = teacher.predict_features(frames)
        assert features.shape == (2, teacher.feature_channels, 12, 16)
        assert torch.equal(features, teacher.predict(frames).features)

    def test_channels_last_weights_predict_what_contiguous_ones_do(self) -> None:
        torch.manual_seed(0)
        teacher = Teacher.create("unet-lite", NAMES, PALETTE)  # created: contiguous weights
        frames = np.random.default_rng(2).integers(0, 255, (2, 40, 56, 3), dtype=np.uint8)
        before = teacher.predict(frames)
        teacher.to("cpu")
        assert teacher.net.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
        after = teacher.predict(frames)
        torch.testing.assert_close(after.logits, before.logits)
        assert torch.equal(after.logits.argmax(1), before.logits.argmax(1))


class TestTraining:
    def test_a_few_steps_learn_a_learnable_task(self) -> None:
        teacher = _tiny()
        samples = _colour_task(16)
        cfg = TeacherTrainConfig(arch="unet-tiny", max_steps=60, batch_size=8, crop=64, lr=1e-2, scale=(1.0, 1.0),
                                 blur_prob=0, jitter=0)
        losses: list[float] = []
        info = train_teacher(teacher, samples, cfg, lambda s, n, loss: losses.append(loss))
        assert info["steps"] == 60 and len(losses) == 60
        assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
        labels, conf = teacher.predict_labels(np.stack([s[0] for s in _colour_task(4, seed=9)]))
        truth = np.stack([s[1] for s in _colour_task(4, seed=9)])
        assert (labels == truth).mean() > 0.9
        assert conf.shape == labels.shape and 0 <= conf.min() and conf.max() <= 1

    def test_no_samples(self) -> None:
        with pytest.raises(ConfigError, match="no annotated frames"):
            train_teacher(_tiny(), [], TeacherTrainConfig(max_steps=1))

    def test_augment_keeps_crop_size_and_label_values(self) -> None:
        image, label = _colour_task(1, size=40)[0]
        cfg = TeacherTrainConfig(crop=64)
        rng = np.random.default_rng(1)
        for _ in range(20):
            img, lab = augment(image, label, cfg, rng, ignore_index=255)
            assert img.shape == (64, 64, 3) and lab.shape == (64, 64)
            assert set(np.unique(lab).tolist()) <= {0, 1, 2, 255}

    def test_class_weights_favour_rare_classes(self) -> None:
        label = np.zeros((10, 10), np.uint8)
        label[0, 0] = 1
        label[0, 1] = 255
        w = class_weights([(np.zeros((10, 10, 3), np.uint8), label)], num_classes=3, ignore_index=255)
        assert w[1] > w[0] > 0 and w[2] == 0

    def test_adaptation_returns_a_tuned_copy(self) -> None:
        teacher = _tiny()
        before = {k: v.clone() for k, v in teacher.net.state_dict().items()}
        tuned = adapt_teacher(teacher, _colour_task(4), steps=3, cfg=TeacherTrainConfig(arch="unet-tiny", crop=64))
        for k, v in teacher.net.state_dict().items():
            torch.testing.assert_close(v, before[k])
        assert any(not torch.equal(v, before[k]) for k, v in tuned.net.state_dict().items() if v.is_floating_point())
        assert tuned.train_info["adapted_steps"] == 3


class TestCheckpoints:
    def test_save_load_round_trip_with_weights_only(self, tmp_path: Path) -> None:
        teacher = _tiny()
        teacher.train_info = {"steps": 3, "config": {"lr": 0.1}}
        path = tmp_path / "t.pt"
        digest = teacher.save(path)
        assert len(digest) == 64
        torch.load(path, weights_only=True)  # loads without executing code
        loaded = Teacher.load(path)
        frames = np.random.default_rng(0).integers(0, 255, (1, 20, 28, 3), dtype=np.uint8)
        torch.testing.assert_close(loaded.predict(frames).logits, teacher.predict(frames).logits)
        assert loaded.classes == NAMES and loaded.train_info["steps"] == 3
        assert loaded.save(tmp_path / "again" / "t.pt") == digest  # the file does not depend on the memory format

    def test_missing_corrupt_and_foreign_files(self, tmp_path: Path) -> None:
        with pytest.raises(CheckpointError, match="not found; train one"):
            Teacher.load(tmp_path / "none.pt")
        (tmp_path / "bad.pt").write_bytes(b"garbage")
        with pytest.raises(CheckpointError, match="cannot read teacher checkpoint: not a file written by torch.save; "
                                                  "copy it again or write a new one with `autolabel train-teacher"):
            Teacher.load(tmp_path / "bad.pt")
        (tmp_path / "empty.pt").write_bytes(b"")
        with pytest.raises(CheckpointError, match="empty.pt: cannot read teacher checkpoint: the file is empty"):
            Teacher.load(tmp_path / "empty.pt")
        _tiny().save(tmp_path / "whole.pt")
        (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:1000])
        with pytest.raises(CheckpointError, match=r"cannot read teacher checkpoint: the archive is cut short or "
                                                  r"damaged \(1000 bytes\)"):
            Teacher.load(tmp_path / "cut.pt")
        torch.save({"state_dict": {}}, tmp_path / "other.pt")
        with pytest.raises(CheckpointError, match="not an autolabel teacher checkpoint"):
            Teacher.load(tmp_path / "other.pt")

    def test_weights_that_do_not_fit(self, tmp_path: Path) -> None:
        state = _tiny().state()
        state["state_dict"] = {k: v[..., :1] if v.dim() else v for k, v in state["state_dict"].items()}
        torch.save(state, tmp_path / "t.pt")
        with pytest.raises(CheckpointError, match="do not fit"):
            Teacher.load(tmp_path / "t.pt")

    def test_class_list_must_match(self) -> None:
        with pytest.raises(ClassSetMismatchError, match="teacher predicts classes"):
            _tiny().check_classes(["a", "b", "c"], 255, "store x")
