"""A killed training goes on from its saved progress and ends with the weights of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from autolabel.errors import CheckpointError
from autolabel.models.cycle import cycle_plan, cycle_sample
from autolabel.models.propagation import PropagationConfig, WarpInpaint
from autolabel.models.refiner import Refiner
from autolabel.models.refiner_training import RefinerTrainConfig, train_refiner
from autolabel.models.teacher import Teacher
from autolabel.models.teacher_training import TeacherTrainConfig, train_teacher
from autolabel.models.training_state import EpochSampler, TrainingState, run_settings, state_path_for
from autolabel.storage.classes import CAMVID11
from autolabel.storage.synthetic import SyntheticConfig
from tests.conftest import DriveInputs

TEACHER_CFG = TeacherTrainConfig(arch="unet-tiny", max_steps=7, batch_size=3, crop=64, state_every_s=0)


class Killed(Exception):
    """Stands in for Ctrl-C / SIGKILL between two steps."""


def _samples(n: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), rng.integers(0, 3, (48, 64), dtype=np.uint8))
            for _ in range(n)]


def _teacher(seed: int = 0) -> Teacher:
    torch.manual_seed(seed)
    return Teacher.create("unet-tiny", ["a", "b", "c"], [[0, 0, 0], [1, 1, 1], [2, 2, 2]])


def _kill_at(step: int):  # noqa: ANN202
    def progress(done: int, total: int, loss: float) -> None:
        if done == step:
            raise Killed

    return progress


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class TestEpochSampler:
    def test_draws_as_one_permutation_per_epoch(self) -> None:
        sampler = EpochSampler(5, 2, np.random.default_rng(3))
        batches = [sampler.next_batch().tolist() for _ in range(6)]
        rng = np.random.default_rng(3)
        expected = []
        for _ in range(2):
            order = rng.permutation(5).tolist()
            expected += [order[0:2], order[2:4], order[4:5]]
        assert batches == expected

    def test_state_resumes_mid_epoch(self) -> None:
        a = EpochSampler(7, 3, np.random.default_rng(0))
        a.next_batch()
        saved = a.state_dict()
        rest = [a.next_batch().tolist() for _ in range(4)]
        b = EpochSampler(7, 3, np.random.default_rng(99))
        b.load_state_dict(saved)
        assert [b.next_batch().tolist() for _ in range(4)] == rest


class TestTeacherResume:
    def test_killed_then_resumed_equals_uninterrupted(self, tmp_path: Path) -> None:
        whole = _teacher()
        info = train_teacher(whole, _samples(), TEACHER_CFG)
        state = TrainingState(tmp_path / "t.pt.train-state", {"run": 1}, every_s=0)
        with pytest.raises(Killed):
            train_teacher(_teacher(), _samples(), TEACHER_CFG, _kill_at(4), state)
        assert state.path.is_file()
        resumed = _teacher(seed=5)  # other initial weights: the state's must replace them
        steps: list[int] = []
        again = train_teacher(resumed, _samples(), TEACHER_CFG, lambda s, n, loss: steps.append(s), state)
        assert again["resumed_from_step"] == 4 and steps == [5, 6, 7] and again["steps"] == 7
        assert again["final_loss"] == info["final_loss"]
        _assert_same_weights(whole.net, resumed.net)

    def test_saves_only_when_due(self, tmp_path: Path) -> None:
        state = TrainingState(tmp_path / "t.train-state", {"run": 1}, every_s=3600)
        train_teacher(_teacher(), _samples(), TEACHER_CFG, None, state)
        assert not state.path.exists()


class TestRefinerResume:
    def test_killed_then_resumed_equals_uninterrupted(self, tmp_path: Path) -> None:
        inputs = DriveInputs(SyntheticConfig(width=96, height=72, frames=9, seed=4), annotated=[2, 6],
                             teacher_conf=0.5, teacher_noise=0.3)
        method = WarpInpaint(PropagationConfig())
        samples = [cycle_sample(method, inputs, t, n, d) for t, n, d in cycle_plan(inputs.annotated, 2)]
        torch.manual_seed(0)
        teacher = Teacher.create("unet-tiny", CAMVID11.names, [[0, 0, 0]] * len(CAMVID11.names))
        cfg = RefinerTrainConfig(arch="refine-tiny", steps=5, batch_size=2, crop=48, state_every_s=0)

        def refiner() -> Refiner:
            torch.manual_seed(1)
            return Refiner.create("refine-tiny", teacher.classes, teacher.net.feature_channels, "t" * 64)

        whole = refiner()
        train_refiner(whole, teacher, samples, cfg)
        state = TrainingState(tmp_path / "r.pt.train-state", {"run": 1}, every_s=0)
        with pytest.raises(Killed):
            train_refiner(refiner(), teacher, samples, cfg, _kill_at(2), state)
        resumed = refiner()
        info = train_refiner(resumed, teacher, samples, cfg, None, state)
        assert info["resumed_from_step"] == 2 and info["steps"] == 5
        _assert_same_weights(whole.net, resumed.net)


class TestStateFile:
    def test_path_beside_the_checkpoint(self, tmp_path: Path) -> None:
        assert state_path_for(tmp_path / "teacher.pt") == tmp_path / "teacher.pt.train-state"

    def test_other_settings_are_refused_naming_the_file_and_what_differs(self, tmp_path: Path) -> None:
        path = tmp_path / "t.pt.train-state"
        with pytest.raises(Killed):
            train_teacher(_teacher(), _samples(), TEACHER_CFG, _kill_at(2),
                          TrainingState(path, run_settings(TEACHER_CFG, {"samples": 5}), every_s=0))
        other = TEACHER_CFG.model_copy(update={"lr": 1e-2})
        with pytest.raises(CheckpointError, match=r"t\.pt\.train-state: holds a training stopped at step 2 with "
                                                  r"other settings \(lr differ\).*delete .* afresh"):
            train_teacher(_teacher(), _samples(), other, None, TrainingState(path, run_settings(other, {"samples": 5})))
        # where it runs and how often it saves are not part of the run
        moved = TEACHER_CFG.model_copy(update={"device": "cpu:0", "state_every_s": 5.0})
        assert run_settings(moved, {"samples": 5}) == run_settings(TEACHER_CFG, {"samples": 5})

    @pytest.mark.parametrize(("content", "said"), [(b"", "the file is empty"), (b"PK\x03\x04junk", "the archive is cut short"),
                                                   (b"hello", "not a file written by torch.save")])
    def test_unreadable_state_names_the_file(self, tmp_path: Path, content: bytes, said: str) -> None:
        path = tmp_path / "t.pt.train-state"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"t\.pt\.train-state: cannot read the training state: {said}"):
            TrainingState(path, {}).load()

    def test_a_checkpoint_is_not_a_state(self, tmp_path: Path) -> None:
        path = tmp_path / "t.pt.train-state"
        _teacher().save(path)
        with pytest.raises(CheckpointError, match="not a training state of this autolabel"):
            TrainingState(path, {}).load()
