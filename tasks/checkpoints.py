"""Teacher and refiner checkpoints as the stages use them: hashed and loaded once per process.

A checkpoint is identified by its path and its file's size and modification time; a file
rewritten in place is therefore hashed and loaded again. Every stage of every sequence asks here,
so labelling a thousand drives in one process loads each model once.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import hashlib
import json

from autolabel.errors import CheckpointError
from autolabel.models.checkpoints import file_sha256
from autolabel.models.refiner import Refiner
from autolabel.models.teacher_runtime import EXPORT_SUFFIXES, SemanticTeacher, open_teacher
from autolabel.models.teacher_sidecar import sidecar_path


def _identity(path: str | Path, what: str, how_to_make: str, noun: str = "checkpoint") -> tuple[str, int, int]:
    resolved = Path(path).expanduser().resolve()
    try:
        stat = os.stat(resolved)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {noun} {path} does not exist; make one with `{how_to_make}`") from None
    return str(resolved), stat.st_size, stat.st_mtime_ns


MAP_HINT = 'a JSON file {"map": {"teacher class": "store class"}} (README: Bring your own teacher)'


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file (cached while the file is unchanged)."""
    return _sha256(*_identity(path, "the", "autolabel train-teacher / train-refiner"))


def teacher_files(path: str | Path, class_map: str | Path | None = None) -> list[str]:
    """The files a teacher's output depends on: the model, an export's sidecar, the class mapping."""
    files = [str(path)]
    if Path(path).suffix in EXPORT_SUFFIXES:
        files.append(str(sidecar_path(Path(path))))
    if class_map is not None:
        files.append(str(class_map))
    return files


def teacher_sha256(path: str | Path, class_map: str | Path | None = None) -> str:
    """What identifies a teacher: a checkpoint's sha256, or for an export (or any mapped teacher)
    the sha256 of its model, sidecar and class-mapping files together."""
    model = checkpoint_sha256(path)
    if class_map is None and Path(path).suffix not in EXPORT_SUFFIXES:
        return model  # a plain checkpoint: the same hash as before exports existed
    parts = {"model": model}
    if Path(path).suffix in EXPORT_SUFFIXES and sidecar_path(Path(path)).is_file():
        parts["sidecar"] = checkpoint_sha256(sidecar_path(Path(path)))
    if class_map is not None:
        parts["class_map"] = _sha256(*_identity(class_map, "class mapping", MAP_HINT, "file"))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@lru_cache(maxsize=4)
def _teacher(path: str, size: int, mtime_ns: int, device: str, class_map: tuple[str, int, int] | None,
             store_classes: tuple[str, ...] | None) -> SemanticTeacher:
    return open_teacher(Path(path), device, Path(class_map[0]) if class_map else None,
                        list(store_classes) if store_classes is not None else None)


@lru_cache(maxsize=4)
def _refiner(path: str, size: int, mtime_ns: int, device: str) -> Refiner:
    return Refiner.load(Path(path), device)


def load_teacher(path: str | Path, device: str, class_map: str | Path | None = None,
                 store_classes: list[str] | None = None) -> SemanticTeacher:
    """The teacher at ``path`` (``.pt`` / ``.pt2`` / ``.onnx``) on ``device``, through ``class_map`` onto
    ``store_classes`` when given (shared: callers must not train it in place)."""
    mapping = _identity(class_map, "class mapping", MAP_HINT, "file") if class_map else None
    return _teacher(*_identity(path, "teacher", "autolabel train-teacher --store ... --out teacher.pt"), device,
                    mapping, tuple(store_classes) if store_classes is not None else None)


def load_refiner(path: str | Path, device: str, classes: list[str], teacher: str | Path, where: str,
                 class_map: str | Path | None = None) -> Refiner:
    """The refiner at ``path``, checked against the store's ``classes`` and the ``teacher`` it learnt on."""
    refiner = _refiner(*_identity(path, "refiner", "autolabel train-refiner --store ... --teacher ... --out r.pt"),
                       device)
    teacher_model = load_teacher(teacher, device, class_map, classes)
    refiner.check_compatible(classes, teacher_sha256(teacher, class_map), where, teacher_model.feature_kind)
    return refiner
