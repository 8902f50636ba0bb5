"""Commands that label and score a store: ``flow``, ``label``, ``evaluate``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from autolabel.atomic import write_text_atomic
from autolabel.cli import label_options as lopt
from autolabel.cli import options as opt
from autolabel.cli.console import StageBar, console, err_console, print_items, progress_display, styled
from autolabel.cli.options import default, describe
from autolabel.cli.reports import print_evaluation
from autolabel.errors import ConfigError
from autolabel.models.optical_flow import FlowConfig
from autolabel.tasks.pipeline import LabelSettings
from autolabel.wording import count


def flow(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    backend: lopt.FlowBackend = default(FlowConfig, "backend"),
    variational_refinement: Annotated[bool, typer.Option(help=describe(FlowConfig, "variational_refinement"))]
    = default(FlowConfig, "variational_refinement"),
    raft_weights: Annotated[Path | None, typer.Option(help=describe(FlowConfig, "raft_weights"))] = None,
    workers: lopt.FlowWorkers = default(FlowConfig, "workers"),
    sequence: opt.Sequences = None,
) -> None:
    """Compute and store forward and backward optical flow of every frame pair (the pipeline's flow stage)."""
    from autolabel.storage.ids import select_ids
    from autolabel.storage.store import SequenceStore
    from autolabel.tasks.pipeline import FlowStage, run_stage

    stage = FlowStage(flow=FlowConfig(backend=backend, variational_refinement=variational_refinement,
                                      raft_weights=raft_weights, workers=workers))
    ids = select_ids(SequenceStore.open(store).sequence_ids(), sequence, f"store {store!r}")
    with progress_display() as progress:
        computed = sum(run_stage(store, seq_id, stage, StageBar(progress))["computed"] for seq_id in ids)
    console.print(f"{stage.title}: computed for {count(computed, 'sequence')}, {len(ids) - computed} already had it",
                  highlight=False)


@lopt.takes_label_settings
def label(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    method: Annotated[str, typer.Option(help="motion-only, semantic-only, warp-inpaint, warp-refine")],
    jobs: Annotated[int, typer.Option(help="local worker processes for the segments of long drives "
                                           "(with --segment-frames)")] = 1,
    sequence: opt.Sequences = None,
    *,
    settings: LabelSettings,
) -> None:
    """Label sequences with a method: flow -> teacher -> propagate -> evaluate (-> export), on this machine.

    Each stage is skipped where the store already holds its output made with the same settings.
    --segment-frames N: drives longer than N frames are labelled as segment jobs, --jobs at once.
    The labels are the ones a single job gives.
    """
    opt.set_threads()
    from autolabel.storage.store import SequenceStore
    from autolabel.tasks.pipeline import label_store

    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    opt.check_outside_store(settings.export_dir, store, "--export")
    start = time.perf_counter()
    with progress_display() as progress:
        report = label_store(store, settings, sequence or None, StageBar(progress), jobs)
    seconds = time.perf_counter() - start
    labelled = [o.id for o in report.outcomes if o.status == "labelled"]
    rate = ""
    if labelled:
        st = SequenceStore.open(store)
        frames = sum(st.sequence(seq_id).num_frames for seq_id in labelled)
        rate = f" ({count(frames, 'frame')}, {frames / max(seconds, 1e-9):.1f} frames/s)"
    print_items(f"{method}:", [f"labelled {count(len(labelled), 'sequence')}{rate}",
                               f"skipped {report.count('skipped')} (already done)",
                               f"failed {report.count('failed')} in {seconds:.1f} s"])
    spent: dict[str, float] = {}
    in_jobs: dict[str, float] = {}
    for outcome in report.outcomes:
        for stage in (outcome.result or {}).get("stages", []):
            if stage["computed"]:  # a pass that also made the estimates says so
                name = stage["stage"] + (" + estimate" if stage.get("estimated") else "")
                spent[name] = spent.get(name, 0.0) + stage["seconds"]
        for job in (outcome.result or {}).get("segments", []):
            for stage in job["stages"]:
                if stage["computed"]:
                    in_jobs[stage["stage"]] = in_jobs.get(stage["stage"], 0.0) + stage["seconds"]
    if spent:
        print_items("time per stage:", [f"{name} {sec:.1f} s" for name, sec in spent.items()])
    if in_jobs:
        print_items("segment jobs, time per stage summed over jobs:",
                    [f"{name} {sec:.1f} s" for name, sec in in_jobs.items()])
    for o in report.failed:
        err_console.print(styled(("failed", "red"), f" {o.id}: {o.error}"), soft_wrap=True)
    for name, why in report.skipped_groups.items():
        err_console.print(styled(("skipped group", "yellow"), f" {name!r}: {why}"), soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)


def evaluate(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    method: Annotated[list[str], typer.Option(help="method to score (repeatable)")],
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
    max_distance: Annotated[int | None, typer.Option(help="score distances 1..K (default: the K the results "
                                                          "were labelled with)")] = None,
    sequence: opt.Sequences = None,
    plot: Annotated[Path | None, typer.Option(help="write mIoU-vs-distance and per-class IoU PNGs here")] = None,
) -> None:
    """Score labelled methods against the stored ground truth: mIoU by distance, class, sequence."""
    from autolabel.storage.ids import select_ids
    from autolabel.storage.queries import sequences_with_results
    from autolabel.storage.store import SequenceStore
    from autolabel.tasks.evaluate import evaluate_store

    opt.check_outside_store(plot, store, "--plot")
    opt.check_methods(method)
    st = SequenceStore.open(store)
    ids = select_ids(st.sequence_ids(), sequence, f"store {store!r}")
    sequences_with_results(st, method, ids, "evaluate")
    report = evaluate_store(st, method, max_distance, sequences=ids)
    print_evaluation(report)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json_out, report.model_dump_json(indent=2))
        console.print(f"wrote {json_out}", highlight=False)
    if plot is not None:
        from autolabel.tasks.plots import plot_report

        for path in plot_report(report, plot):
            console.print(f"wrote {path}", highlight=False)


def register(app: typer.Typer) -> None:
    for command in (flow, label, evaluate):
        app.command()(command)


__all__ = ["evaluate", "flow", "label", "register"]
