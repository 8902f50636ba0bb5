"""Options of the commands that label and train (method, K, flow, teacher, refiner, device), with
their defaults and help read from the configs (:mod:`autolabel.cli.options`).

Importing this module loads the configs and with them torch; only the labelling, flow and
training commands do (:mod:`autolabel.cli.app` imports a command's module when it runs).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from autolabel.cli.options import default, describe
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import PropagationConfig
from autolabel.models.quality import EstimateConfig
from autolabel.tasks.pipeline import LabelSettings

R = TypeVar("R")

Teacher = Annotated[Path | None, typer.Option(help=describe(LabelSettings, "teacher"))]
TeacherMap = Annotated[Path | None, typer.Option(help=describe(LabelSettings, "teacher_map"))]
Refiner = Annotated[Path | None, typer.Option(help=describe(LabelSettings, "refiner"))]
MaxDistance = Annotated[int, typer.Option(help=describe(PropagationConfig, "max_distance"))]
Tau = Annotated[float, typer.Option(help=describe(PropagationConfig, "tau"))]
InpaintConfidence = Annotated[float, typer.Option(help=describe(PropagationConfig, "inpaint_confidence"))]
OverrideConfidence = Annotated[float, typer.Option(help=describe(PropagationConfig, "override_confidence"))]
FlowBackend = Annotated[str, typer.Option("--flow", help=describe(FlowConfig, "backend"))]
FlowWorkers = Annotated[int, typer.Option(help=describe(FlowConfig, "workers"))]
AdaptSteps = Annotated[int, typer.Option(help=describe(LabelSettings, "adapt_steps"))]


def device_here(device: str) -> str:
    """Option callback: a device this machine has (fails before any work starts)."""
    from autolabel.tasks.pipeline import check_device, check_device_available

    return check_device_available(check_device(device))


Device = Annotated[str, typer.Option(help=describe(LabelSettings, "device"), callback=device_here)]
SegmentFrames = Annotated[int, typer.Option(help=describe(LabelSettings, "segment_frames"))]
Compare = Annotated[bool, typer.Option(help=describe(LabelSettings, "compare_with_warp_inpaint"))]
Export = Annotated[Path | None, typer.Option(help=describe(LabelSettings, "export_dir"))]
Estimate = Annotated[bool, typer.Option(help="estimate the labels' mIoU without ground truth (the estimate stage: "
                                             "probes between keyframes, about as long again as propagation)")]


def _label_options(
    teacher: Teacher = None,
    teacher_map: TeacherMap = None,
    refiner: Refiner = None,
    max_distance: MaxDistance = default(PropagationConfig, "max_distance"),
    tau: Tau = default(PropagationConfig, "tau"),
    inpaint_confidence: InpaintConfidence = default(PropagationConfig, "inpaint_confidence"),
    override_confidence: OverrideConfidence = default(PropagationConfig, "override_confidence"),
    flow_backend: FlowBackend = default(FlowConfig, "backend"),
    workers: FlowWorkers = default(FlowConfig, "workers"),
    adapt_steps: AdaptSteps = default(LabelSettings, "adapt_steps"),
    device: Device = default(LabelSettings, "device"),
    compare: Compare = default(LabelSettings, "compare_with_warp_inpaint"),
    export: Export = None,
    estimate: Estimate = True,
    segment_frames: SegmentFrames = default(LabelSettings, "segment_frames"),
) -> None:
    """The options that ``label`` and ``run`` share (one list: the two commands cannot drift apart)."""


def label_settings(method: str, *, teacher: Path | None, teacher_map: Path | None, refiner: Path | None,
                   max_distance: int, tau: float, inpaint_confidence: float, override_confidence: float,
                   flow_backend: str, workers: int, adapt_steps: int, device: str, compare: bool,
                   export: Path | None, estimate: bool, segment_frames: int) -> LabelSettings:
    """The LabelSettings of ``label`` and ``run`` from their shared options."""
    return LabelSettings(
        propagation=PropagationConfig(method=method, max_distance=max_distance, tau=tau,
                                      inpaint_confidence=inpaint_confidence, override_confidence=override_confidence),
        flow=FlowConfig(backend=flow_backend, workers=workers), teacher=str(teacher) if teacher else None,
        teacher_map=str(teacher_map) if teacher_map else None,
        refiner=str(refiner) if refiner else None, adapt_steps=adapt_steps, device=device,
        compare_with_warp_inpaint=compare, export_dir=str(export) if export else None,
        estimate=EstimateConfig(enabled=estimate), segment_frames=segment_frames)


def takes_label_settings(command: Callable[..., R]) -> Callable[..., R]:
    """Give ``command`` the shared options of labelling right after its ``method`` option; it gets
    them as one ``settings: LabelSettings`` (built, and so checked, before its body runs).

    ``command`` declares ``method`` and ``settings`` among its parameters; typer sees the merged
    signature.
    """
    own = inspect.signature(command, eval_str=True)
    shared = inspect.signature(_label_options, eval_str=True).parameters
    if not {"method", "settings"} <= set(own.parameters):
        raise TypeError(f"{command.__name__} needs 'method' and 'settings' parameters to take the labelling options")
    params: list[inspect.Parameter] = []
    for param in own.parameters.values():
        if param.name != "settings":
            params.append(param)
        if param.name == "method":
            params.extend(shared.values())

    @functools.wraps(command)
    def with_settings(**options: Any) -> R:
        values = {name: options.pop(name) for name in shared}
        return command(settings=label_settings(options["method"], **values), **options)

    with_settings.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    with_settings.__annotations__ = {p.name: p.annotation for p in params}
    return with_settings
