"""What an exported teacher needs beside its weights: the JSON sidecar and the class mapping.

A teacher exported to ``torch.export`` (``model.pt2``) or ONNX (``model.onnx``) carries no class
names and no input convention, so a small JSON file beside it (``model.pt2.json`` /
``model.onnx.json``) says them::

    {
      "format": "autolabel.teacher-sidecar", "version": 1,
      "classes": ["road", "sidewalk", ...],             # one per logit channel, in order
      "input": {"channels": "RGB",                      # or "BGR"
                "pixel_max": 1.0,                       # pixels scaled to [0, pixel_max] first
                "mean": [0.485, 0.456, 0.406],          # then (x - mean) / std, per channel
                "std": [0.229, 0.224, 0.225],
                "size_multiple": 32},                   # H and W padded up to a multiple
      "outputs": {"logits": "logits",                   # output name, or its index
                  "features": null}                     # decoder features (B, F, h, w), if any
    }

A class mapping (``--teacher-map``) sends the teacher's classes onto the store's, many to one::

    {"map": {"car": "vehicle", "truck": "vehicle", "road": "road", "sky": "sky"}}

Teacher classes that are not listed (or map to ``"unknown"`` / ``null``) become *unknown*: the
teacher's probability for them is pooled in one extra channel, which inpainting never copies and
which the refiner sees as an input. This module only parses and validates (no torch, no I/O
beyond reading the JSON); :mod:`models.teacher_runtime` runs the models.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autolabel.atomic import write_text_atomic
from autolabel.errors import ClassMapError, TeacherFormatError

SIDECAR_FORMAT = "autolabel.teacher-sidecar"
SIDECAR_VERSION = 1
UNKNOWN = "unknown"


def sidecar_path(model: Path) -> Path:
    """The sidecar of ``model.pt2`` / ``model.onnx``: ``model.pt2.json`` / ``model.onnx.json`` beside it."""
    model = Path(model)
    return model.with_name(model.name + ".json")


def _read_json(path: Path, what: str, error: type[Exception]) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: {what} is not readable JSON ({exc})") from exc


def _near(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class TeacherSidecar:
    """The sidecar of an exported teacher (see the module docstring for the file)."""

    classes: list[str]
    channels: str = "RGB"
    pixel_max: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size_multiple: int = 1
    logits: int | str = 0
    features: int | str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "classes": list(self.classes),
                "input": {"channels": self.channels, "pixel_max": self.pixel_max, "mean": list(self.mean),
                          "std": list(self.std), "size_multiple": self.size_multiple},
                "outputs": {"logits": self.logits, "features": self.features}}

    def write(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> TeacherSidecar:
        """Parse and check a sidecar; TeacherFormatError names the file and the field at fault."""
        data = _read_json(path, "teacher sidecar", TeacherFormatError)

        def bad(what: str) -> TeacherFormatError:
            return TeacherFormatError(f"{path}: {what}; see `autolabel export-teacher --help` or the README's "
                                      "'Bring your own teacher' for the sidecar format")

        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise bad(f"not an autolabel teacher sidecar (\"format\" must be {SIDECAR_FORMAT!r})")
        if data.get("version") != SIDECAR_VERSION:
            raise bad(f"sidecar version {data.get('version')!r} is not {SIDECAR_VERSION}")
        classes = data.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
            raise bad("\"classes\" must be a non-empty list of class names, one per logit channel")
        dupes = sorted({c for c in classes if classes.count(c) > 1})
        if dupes:
            raise bad(f"class {dupes[0]!r} is listed twice in \"classes\"")
        if UNKNOWN in classes:
            raise bad(f"class name {UNKNOWN!r} is reserved for unmapped classes; rename it")
        inp = data.get("input", {})
        if not isinstance(inp, dict):
            raise bad("\"input\" must be an object")
        unknown_keys = sorted(set(inp) - {"channels", "pixel_max", "mean", "std", "size_multiple"})
        if unknown_keys:
            raise bad(f"unknown key \"input.{unknown_keys[0]}\"")
        channels = inp.get("channels", "RGB")
        if channels not in ("RGB", "BGR"):
            raise bad(f"\"input.channels\" must be \"RGB\" or \"BGR\", not {channels!r}")
        pixel_max = inp.get("pixel_max", 1.0)
        if not isinstance(pixel_max, (int, float)) or pixel_max <= 0:
            raise bad(f"\"input.pixel_max\" must be a positive number (1.0 or 255), not {pixel_max!r}")
        stats = {}
        for key, default in (("mean", 0.0), ("std", 1.0)):
            value = inp.get(key, [default] * 3)
            if (not isinstance(value, list) or len(value) != 3
                    or not all(isinstance(v, (int, float)) for v in value)):
                raise bad(f"\"input.{key}\" must be a list of 3 numbers, not {value!r}")
            if key == "std" and any(v <= 0 for v in value):
                raise bad(f"\"input.std\" must be positive, not {value!r}")
            stats[key] = tuple(float(v) for v in value)
        multiple = inp.get("size_multiple", 1)
        if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
            raise bad(f"\"input.size_multiple\" must be a positive integer, not {multiple!r}")
        out = data.get("outputs", {})
        if not isinstance(out, dict) or "logits" not in out:
            raise bad("\"outputs.logits\" is missing: name or index of the output that holds the class logits")
        for key in ("logits", "features"):
            value = out.get(key)
            if value is None and key == "features":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, int) and value < 0):
                raise bad(f"\"outputs.{key}\" must be an output name or index, not {value!r}")
        return cls(classes=list(classes), channels=channels, pixel_max=float(pixel_max), mean=stats["mean"],
                   std=stats["std"], size_multiple=multiple, logits=out["logits"], features=out.get("features"))


@dataclass(frozen=True)
class ClassMap:
    """Teacher classes -> store classes (many to one) plus *unknown*.

    ``matrix`` float32 (C_store + 1, C_teacher): row ``c`` sums the teacher probabilities that
    map to store class ``c``; the last row collects the unmapped (unknown) ones.
    """

    teacher_classes: list[str]
    store_classes: list[str]
    target: list[int]  # per teacher class: store class id, or len(store_classes) for unknown
    source: str = "identity"
    unreached: list[str] = field(default_factory=list)  # store classes no teacher class maps to

    @property
    def matrix(self) -> np.ndarray:
        m = np.zeros((len(self.store_classes) + 1, len(self.teacher_classes)), np.float32)
        m[self.target, np.arange(len(self.teacher_classes))] = 1.0
        return m

    @property
    def unknown(self) -> list[str]:
        return [t for t, c in zip(self.teacher_classes, self.target) if c == len(self.store_classes)]

    @classmethod
    def identity(cls, classes: list[str]) -> ClassMap:
        return cls(list(classes), list(classes), list(range(len(classes))))

    @classmethod
    def read(cls, path: Path, teacher_classes: list[str], store_classes: list[str],
             teacher_name: str = "the teacher", store_name: str = "the store") -> ClassMap:
        """Parse ``path`` and check it against both class lists; ClassMapError names the class at fault."""
        data = _read_json(path, "class mapping", ClassMapError)
        mapping = data.get("map") if isinstance(data, dict) else None
        if not isinstance(mapping, dict):
            raise ClassMapError(f"{path}: a class mapping is a JSON object {{\"map\": {{\"teacher class\": "
                                "\"store class\", ...}}}")
        if UNKNOWN in store_classes:
            raise ClassMapError(f"{path}: {store_name} has a class named {UNKNOWN!r}, which mappings reserve; "
                                "rename it in the store's class list")
        target = [len(store_classes)] * len(teacher_classes)
        for source, dest in mapping.items():
            if source not in teacher_classes:
                raise ClassMapError(f"{path}: {source!r} is not a class of {teacher_name}{_near(source, teacher_classes)}; "
                                    f"its classes are {teacher_classes}")
            if dest is None or dest == UNKNOWN:
                continue
            if not isinstance(dest, str) or dest not in store_classes:
                raise ClassMapError(f"{path}: {source!r} maps to {dest!r}, which is not a class of {store_name}"
                                    f"{_near(str(dest), store_classes)}; its classes are {store_classes} "
                                    f"(or {UNKNOWN!r})")
            target[teacher_classes.index(source)] = store_classes.index(dest)
        if all(t == len(store_classes) for t in target):
            raise ClassMapError(f"{path}: no class of {teacher_name} maps to a class of {store_name}")
        reached = set(target)
        unreached = [c for i, c in enumerate(store_classes) if i not in reached]
        return cls(list(teacher_classes), list(store_classes), target, str(path), unreached)
