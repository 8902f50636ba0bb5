"""The CUDA paths (marker ``gpu``): skipped without a CUDA device, as in CI and ``make test``.

On CUDA the teacher and the refiner run under bf16 autocast, their weights channels_last, and
propagation steps up to 16 chains at once; on CPU everything is fp32, one chain at a time. These
tests check that the CUDA path labels what the CPU path labels up to bf16's rounding (which can flip
a near tie, or a pixel whose photometric error lies on the trust threshold, and the flip then
travels along its chain), that batch sizes agree on CUDA too, that the estimate runs there, and that
a refiner trained on a GPU labels on a CPU. Run them where a GPU is:
``python -m pytest -m gpu tests/tasks/test_cuda.py`` (``benchmarks/gpu_check.sh`` does, on a lent
machine).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import AUTO_BATCH, PropagationConfig
from autolabel.models.refiner import Refiner
from autolabel.models.teacher import Teacher
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store
from autolabel.tasks.checkpoints import checkpoint_sha256
from autolabel.tasks.pipeline import LabelSettings, label_store
from tests.conftest import run_cli, train_tiny_teacher

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none here)"),
]

CUDA = "cuda"
# bf16 keeps 8 bits of mantissa: labels may differ where the fp32 path had a near tie, and such a
# pixel's chain carries the difference on; on these drives that stays under 2 % of the pixels
MIN_AGREEMENT = 0.98


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 96x72 drives of 25 frames with a keyframe every 5 (10 chains each, so CUDA's batch of 16
    holds chains of several gaps), a teacher trained 20 steps and an untrained refiner for it."""
    root = tmp_path_factory.mktemp("cuda")
    store = str(root / "store.zarr")
    write_synthetic_store(store, drive_configs(2, SyntheticConfig(width=96, height=72, frames=25, seed=0)),
                          AnnotationPolicy(mode="window", n=5))
    teacher = train_tiny_teacher(store, root / "teacher.pt", steps=20)
    Refiner.create("refine-tiny", teacher.classes, teacher.feature_channels,
                   checkpoint_sha256(root / "teacher.pt")).save(root / "refiner.pt")
    return {"store": Path(store), "teacher": root / "teacher.pt", "refiner": root / "refiner.pt"}


def _settings(made: dict[str, Path], method: str, device: str, batch: int = 0,
              estimate: bool = False, refiner: Path | None = None) -> LabelSettings:
    return LabelSettings(propagation=PropagationConfig(method=method, batch_size=batch),
                         flow=FlowConfig(backend="exact"), teacher=str(made["teacher"]),
                         refiner=str(refiner or made["refiner"]) if method == "warp-refine" else None,
                         device=device, compare_with_warp_inpaint=False, estimate={"enabled": estimate})


def _labelled(made: dict[str, Path], where: Path, settings: LabelSettings) -> SequenceStore:
    """A copy of the store labelled with ``settings``; every drive must come out labelled."""
    shutil.copytree(made["store"], where)
    report = label_store(str(where), settings)
    assert [o.status for o in report.outcomes] == ["labelled"] * 2, report.failed
    return SequenceStore.open(str(where))


def _agreement(a: SequenceStore, b: SequenceStore, array: str) -> float:
    """Share of the non-keyframe pixels whose ``array`` (labels) is the same in both stores."""
    same = total = 0
    for seq_id in a.sequence_ids():
        seq = a.sequence(seq_id)
        frames = ~np.asarray(seq.annotated)
        x = np.asarray(seq.array(array)[:])[frames]
        y = np.asarray(b.sequence(seq_id).array(array)[:])[frames]
        same += int((x == y).sum())
        total += x.size
    return same / total


class TestTeacherOnCuda:
    def test_labels_and_confidence_match_the_cpu(self, made: dict[str, Path]) -> None:
        store = SequenceStore.open(str(made["store"]))
        seq = store.sequence(store.sequence_ids()[0])
        frames = np.stack(list(seq.iter_frames(0, seq.num_frames)))
        cpu_labels, cpu_conf = Teacher.load(made["teacher"], "cpu").predict_labels(frames)
        gpu_teacher = Teacher.load(made["teacher"], CUDA)
        assert next(gpu_teacher.net.parameters()).is_cuda
        gpu_labels, gpu_conf = gpu_teacher.predict_labels(frames)
        assert gpu_labels.shape == cpu_labels.shape and gpu_labels.dtype == np.uint8
        # bf16 autocast on the CPU agreed on 99.3 % of these pixels, mean confidence 0.0002 apart
        assert (gpu_labels == cpu_labels).mean() >= MIN_AGREEMENT
        assert np.abs(gpu_conf - cpu_conf).mean() < 0.01

    def test_features_match_the_cpu(self, made: dict[str, Path]) -> None:
        frames = np.stack(list(SequenceStore.open(str(made["store"])).sequence("synth-0000").iter_frames(0, 4)))
        cpu = Teacher.load(made["teacher"], "cpu").predict_features(frames)
        gpu = Teacher.load(made["teacher"], CUDA).predict_features(frames)
        assert gpu.is_cuda and gpu.dtype == torch.float32 and gpu.shape == cpu.shape
        scale = cpu.abs().max().item()
        assert (gpu.cpu() - cpu).abs().max().item() <= 0.05 * scale


class TestLabellingOnCuda:
    @pytest.mark.parametrize("method", ["warp-inpaint", "warp-refine"])
    def test_labels_match_the_cpu(self, made: dict[str, Path], tmp_path: Path, method: str) -> None:
        cpu = _labelled(made, tmp_path / "cpu.zarr", _settings(made, method, "cpu"))
        gpu = _labelled(made, tmp_path / "gpu.zarr", _settings(made, method, CUDA))
        assert _agreement(cpu, gpu, f"results/{method}/labels") >= MIN_AGREEMENT
        for seq_id in cpu.sequence_ids():  # distances follow the keyframes alone: equal on any device
            np.testing.assert_array_equal(cpu.sequence(seq_id).array(f"results/{method}/distance")[:],
                                          gpu.sequence(seq_id).array(f"results/{method}/distance")[:])

    def test_batch_sizes_agree(self, made: dict[str, Path], tmp_path: Path) -> None:
        assert _settings(made, "warp-refine", CUDA).propagation.chains_per_batch() == AUTO_BATCH["cuda"]
        one = _labelled(made, tmp_path / "one.zarr", _settings(made, "warp-refine", CUDA, batch=1))
        auto = _labelled(made, tmp_path / "auto.zarr", _settings(made, "warp-refine", CUDA))
        assert _agreement(one, auto, "results/warp-refine/labels") >= 0.995

    def test_the_estimate_runs_and_agrees_with_the_cpu(self, made: dict[str, Path], tmp_path: Path) -> None:
        reports = {}
        for device in ("cpu", CUDA):
            store = tmp_path / f"{device}.zarr"
            _labelled(made, store, _settings(made, "warp-refine", device, estimate=True))
            done = run_cli("evaluate", str(store), "--method", "warp-refine", "--json", str(tmp_path / f"{device}.json"))
            assert done.returncode == 0, done.stderr
            reports[device] = json.loads((tmp_path / f"{device}.json").read_text())["methods"]["warp-refine"]
        estimates = [reports[d]["estimated_miou_mean"] for d in ("cpu", CUDA)]
        assert None not in estimates
        assert abs(estimates[0] - estimates[1]) <= 3.0, estimates


def test_a_refiner_trained_on_cuda_labels_on_the_cpu(made: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    shutil.copytree(made["store"], store)
    out = tmp_path / "refiner-cuda.pt"
    done = run_cli("train-refiner", "--store", str(store), "--teacher", str(made["teacher"]), "--out", str(out),
                   "--steps", "3", "--batch-size", "2", "--crop", "48", "--arch", "refine-tiny", "--flow", "exact",
                   "--device", CUDA)
    assert done.returncode == 0, done.stdout + done.stderr
    refiner = Refiner.load(out, "cpu")
    assert not next(refiner.net.parameters()).is_cuda
    assert all(torch.isfinite(p).all() for p in refiner.net.parameters())
    _labelled(made, tmp_path / "labelled.zarr", _settings(made, "warp-refine", "cpu", refiner=out))


def test_a_training_stopped_on_cuda_goes_on_from_its_state(made: dict[str, Path], tmp_path: Path) -> None:
    """The saved progress holds CUDA's random state and the optimiser's state; loaded onto the CPU
    first, it must go back onto the GPU (bf16 there, so the weights are compared for being finite,
    not equal to an uninterrupted run)."""
    from autolabel.models.teacher_training import TeacherTrainConfig, train_teacher
    from autolabel.models.training_state import TrainingState
    from autolabel.storage.training_data import AnnotatedFrames

    st = SequenceStore.open(str(made["store"]))
    cfg = TeacherTrainConfig(arch="unet-tiny", max_steps=6, batch_size=2, crop=64, device=CUDA, state_every_s=0)
    state = TrainingState(tmp_path / "t.pt.train-state", {"run": 1}, every_s=0)

    class Stop(Exception):
        pass

    def stop_at_3(step: int, total: int, loss: float) -> None:
        if step == 3:
            raise Stop

    def teacher() -> Teacher:
        return Teacher.create("unet-tiny", st.classes.names, [list(c) for c in st.classes.palette])

    with pytest.raises(Stop):
        train_teacher(teacher(), AnnotatedFrames([st]), cfg, stop_at_3, state)
    resumed = teacher()
    info = train_teacher(resumed, AnnotatedFrames([st]), cfg, None, state)
    assert info["resumed_from_step"] == 3 and info["steps"] == 6
    assert all(p.is_cuda and torch.isfinite(p).all() for p in resumed.net.parameters())
