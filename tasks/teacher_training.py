"""Teacher training from stores: the annotated frames of one or more stores -> a checkpoint.

Used by ``autolabel train-teacher`` and the ``train-teacher`` flow alike. Only
``Sequence.annotation`` is read, so evaluation-only ground truth is never trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from autolabel.models.teacher import Teacher
from autolabel.models.teacher_training import ProgressFn, TeacherTrainConfig, train_teacher
from autolabel.models.checkpoints import check_checkpoint_path
from autolabel.models.training_state import TrainingState, run_settings, state_path_for
from autolabel.storage.store import SequenceStore
from autolabel.storage.training_data import AnnotatedFrames


class TeacherRequest(BaseModel):
    """What ``train-teacher`` trains on and where it writes."""

    model_config = ConfigDict(frozen=True)

    stores: list[str] = Field(min_length=1, description="stores whose annotated frames are the training set")
    out: str = Field(description="checkpoint file to write (atomically)")
    sequences: list[str] | None = Field(None, description="only these sequences' annotations (ids or globs)")
    train: TeacherTrainConfig = TeacherTrainConfig()


def training_frames(request: TeacherRequest) -> AnnotatedFrames:
    """The annotated frames the request trains on (``describe()`` says what they are)."""
    return AnnotatedFrames([SequenceStore.open(s) for s in request.stores], request.sequences)


def train_teacher_from_stores(request: TeacherRequest, on_step: ProgressFn | None = None,
                              data: AnnotatedFrames | None = None) -> dict[str, Any]:
    """Train a teacher of ``request.train.arch`` and save it to ``request.out``; returns the summary."""
    check_checkpoint_path(request.out, "teacher")
    data = data if data is not None else training_frames(request)
    classes = data.classes
    torch.manual_seed(request.train.seed)  # the initial weights too: the same --seed, the same checkpoint
    teacher = Teacher.create(request.train.arch, classes.names, [list(c) for c in classes.palette],
                             classes.ignore_index)
    state = TrainingState(state_path_for(request.out), run_settings(request.train, {
        "stores": list(request.stores), "sequences": request.sequences, "samples": len(data),
        "classes": list(classes.names)}), request.train.state_every_s)
    info = train_teacher(teacher, data, request.train, on_step, state)
    teacher.train_info = {**info, "stores": list(request.stores)}
    info["sha256"] = teacher.save(Path(request.out))
    state.remove()
    return info
