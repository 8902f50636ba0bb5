"""Training commands: ``train-teacher`` and ``train-refiner`` (defaults from their configs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from autolabel.cli import label_options as lopt
from autolabel.cli import options as opt
from autolabel.cli.console import StageBar, console, progress_display
from autolabel.cli.options import default, describe
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.refiner_training import RefinerTrainConfig
from autolabel.models.teacher_training import TeacherTrainConfig
from autolabel.tasks.refiner_training import RefinerRequest

T, R = TeacherTrainConfig, RefinerTrainConfig


def _final_loss(info: dict) -> str:
    """The training's closing loss, saying what it is: a mean over its last steps, not the last step's."""
    return f"mean loss of the last {info['final_loss_steps']} steps {info['final_loss']:.3f}"


def _say_if_resuming(out: Path) -> None:
    """One line where a stopped run of this command left its progress (it goes on from there)."""
    from autolabel.models.training_state import state_path_for

    state = state_path_for(out)
    if state.is_file():
        console.print(f"going on from the progress a stopped run left in {state}", highlight=False)


def _resumed(info: dict) -> str:
    return f" (from step {info['resumed_from_step']} of a stopped run)" if info.get("resumed_from_step") else ""


def train_teacher(
    store: Annotated[list[str], typer.Option("--store", help="store with annotated frames (repeatable)")],
    out: Annotated[Path, typer.Option(help="checkpoint file to write")],
    epochs: Annotated[int, typer.Option(help=describe(T, "epochs"))] = default(T, "epochs"),
    max_steps: Annotated[int | None, typer.Option(help=describe(T, "max_steps"))] = default(T, "max_steps"),
    arch: Annotated[str, typer.Option(help=describe(T, "arch"))] = default(T, "arch"),
    batch_size: Annotated[int, typer.Option(help=describe(T, "batch_size"))] = default(T, "batch_size"),
    crop: Annotated[int, typer.Option(help=describe(T, "crop"))] = default(T, "crop"),
    lr: Annotated[float, typer.Option(help=describe(T, "lr"))] = default(T, "lr"),
    sequence: opt.Sequences = None,
    device: Annotated[str, typer.Option(help=describe(T, "device"), callback=lopt.device_here)] = default(T, "device"),
    seed: Annotated[int, typer.Option(help=describe(T, "seed"))] = default(T, "seed"),
    state_every: Annotated[float, typer.Option(help=describe(T, "state_every_s"))] = default(T, "state_every_s"),
) -> None:
    """Train the semantic teacher on the annotated frames of one or more stores."""
    opt.set_threads()
    from autolabel.tasks.teacher_training import (
        TeacherRequest,
        train_teacher_from_stores,
        training_frames,
    )

    request = TeacherRequest(stores=store, out=str(out), sequences=sequence or None, train=TeacherTrainConfig(
        arch=arch, epochs=epochs, max_steps=max_steps, batch_size=batch_size, crop=crop, lr=lr, device=device,
        seed=seed, state_every_s=state_every))
    data = training_frames(request)
    console.print(f"training {arch} on {data.describe()}", highlight=False)
    _say_if_resuming(out)
    with progress_display() as progress:
        task = progress.add_task("train", total=None)

        def report(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, description=f"train loss {loss:.3f}")

        info = train_teacher_from_stores(request, report, data)
    console.print(f"wrote {out} ({info['steps']} steps{_resumed(info)}, {info['seconds']} s, {_final_loss(info)}, "
                  f"sha256 {info['sha256'][:12]})", highlight=False)


def train_refiner(
    store: Annotated[list[str], typer.Option("--store", help="store of annotated sequences (repeatable)")],
    teacher: Annotated[Path, typer.Option(help="teacher: checkpoint .pt, or .pt2 / .onnx with its JSON sidecar "
                                                "(its labels inpaint, its features or probabilities feed the refiner)")],
    out: Annotated[Path, typer.Option(help="refiner checkpoint to write")],
    teacher_map: Annotated[Path | None, typer.Option(help=describe(RefinerRequest, "teacher_map"))] = None,
    max_cycle: Annotated[int, typer.Option(help=describe(R, "max_cycle"))] = default(R, "max_cycle"),
    steps: Annotated[int, typer.Option(help=describe(R, "steps"))] = default(R, "steps"),
    batch_size: Annotated[int, typer.Option(help=describe(R, "batch_size"))] = default(R, "batch_size"),
    crop: Annotated[int, typer.Option(help=describe(R, "crop"))] = default(R, "crop"),
    lr: Annotated[float, typer.Option(help=describe(R, "lr"))] = default(R, "lr"),
    rmi_weight: Annotated[float, typer.Option(help=describe(R, "rmi_weight"))] = default(R, "rmi_weight"),
    arch: Annotated[str, typer.Option(help=describe(R, "arch"))] = default(R, "arch"),
    flow_backend: lopt.FlowBackend = default(FlowConfig, "backend"),
    adapt_steps: Annotated[int, typer.Option(help=describe(RefinerRequest, "adapt_steps"))]
    = default(RefinerRequest, "adapt_steps"),
    max_samples: Annotated[int | None, typer.Option(help=describe(RefinerRequest, "max_samples"))] = None,
    sequence: opt.Sequences = None,
    device: Annotated[str, typer.Option(help=describe(R, "device"), callback=lopt.device_here)] = default(R, "device"),
    seed: Annotated[int, typer.Option(help=describe(R, "seed"))] = default(R, "seed"),
    state_every: Annotated[float, typer.Option(help=describe(R, "state_every_s"))] = default(R, "state_every_s"),
) -> None:
    """Train the refinement network on forward-backward cycles from the annotated frames (no extra labels)."""
    opt.set_threads()
    from autolabel.models.propagation import PropagationConfig
    from autolabel.tasks.refiner_training import train_refiner_from_stores

    request = RefinerRequest(
        stores=store, teacher=teacher, teacher_map=teacher_map, out=out, adapt_steps=adapt_steps, max_samples=max_samples,
        sequences=sequence or None, flow=FlowConfig(backend=flow_backend, device=device),
        propagation=PropagationConfig(method="warp-inpaint", device=device),
        train=RefinerTrainConfig(arch=arch, max_cycle=max_cycle, steps=steps, batch_size=batch_size, crop=crop,
                                 lr=lr, rmi_weight=rmi_weight, device=device, seed=seed, state_every_s=state_every),
    )
    _say_if_resuming(out)
    with progress_display() as progress:
        cycles = progress.add_task("cycles", total=None)
        train = progress.add_task("train", total=None)

        def on_sample(done: int, total: int) -> None:
            progress.update(cycles, completed=done, total=total, description="cycles")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(train, completed=step, total=total, description=f"train loss {loss:.3f}")

        info = train_refiner_from_stores(request, StageBar(progress), on_sample, on_step)
    fit = info["fit"]
    console.print(f"wrote {out} ({info['samples']} cycles, {info['steps']} steps{_resumed(info)}, {info['seconds']} s, "
                  f"{info['samples_per_second']} samples/s, {_final_loss(info)}; on the cycles: "
                  f"mIoU {fit['cycled_miou']} -> {fit['refined_miou']}; sha256 {info['sha256'][:12]})",
                  highlight=False)


def export_teacher(
    teacher: Annotated[Path, typer.Option(help="built-in teacher checkpoint (.pt) to export")],
    out: Annotated[Path, typer.Option(help="model file to write: NAME.pt2 (torch.export) or NAME.onnx; the "
                                           "sidecar NAME.pt2.json / NAME.onnx.json is written beside it")],
    features: Annotated[bool, typer.Option(help="also export the decoder features (else the refiner learns on the "
                                                "teacher's class probabilities)")] = True,
) -> None:
    """Export a teacher checkpoint to torch.export (.pt2) or ONNX (.onnx) with its JSON sidecar."""
    from autolabel.models.teacher import Teacher
    from autolabel.models.teacher_export import export_builtin_teacher

    model, sidecar = export_builtin_teacher(Teacher.load(teacher), out, with_features=features)
    console.print(f"wrote {model} and its sidecar {sidecar}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("train-teacher")(train_teacher)
    app.command("train-refiner")(train_refiner)
    app.command("export-teacher")(export_teacher)
