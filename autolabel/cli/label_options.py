"""Options of the commands that label and train (method, K, flow, teacher, refiner, device), with
their defaults and help read from the configs (:mod:`autolabel.cli.options`).

Importing this module loads the configs and with them torch; only the labelling, flow and
training commands do (:mod:`autolabel.cli.app` imports a command's module when it runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from autolabel.cli.options import describe
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import PropagationConfig
from autolabel.models.quality import EstimateConfig
from autolabel.tasks.pipeline import LabelSettings

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


def label_settings(method: str, teacher: Path | None, refiner: Path | None, max_distance: int, tau: float,
                   inpaint_confidence: float, override_confidence: float, flow_backend: str, workers: int,
                   adapt_steps: int, device: str, compare: bool, export: Path | None,
                   estimate: bool = True, teacher_map: Path | None = None,
                   segment_frames: int = 0) -> LabelSettings:
    """The LabelSettings of ``label`` and ``run`` from their (shared) options."""
    return LabelSettings(
        propagation=PropagationConfig(method=method, max_distance=max_distance, tau=tau,
                                      inpaint_confidence=inpaint_confidence, override_confidence=override_confidence),
        flow=FlowConfig(backend=flow_backend, workers=workers), teacher=str(teacher) if teacher else None,
        teacher_map=str(teacher_map) if teacher_map else None,
        refiner=str(refiner) if refiner else None, adapt_steps=adapt_steps, device=device,
        compare_with_warp_inpaint=compare, export_dir=str(export) if export else None,
        estimate=EstimateConfig(enabled=estimate), segment_frames=segment_frames)
