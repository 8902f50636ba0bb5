"""Flows ``train-teacher`` and ``train-refiner``: the training commands as Prefect runs (GPU pool).

Each wraps one task that trains and writes the checkpoint atomically; a progress artifact
follows the steps and the run's result is the training summary (loss, seconds, samples/s).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from autolabel.tasks.refiner_training import RefinerRequest, train_refiner_from_stores
from autolabel.tasks.stage_tasks import gpu_slot
from autolabel.tasks.teacher_training import TeacherRequest, train_teacher_from_stores


def _progress(description: str) -> Any:
    artifact = create_progress_artifact(progress=0.0, description=description)
    last = [-1]

    def report(step: int, total: int, loss: float) -> None:
        pct = int(100 * step / max(total, 1))
        if pct != last[0]:
            last[0] = pct
            update_progress_artifact(artifact, progress=float(pct))
    return report


def _resumed(info: dict[str, Any]) -> str:
    """Where a run went on from the progress a stopped one saved (``<out>.train-state``)."""
    return f" from step {info['resumed_from_step']} of a stopped run" if info.get("resumed_from_step") else ""


@task(name="train-teacher")
def train_teacher_task(request: TeacherRequest) -> dict[str, Any]:
    with gpu_slot(request.train.device):
        info = train_teacher_from_stores(request, _progress(f"train-teacher -> {request.out}"))
    get_run_logger().info("wrote %s (%d steps%s, %.1f s, mean loss of the last %d steps %.3f)", request.out,
                          info["steps"], _resumed(info), info["seconds"], info["final_loss_steps"], info["final_loss"])
    return info


@task(name="train-refiner")
def train_refiner_task(request: RefinerRequest) -> dict[str, Any]:
    with gpu_slot(request.train.device):
        info = train_refiner_from_stores(request, on_step=_progress(f"train-refiner -> {request.out}"))
    get_run_logger().info("wrote %s (%d cycles, %d steps%s, %.1f s; cycles mIoU %s -> %s)", request.out,
                          info["samples"], info["steps"], _resumed(info), info["seconds"], info["fit"]["cycled_miou"],
                          info["fit"]["refined_miou"])
    return info


@flow(name="train-teacher")
def train_teacher_flow(request: TeacherRequest) -> dict[str, Any]:
    """Train the semantic teacher on the annotated frames of the stores."""
    return train_teacher_task(request)


@flow(name="train-refiner")
def train_refiner_flow(request: RefinerRequest) -> dict[str, Any]:
    """Train the refiner on forward-backward cycles of the stores' annotated frames."""
    return train_refiner_task(request)


__all__ = ["RefinerRequest", "TeacherRequest", "train_refiner_flow", "train_teacher_flow"]
