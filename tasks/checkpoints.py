"""Teacher and refiner checkpoints as the stages use them: hashed and loaded once per process.

A checkpoint is identified by its path and its file's size and modification time; a file
rewritten in place is therefore hashed and loaded again. Every stage of every sequence asks here,
so labelling a thousand drives in one process loads each model once.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from autolabel.errors import CheckpointError
from autolabel.models.checkpoints import file_sha256
from autolabel.models.refiner import Refiner
from autolabel.models.teacher import Teacher


def _identity(path: str | Path, what: str, how_to_make: str) -> tuple[str, int, int]:
    resolved = Path(path).expanduser().resolve()
    try:
        stat = os.stat(resolved)
    except FileNotFoundError:
        raise CheckpointError(f"{what} checkpoint {path} does not exist; make one with `{how_to_make}`") from None
    return str(resolved), stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file (cached while the file is unchanged)."""
    return _sha256(*_identity(path, "the", "autolabel train-teacher / train-refiner"))


@lru_cache(maxsize=4)
def _teacher(path: str, size: int, mtime_ns: int, device: str) -> Teacher:
    return Teacher.load(Path(path), device)


@lru_cache(maxsize=4)
def _refiner(path: str, size: int, mtime_ns: int, device: str) -> Refiner:
    return Refiner.load(Path(path), device)


def load_teacher(path: str | Path, device: str) -> Teacher:
    """The teacher checkpoint at ``path`` on ``device`` (shared: callers must not train it in place)."""
    return _teacher(*_identity(path, "teacher", "autolabel train-teacher --store ... --out teacher.pt"), device)


def load_refiner(path: str | Path, device: str, classes: list[str], teacher: str | Path, where: str) -> Refiner:
    """The refiner at ``path``, checked against the store's ``classes`` and the ``teacher`` it learnt on."""
    refiner = _refiner(*_identity(path, "refiner", "autolabel train-refiner --store ... --teacher ... --out r.pt"),
                       device)
    refiner.check_compatible(classes, checkpoint_sha256(teacher), where)
    return refiner
