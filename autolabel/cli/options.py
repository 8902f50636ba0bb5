"""Command-line options whose defaults and help come from the pydantic configs (the one source).

``default(Model, "field")`` and ``describe(Model, "field")`` read a config field's default and
description, so a default changed in a config changes the CLI with it. Options shared by
several commands are defined here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from autolabel.errors import ConfigError
from autolabel.runtime import set_threads as set_process_threads
from autolabel.models.optical_flow import FlowConfig
from autolabel.models.propagation import PropagationConfig
from autolabel.models.quality import EstimateConfig
from autolabel.tasks.pipeline import LabelSettings


def default(model: type[BaseModel], name: str) -> Any:
    """The default of config field ``name`` of ``model``."""
    return model.model_fields[name].get_default(call_default_factory=True)


def describe(model: type[BaseModel], name: str, extra: str = "") -> str:
    """The description of config field ``name`` (plus ``extra``), for an option's help."""
    text = model.model_fields[name].description or name.replace("_", " ")
    return f"{text} {extra}".strip()


def set_threads() -> None:
    """torch and OpenCV threads: ``$AUTOLABEL_THREADS`` (several processes sharing a machine), else every core."""
    set_process_threads()


def parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like 480x360 (width x height), got {size!r}") from None
    if w < 16 or h < 16:
        raise ConfigError(f"--size {size} is too small (at least 16x16)")
    return w, h


Sequences = Annotated[list[str] | None, typer.Option("--sequence", help="only these sequences: ids or globs like "
                                                                        "'train_*' (repeatable)")]
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
Window = Annotated[int | None, typer.Option(help="annotate the centre frame of each N-frame window; other labels "
                                                 "are kept as evaluation ground truth")]
KeyframeEvery = Annotated[int | None, typer.Option(help="annotate frames 0, N, 2N, ...")]


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
