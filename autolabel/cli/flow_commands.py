"""Commands through the Prefect flows: ``run`` (the whole job) and ``demo`` (it, on synthetic drives)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from autolabel.cli import label_options as lopt
from autolabel.cli import options as opt
from autolabel.cli.console import console, print_section
from autolabel.cli.options import default
from autolabel.cli.reports import print_flow_result, print_store_summary
from autolabel.models.optical_flow import FlowConfig
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.tasks.pipeline import LabelSettings
from autolabel.wording import count


@lopt.takes_label_settings
def run(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    method: Annotated[str, typer.Option(help="motion-only, semantic-only, warp-inpaint, warp-refine")]
    = default(LabelSettings, "propagation").method,
    inbox: Annotated[Path | None, typer.Option(help="ingest new or changed drives from this folder first")] = None,
    layout: Annotated[str, typer.Option(help="the inbox's layout: apollo, camvid, davis, cityscapes, folder")]
    = "apollo",
    window: opt.Window = None,
    keyframe_every: opt.KeyframeEvery = None,
    deployment: Annotated[str | None, typer.Option(help="fan out to this deployment's workers "
                                                        "(label-sequence/gpu)")] = None,
    only_stale: Annotated[bool, typer.Option(help="only drives that are new, changed or labelled with other "
                                                  "settings or checkpoints")] = False,
    sequence: opt.Sequences = None,
    *,
    settings: LabelSettings,
) -> None:
    """The whole job through the Prefect flows: ingest -> label every sequence -> evaluate -> dashboard."""
    opt.set_threads()
    # the settings were built first (takes_label_settings): a mistyped option is reported before Prefect
    # and the flows load (~3 s)
    opt.check_outside_store(settings.export_dir, store, "--export")
    from autolabel.flows.autolabel_flow import autolabel_flow
    from autolabel.flows.run_requests import AutolabelRequest

    request = AutolabelRequest(
        store=store, inbox=str(inbox) if inbox else None, layout=layout,
        annotation=AnnotationPolicy.from_options(window=window, keyframe_every=keyframe_every),
        sequences=sequence or None, only_stale=only_stale, label_deployment=deployment, label=settings)
    result = autolabel_flow(request)
    print_flow_result(result, settings.method)
    if result["failed"]:
        raise typer.Exit(1)


def demo(
    out: Annotated[Path, typer.Option(help="folder for the demo inbox, store, checkpoints and exports")]
    = Path("demo-output"),
    sequences: Annotated[int, typer.Option(help="synthetic drives")] = 3,
    frames: Annotated[int, typer.Option(help="frames per drive")] = 42,
    size: Annotated[str, typer.Option(help="frame size WIDTHxHEIGHT")] = "256x192",
    teacher_steps: Annotated[int, typer.Option(help="teacher training steps")] = 300,
    refiner_steps: Annotated[int, typer.Option(help="refiner training steps")] = 150,
    fresh: Annotated[bool, typer.Option(help="delete an earlier demo output first")] = True,
) -> None:
    """The main job on built-in synthetic drives, through the same Prefect flows as production (in-process):
    ApolloScape-layout inbox -> ingest -> train a teacher and a refiner -> warp-refine labelling ->
    evaluation tables -> overlays exported."""
    opt.set_threads()
    started = time.perf_counter()
    from autolabel.flows.autolabel_flow import autolabel_flow
    from autolabel.flows.run_requests import AutolabelRequest
    from autolabel.flows.training import RefinerRequest, TeacherRequest, train_refiner_flow, train_teacher_flow
    from autolabel.models.refiner_training import RefinerTrainConfig
    from autolabel.models.teacher_training import TeacherTrainConfig
    from autolabel.storage.ingest import IngestOptions
    from autolabel.storage.ingest import ingest as ingest_dataset
    from autolabel.storage.queries import store_summary
    from autolabel.storage.readers import read_dataset
    from autolabel.storage.synthetic import SyntheticConfig, drive_configs
    from autolabel.storage.synthetic_io import write_apollo_layout

    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    width, height = opt.parse_size(size)
    inbox, store_url = out / "inbox", str(out / "apollo.zarr")
    policy = AnnotationPolicy(mode="window", n=21) if frames >= 21 else AnnotationPolicy(mode="keyframe-every", n=10)
    print_section(f"1. render {sequences} synthetic drives as an ApolloScape inbox; ingest")
    write_apollo_layout(inbox, drive_configs(sequences, SyntheticConfig(width=width, height=height, frames=frames,
                                                                       seed=0)))
    report = ingest_dataset(read_dataset("apollo", inbox), store_url, IngestOptions(annotation=policy))
    console.print(f"ingested {count(len(report.by_status('ingested')), 'drive')}; annotated frames: "
                  f"{sum(o.annotated for o in report.outcomes)} (window centres); the other frames' labels "
                  "are kept as ground truth for scoring", highlight=False)
    print_store_summary(store_summary(store_url))
    print_section("2. train the teacher on the annotated frames (flow train-teacher)")
    teacher_path, refiner_path = out / "teacher.pt", out / "refiner.pt"
    crop = max(min(128, width, height) // 32 * 32, 64)
    train_teacher_flow(TeacherRequest(stores=[store_url], out=str(teacher_path), train=TeacherTrainConfig(
        max_steps=teacher_steps, crop=crop, batch_size=8)))
    print_section("3. train the refiner on forward-backward cycles (flow train-refiner)")
    flow = FlowConfig(backend="dis-fast")
    train_refiner_flow(RefinerRequest(stores=[store_url], teacher=teacher_path, out=refiner_path, flow=flow,
                                      train=RefinerTrainConfig(steps=refiner_steps, crop=crop, batch_size=8)))
    print_section("4. label each drive with warp-refine, evaluate, dashboard (flow autolabel)")
    request = AutolabelRequest(
        store=store_url, inbox=str(inbox), layout="apollo", annotation=policy,
        label=LabelSettings(teacher=str(teacher_path), refiner=str(refiner_path), flow=flow,
                            export_dir=str(out / "export")))
    result = autolabel_flow(request)
    print_section("5. results")
    print_flow_result(result, request.label.method)
    console.print(f"overlays, colour and index PNGs: {out / 'export'}/<sequence>/", highlight=False)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s", highlight=False)
    if result["failed"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(demo)
