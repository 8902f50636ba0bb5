"""A teacher with another class list, exported to ONNX, labels a store through a class mapping."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autolabel.errors import CheckpointError, ClassMapError, ConfigError
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import PropagationConfig
from autolabel.models.refiner import Refiner
from autolabel.models.refiner_training import RefinerTrainConfig
from autolabel.models.teacher import MEAN, STD
from autolabel.models.teacher_export import export_module
from autolabel.models.teacher_sidecar import TeacherSidecar
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store
from autolabel.tasks.pipeline import LabelSettings, label_store
from autolabel.tasks.refiner_training import RefinerRequest, train_refiner_from_stores
from tests.conftest import train_tiny_teacher

DRIVE = SyntheticConfig(width=64, height=48, frames=25, seed=0)
EXACT = FlowConfig(backend="exact")


class OtherClasses(nn.Module):
    """The store's teacher seen as a model of another class list (what a third-party model looks like):
    classes in reverse order, 'car' split into 'car' and 'truck' (half the probability each) and a
    'bridge' class that is never likely. Takes the built-in normalised input; no features output."""

    def __init__(self, net: nn.Module, store_classes: list[str]) -> None:
        super().__init__()
        self.net = net
        names = store_classes[::-1]
        self.car = names.index("Car")
        self.classes = names[:self.car + 1] + ["truck"] + names[self.car + 1:] + ["bridge"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net.forward_normalised(x).logits.flip(1)
        car = logits[:, self.car:self.car + 1] - math.log(2.0)
        bridge = logits.amin(1, keepdim=True) - 30.0
        return torch.cat([logits[:, :self.car], car, car, logits[:, self.car + 1:], bridge], dim=1)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A store, its native teacher, and that teacher as a model of other classes in ONNX (made once)."""
    root = tmp_path_factory.mktemp("teachers")
    store = str(root / "store.zarr")
    write_synthetic_store(store, drive_configs(2, DRIVE), AnnotationPolicy(mode="window", n=21))
    teacher = train_tiny_teacher(store, root / "teacher.pt")
    other = OtherClasses(teacher.copy().net, SequenceStore.open(store).classes.names)
    model, _ = export_module(other, root / "other.onnx", TeacherSidecar(classes=other.classes, mean=MEAN, std=STD))
    return {"store": Path(store), "native": root / "teacher.pt", "onnx": model}


@pytest.fixture
def setup(made: dict[str, Path], tmp_path: Path) -> dict[str, Path | str]:
    store = str(tmp_path / "store.zarr")
    shutil.copytree(made["store"], store)
    names = SequenceStore.open(store).classes.names
    mapping = {name: name for name in names} | {"truck": "Car"}  # 'bridge' stays unknown
    (tmp_path / "map.json").write_text(json.dumps({"map": mapping}))
    return {"store": store, "native": made["native"], "onnx": made["onnx"], "map": tmp_path / "map.json",
            "tmp": tmp_path}


def _labels(store: str, method: str, seq: str = "synth-0000") -> np.ndarray:
    return np.asarray(SequenceStore.open(store).sequence(seq).array(f"results/{method}/labels")[:])


def test_mapped_onnx_teacher_labels_like_the_native_one(setup: dict) -> None:
    copy = str(setup["tmp"] / "copy.zarr")
    shutil.copytree(setup["store"], copy)
    native = LabelSettings(propagation=PropagationConfig(method="warp-inpaint"), flow=EXACT,
                           teacher=str(setup["native"]))
    mapped = native.model_copy(update={"teacher": str(setup["onnx"]), "teacher_map": str(setup["map"])})
    assert [o.status for o in label_store(setup["store"], native).outcomes] == ["labelled"] * 2
    report = label_store(copy, mapped)
    assert [o.status for o in report.outcomes] == ["labelled"] * 2, report.failed
    for seq in ("synth-0000", "synth-0001"):
        teacher_native = np.asarray(SequenceStore.open(setup["store"]).sequence(seq).array("teacher/labels")[:])
        teacher_mapped = np.asarray(SequenceStore.open(copy).sequence(seq).array("teacher/labels")[:])
        assert (teacher_native == teacher_mapped).mean() >= 0.999
        assert (_labels(setup["store"], "warp-inpaint", seq) == _labels(copy, "warp-inpaint", seq)).mean() >= 0.999
    record = SequenceStore.open(copy).sequence("synth-0000").stages["teacher"]
    assert record["settings"]["checkpoint_sha256"] != SequenceStore.open(setup["store"]).sequence(
        "synth-0000").stages["teacher"]["settings"]["checkpoint_sha256"]  # model + sidecar + mapping
    assert [o.status for o in label_store(copy, mapped).outcomes] == ["skipped"] * 2
    # a changed mapping is a changed teacher: 'car' and 'truck' now unknown -> relabelled, never inpainted
    mapping = json.loads(setup["map"].read_text())
    mapping["map"].pop("Car")
    mapping["map"].pop("truck")
    setup["map"].write_text(json.dumps(mapping))
    assert [o.status for o in label_store(copy, mapped).outcomes] == ["labelled"] * 2
    car = SequenceStore.open(copy).classes.names.index("Car")
    assert not (np.asarray(SequenceStore.open(copy).sequence("synth-0000").array("teacher/labels")[:]) == car).any()


def test_warp_refine_learns_on_mapped_probabilities(setup: dict) -> None:
    request = RefinerRequest(stores=[setup["store"]], teacher=setup["onnx"], teacher_map=setup["map"],
                             out=setup["tmp"] / "refiner.pt", flow=EXACT,
                             train=RefinerTrainConfig(arch="refine-tiny", steps=3, batch_size=2, crop=32, max_cycle=2))
    train_refiner_from_stores(request)
    refiner = Refiner.load(setup["tmp"] / "refiner.pt")
    classes = SequenceStore.open(setup["store"]).classes.names
    assert refiner.teacher_input == "probabilities" and refiner.net.feature_channels == len(classes) + 1
    settings = LabelSettings(propagation=PropagationConfig(method="warp-refine"), flow=EXACT,
                             teacher=str(setup["onnx"]), teacher_map=str(setup["map"]),
                             refiner=str(setup["tmp"] / "refiner.pt"))
    report = label_store(setup["store"], settings)
    assert [o.status for o in report.outcomes] == ["labelled"] * 2, report.failed
    labels = _labels(setup["store"], "warp-refine")
    reached = np.asarray(SequenceStore.open(setup["store"]).sequence("synth-0000").array(
        "results/warp-refine/distance")[:]) >= 0
    assert labels.shape == (25, 48, 64) and reached.sum() == 21
    assert set(np.unique(labels[reached])) <= set(range(len(classes)))  # refined: every pixel a store class
    # the refiner learnt on probabilities: the native teacher's features are refused, with the reason
    native = settings.model_copy(update={"teacher": str(setup["native"]), "teacher_map": None})
    with pytest.raises(CheckpointError, match="learnt on the teacher's probabilities but the teacher given offers "
                                              "features"):
        label_store(setup["store"], native)


def test_mapping_and_teacher_errors_before_any_work(setup: dict) -> None:
    settings = LabelSettings(propagation=PropagationConfig(method="warp-inpaint"), flow=EXACT,
                             teacher=str(setup["onnx"]))
    with pytest.raises(Exception, match="--teacher-map"):  # other classes and no mapping
        label_store(setup["store"], settings)
    with pytest.raises(ConfigError, match="--adapt-steps 0"):
        label_store(setup["store"], settings.model_copy(update={"teacher_map": str(setup["map"]), "adapt_steps": 5}))
    setup["map"].write_text(json.dumps({"map": {"lorry": "Car"}}))
    with pytest.raises(ClassMapError, match=r"map\.json: 'lorry' is not a class of teacher .*other\.onnx"):
        label_store(setup["store"], settings.model_copy(update={"teacher_map": str(setup["map"])}))
    store = SequenceStore.open(setup["store"])
    assert not any("teacher" in store.sequence(s).stages for s in store.sequence_ids())
