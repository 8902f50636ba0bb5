"""Exported teachers (.pt2, .onnx) with sidecars, class mappings, and the refiner's teacher input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autolabel.errors import CheckpointError, ClassMapError, ClassSetMismatchError, TeacherFormatError
from autolabel.models.refiner import Refiner
from autolabel.models.teacher import MEAN, STD, Teacher
from autolabel.models.teacher_export import export_builtin_teacher, export_module
from autolabel.models.teacher_runtime import ExportedTeacher, MappedTeacher, open_teacher
from autolabel.models.teacher_sidecar import ClassMap, TeacherSidecar

NAMES = ["road", "car", "sky"]


def _teacher() -> Teacher:
    torch.manual_seed(0)
    return Teacher.create("unet-tiny", NAMES, [[128, 64, 128], [64, 0, 128], [128, 128, 128]])


def _frames(n: int = 2, h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny teacher as a checkpoint and in both export formats, with and without features."""
    root = tmp_path_factory.mktemp("exports")
    teacher = _teacher()
    teacher.save(root / "teacher.pt")
    out = {"pt": root / "teacher.pt"}
    for suffix in (".pt2", ".onnx"):
        out[suffix] = export_builtin_teacher(teacher, root / f"feat{suffix}")[0]
        out[suffix + "-nofeat"] = export_builtin_teacher(teacher, root / f"probs{suffix}", with_features=False)[0]
    return out


class TestExportedTeacher:
    @pytest.mark.parametrize("kind", [".pt2", ".onnx", ".pt2-nofeat", ".onnx-nofeat"])
    def test_same_labels_as_the_checkpoint(self, exports: dict[str, Path], kind: str) -> None:
        native = Teacher.load(exports["pt"])
        exported = open_teacher(exports[kind])
        for h, w in ((37, 53), (64, 96)):  # dynamic height and width, batch of 3
            frames = _frames(3, h, w)
            ref_labels, ref_conf = native.predict_labels(frames)
            labels, conf = exported.predict_labels(frames)
            assert labels.shape == (3, h, w)
            assert (labels == ref_labels).mean() >= 0.999
            np.testing.assert_allclose(conf, ref_conf, atol=1e-4)

    @pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
    def test_features_or_probabilities(self, exports: dict[str, Path], suffix: str) -> None:
        native = Teacher.load(exports["pt"])
        with_features = open_teacher(exports[suffix])
        assert with_features.feature_kind == "features"
        assert with_features.feature_channels == native.feature_channels
        out = with_features.predict(_frames(1, 64, 96))
        ref = native.predict(_frames(1, 64, 96))
        np.testing.assert_allclose(out.features.numpy(), ref.features.numpy(), atol=1e-4)
        without = open_teacher(exports[suffix + "-nofeat"])
        assert without.feature_kind == "probabilities" and without.feature_channels == len(NAMES) + 1
        out = without.predict(_frames(1, 64, 96))
        assert out.features.shape == (1, len(NAMES) + 1, 16, 24)  # probabilities at 1/4, unknown channel empty
        np.testing.assert_allclose(out.features.sum(1).numpy(), 1.0, atol=1e-5)
        assert float(out.features[:, -1].max()) == 0.0

    def test_sidecar_normalisation_bgr_and_padding(self, tmp_path: Path) -> None:
        class Probe(torch.nn.Module):
            """Logits that expose the input: channel c = input channel c; checks the padded size."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                torch._check(x.shape[-1] % 16 == 0)
                return x * 10

        sidecar = TeacherSidecar(classes=["b", "g", "r"], channels="BGR", pixel_max=255.0,
                                 mean=(10.0, 20.0, 30.0), std=(2.0, 2.0, 2.0), size_multiple=16)
        model, _ = export_module(Probe(), tmp_path / "probe.pt2", sidecar, torch.rand(1, 3, 32, 48))
        teacher = ExportedTeacher(model)
        frame = np.zeros((1, 20, 30, 3), np.uint8)
        frame[..., 2] = 255  # pure blue in RGB: the BGR model sees it in its channel 0
        labels, _ = teacher.predict_labels(frame)
        assert labels.shape == (1, 20, 30) and (labels == 0).all()

    def test_bad_model_files(self, exports: dict[str, Path], tmp_path: Path) -> None:
        with pytest.raises(TeacherFormatError, match="not found"):
            ExportedTeacher(tmp_path / "missing.onnx")
        lonely = tmp_path / "lonely.onnx"
        lonely.write_bytes(exports[".onnx"].read_bytes())
        with pytest.raises(TeacherFormatError, match=r"lonely\.onnx\.json is missing"):
            ExportedTeacher(lonely)
        broken = tmp_path / "broken.pt2"
        broken.write_bytes(b"not a zip")
        TeacherSidecar(classes=NAMES).write(tmp_path / "broken.pt2.json")
        with pytest.raises(TeacherFormatError, match=r"broken\.pt2: cannot load the torch.export program: not a "
                                                     r"file written by torch.export.save; write it again"):
            ExportedTeacher(broken)
        broken.write_bytes(exports[".pt2"].read_bytes()[:4000])  # a copy cut short: no traceback logged first
        with pytest.raises(TeacherFormatError, match=r"broken\.pt2: .* the archive is cut short or damaged \(4000 "):
            ExportedTeacher(broken)

    def test_sidecar_that_does_not_fit_the_model(self, exports: dict[str, Path], tmp_path: Path) -> None:
        model = tmp_path / "m.onnx"
        model.write_bytes(exports[".onnx"].read_bytes())
        TeacherSidecar(classes=["a", "b"], logits="logits").write(tmp_path / "m.onnx.json")
        with pytest.raises(TeacherFormatError, match=r"m\.onnx: the logits output has shape .* C=2"):
            ExportedTeacher(model).predict(_frames(1, 32, 32))
        TeacherSidecar(classes=NAMES, logits="scores").write(tmp_path / "m.onnx.json")
        with pytest.raises(TeacherFormatError, match=r"names 'scores' but the model's outputs are \['logits', "):
            ExportedTeacher(model).predict(_frames(1, 32, 32))
        TeacherSidecar(classes=NAMES, logits=0, features="feats").write(tmp_path / "m.onnx.json")
        with pytest.raises(TeacherFormatError, match="outputs.features names 'feats'"):
            ExportedTeacher(model)  # the features output is checked on load


class TestTeacherSidecar:
    def test_round_trip(self, tmp_path: Path) -> None:
        sidecar = TeacherSidecar(classes=NAMES, channels="BGR", pixel_max=255.0, mean=MEAN, std=STD,
                                 size_multiple=32, logits="out", features=1)
        sidecar.write(tmp_path / "s.json")
        assert TeacherSidecar.read(tmp_path / "s.json") == sidecar

    @pytest.mark.parametrize(("change", "message"), [
        ({"format": "other"}, "not an autolabel teacher sidecar"),
        ({"version": 9}, "sidecar version 9"),
        ({"classes": []}, "non-empty list of class names"),
        ({"classes": ["a", "a"]}, "class 'a' is listed twice"),
        ({"classes": ["a", "unknown"]}, "'unknown' is reserved"),
        ({"input": {"channels": "RGBA"}}, "input.channels"),
        ({"input": {"mean": [0.5]}}, "input.mean"),
        ({"input": {"std": [1, 0, 1]}}, "input.std"),
        ({"input": {"size_multiple": 0}}, "input.size_multiple"),
        ({"input": {"scale": 2}}, 'unknown key "input.scale"'),
        ({"outputs": {}}, "outputs.logits"),
        ({"outputs": {"logits": -1}}, "outputs.logits"),
    ])
    def test_bad_sidecar_names_file_and_field(self, tmp_path: Path, change: dict, message: str) -> None:
        data = TeacherSidecar(classes=NAMES).to_json()
        data.update(change)
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(TeacherFormatError, match=message) as info:
            TeacherSidecar.read(tmp_path / "bad.json")
        assert "bad.json" in str(info.value)

    def test_not_json(self, tmp_path: Path) -> None:
        (tmp_path / "bad.json").write_text("{classes: [")
        with pytest.raises(TeacherFormatError, match=r"bad\.json: teacher sidecar is not readable JSON"):
            TeacherSidecar.read(tmp_path / "bad.json")


class TestClassMap:
    TEACHER = ["road", "car", "truck", "bridge", "sky"]
    STORE = ["sky", "road", "vehicle", "pole"]

    def _write(self, tmp_path: Path, mapping: object) -> Path:
        path = tmp_path / "map.json"
        path.write_text(json.dumps(mapping))
        return path

    def test_many_to_one_and_unknown(self, tmp_path: Path) -> None:
        path = self._write(tmp_path, {"map": {"car": "vehicle", "truck": "vehicle", "road": "road",
                                              "sky": "sky", "bridge": "unknown"}})
        cmap = ClassMap.read(path, self.TEACHER, self.STORE)
        assert cmap.target == [1, 2, 2, 4, 0]
        assert cmap.unknown == ["bridge"] and cmap.unreached == ["pole"]
        probs = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25]).view(1, 5, 1, 1)
        mapped = torch.einsum("kc,bchw->bkhw", torch.from_numpy(cmap.matrix), probs).flatten().tolist()
        assert mapped == pytest.approx([0.25, 0.1, 0.5, 0.0, 0.15])  # sky, road, vehicle, pole, unknown

    def test_unlisted_classes_are_unknown(self, tmp_path: Path) -> None:
        cmap = ClassMap.read(self._write(tmp_path, {"map": {"road": "road"}}), self.TEACHER, self.STORE)
        assert cmap.unknown == ["car", "truck", "bridge", "sky"]

    @pytest.mark.parametrize(("mapping", "message"), [
        ({"map": {"cars": "vehicle"}}, r"'cars' is not a class of the teacher \(did you mean 'car'\?\)"),
        ({"map": {"car": "vehicles"}}, r"'car' maps to 'vehicles', which is not a class of the store \(did you "
                                       r"mean 'vehicle'\?\)"),
        ({"map": {"car": None}}, "no class of the teacher maps"),
        (["car", "vehicle"], "a class mapping is a JSON object"),
    ])
    def test_bad_mapping_names_file_and_class(self, tmp_path: Path, mapping: object, message: str) -> None:
        with pytest.raises(ClassMapError, match=message) as info:
            ClassMap.read(self._write(tmp_path, mapping), self.TEACHER, self.STORE)
        assert "map.json" in str(info.value)

    def test_mapped_teacher_labels_unknown_as_ignore(self, exports: dict[str, Path], tmp_path: Path) -> None:
        path = self._write(tmp_path, {"map": {"road": "ground", "car": "ground"}})  # sky -> unknown
        teacher = open_teacher(exports[".onnx-nofeat"], class_map=path, store_classes=["ground"])
        assert isinstance(teacher, MappedTeacher) and teacher.classes == ["ground"]
        frames = _frames(2, 40, 40)
        base = Teacher.load(exports["pt"]).predict(frames).logits
        probs = teacher.predict(frames).logits
        np.testing.assert_allclose(probs[:, 0].numpy(), (base[:, 0] + base[:, 1]).numpy(), atol=1e-5)
        np.testing.assert_allclose(probs[:, 1].numpy(), base[:, 2].numpy(), atol=1e-5)
        labels, _ = teacher.predict_labels(frames)
        sky = base.argmax(1).numpy() == 2
        assert set(np.unique(labels)) <= {0, 255}
        assert ((labels == 255) == (sky & (base[:, 2] > base[:, 0] + base[:, 1]).numpy())).all()

    def test_teacher_and_store_classes_must_meet(self, exports: dict[str, Path]) -> None:
        with pytest.raises(ClassSetMismatchError, match="--teacher-map"):
            open_teacher(exports[".onnx"], store_classes=["ground", "sky"])


class TestRefinerTeacherInput:
    def test_refiner_records_and_checks_what_it_learnt_on(self, tmp_path: Path) -> None:
        refiner = Refiner.create("refine-tiny", NAMES, len(NAMES) + 1, "a" * 64, teacher_input="probabilities")
        refiner.save(tmp_path / "r.pt")
        loaded = Refiner.load(tmp_path / "r.pt")
        assert loaded.teacher_input == "probabilities" and loaded.net.feature_channels == 4
        loaded.check_compatible(NAMES, "a" * 64, "store s", "probabilities")
        with pytest.raises(CheckpointError, match="learnt on the teacher's probabilities but the teacher given "
                                                  "offers features"):
            loaded.check_compatible(NAMES, "a" * 64, "store s", "features")
