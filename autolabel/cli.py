"""The ``autolabel`` command line (typer + rich).

Commands: ``ingest``, ``info``, ``synth``, ``export``, ``flow``, ``train-teacher``, ``train-refiner``,
``label``, ``evaluate``, ``run`` and ``demo`` (the last two through the Prefect flows). Errors of the
:class:`~autolabel.errors.AutolabelError` family print one clear line and exit non-zero; no
traceback for bad input. Only ``run`` and ``demo`` import Prefect, so the others start fast.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

from autolabel.errors import AutolabelError, ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Propagate sparse segmentation labels through driving video (Warp-Refine Propagation).")
console = Console()
err_console = Console(stderr=True)


def main() -> None:
    """Console-script entry point: run the app, turning autolabel errors into clean exits."""
    from pydantic import ValidationError

    try:
        app()
    except AutolabelError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or exc.title}: {e['msg']}" for e in exc.errors())
        err_console.print(f"[bold red]error:[/] invalid {exc.title} settings: {problems}", highlight=False, soft_wrap=True)
        sys.exit(2)


class _LogProgress:
    """Progress for logs (no terminal): one line per task at every quarter of the way, at most."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._tasks: dict[int, dict[str, Any]] = {}

    def add_task(self, description: str, total: float | None = None) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = {"description": description, "total": total, "completed": 0, "reported": -1,
                                "start": time.perf_counter()}
        return task_id

    def update(self, task_id: int, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:
        task = self._tasks[task_id]
        if total is not None:
            task["total"] = total
        if description is not None:
            task["description"] = description
        if completed is not None:
            task["completed"] = completed
        self._report(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self._tasks[task_id]["completed"] += advance
        self._report(self._tasks[task_id])

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def _report(self, task: dict[str, Any]) -> None:
        total = task["total"]
        if not total:
            return
        quarter = int(4 * task["completed"] / total)
        if quarter > task["reported"]:
            task["reported"] = quarter
            elapsed = time.perf_counter() - task["start"]
            self.console.print(f"{task['description']}: {int(task['completed'])}/{int(total)} "
                               f"({25 * quarter}%, {elapsed:.0f} s)", highlight=False)


@contextmanager
def _progress(transient: bool = False) -> Iterator[Any]:
    if not err_console.is_terminal:
        yield _LogProgress(err_console)
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("frames"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=transient,
    ) as progress:
        yield progress


class _RichIngestProgress:
    """IngestProgress shown as one rich bar over all frames."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task("ingest", total=total)

    def sequence_started(self, seq_id: str, expected_frames: int) -> None:
        self.progress.update(self.task, description=f"ingest {seq_id}")

    def frame_written(self, seq_id: str) -> None:
        self.progress.advance(self.task)

    def sequence_finished(self, outcome: Any) -> None:
        if outcome.status == "failed":
            self.progress.console.print(f"[red]failed[/] {outcome.id}: {outcome.error}", highlight=False, soft_wrap=True)
        elif outcome.status == "skipped":
            self.progress.console.print(f"[dim]skipped {outcome.id} (already ingested)[/]", highlight=False)


def _print_report(report: Any, seconds: float) -> None:
    ingested, skipped, failed = (report.by_status(s) for s in ("ingested", "skipped", "failed"))
    frames = report.frames_written
    rate = f", {frames / seconds:.1f} frames/s" if frames and seconds > 0 else ""
    console.print(f"ingested {len(ingested)} sequences ({frames} frames{rate}), skipped {len(skipped)}, "
                  f"failed {len(failed)} -> {report.store}", highlight=False)
    if failed:
        table = Table("sequence", "error", title="failures", title_style="bold red")
        for o in failed:
            table.add_row(o.id, o.error or "")
        console.print(table)


def _parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like 480x360 (width x height), got {size!r}") from None
    if w < 16 or h < 16:
        raise ConfigError(f"--size {size} is too small (at least 16x16)")
    return w, h


@app.command()
def ingest(
    layout: Annotated[str, typer.Argument(help="dataset layout: camvid, davis, cityscapes, apollo, folder")],
    src: Annotated[Path, typer.Argument(help="dataset root (a video file or frame folder for 'folder')")],
    store: Annotated[str, typer.Option("--store", help="store path or fsspec URL (created if missing)")],
    window: Annotated[int | None, typer.Option(help="annotate the centre frame of each N-frame window; other labels become evaluation ground truth")] = None,
    keyframe_every: Annotated[int | None, typer.Option(help="annotate frames 0, N, 2N, ...")] = None,
    sequence: Annotated[list[str] | None, typer.Option(help="ingest only this sequence id (repeatable)")] = None,
    labels: Annotated[Path | None, typer.Option(help="folder layout: directory of sparse label PNGs")] = None,
    classes: Annotated[Path | None, typer.Option(help="folder layout: class file (JSON names/palette/ignore_index)")] = None,
    fps: Annotated[float | None, typer.Option(help="frame rate to record when the layout has none")] = None,
    overwrite: Annotated[bool, typer.Option(help="rewrite sequences already in the store")] = False,
) -> None:
    """Ingest a dataset into a store; each sequence is written fully or not at all."""
    from storage.annotation import AnnotationPolicy
    from storage.ingest import IngestOptions
    from storage.ingest import ingest as run_ingest
    from storage.readers import ReaderOptions, read_dataset
    from storage.store import SequenceStore

    policy = AnnotationPolicy.from_options(window=window, keyframe_every=keyframe_every)
    existing = None
    if layout == "folder" and classes is None:
        try:
            existing = SequenceStore.open(store).classes
        except AutolabelError:
            existing = None
    dataset = read_dataset(layout, src, ReaderOptions(labels=labels, classes_file=classes, classes=existing, fps=fps))
    options = IngestOptions(annotation=policy, sequences=sequence or None, overwrite=overwrite)
    selected = dataset.select(options.sequences)
    console.print(f"{layout}: {len(selected)} sequences under {src} ({policy.describe()} annotated)", highlight=False)
    start = time.perf_counter()
    with _progress() as progress:
        report = run_ingest(dataset, store, options, _RichIngestProgress(progress, sum(len(s) for s in selected)))
    _print_report(report, time.perf_counter() - start)
    if not report.ok:
        raise typer.Exit(1)


def store_summary(url: str) -> dict[str, Any]:
    """What ``autolabel info --json`` prints: the store's classes, sequences and totals."""
    from storage.store import SequenceStore

    st = SequenceStore.open(url)
    rows = []
    for seq in st.sequences():
        rows.append({
            "id": seq.id, "frames": seq.num_frames, "width": seq.width, "height": seq.height,
            "fps": seq.fps, "annotated": int(seq.annotated.sum()), "ground_truth": int(seq.has_gt.sum()),
            "annotated_frames": [int(t) for t in seq.annotated.nonzero()[0]],
            "stages": sorted(seq.stages), "bytes": st.nbytes(seq.id), "content_hash": seq.content_hash,
            "source": seq.source,
        })
    totals = {k: sum(r[k] for r in rows) for k in ("frames", "annotated", "ground_truth", "bytes")}
    return {
        "store": url, "schema_version": st.root.attrs["schema_version"], "classes": st.classes.names,
        "ignore_index": st.classes.ignore_index, "sequences": rows,
        "totals": {"sequences": len(rows), **totals}, "incomplete": st.incomplete_ids(),
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@app.command()
def info(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Show a store's sequences: frames, size, annotated and ground-truth counts, stages done."""
    summary = store_summary(store)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


def _print_summary(summary: dict[str, Any], limit: int = 40) -> None:
    table = Table("sequence", "frames", "size", "annotated", "ground truth", "stages", "bytes",
                  title=f"{summary['store']}  ({len(summary['classes'])} classes)")
    for r in summary["sequences"][:limit]:
        table.add_row(r["id"], str(r["frames"]), f"{r['width']}x{r['height']}", str(r["annotated"]),
                      str(r["ground_truth"]), ", ".join(r["stages"]), _human_bytes(r["bytes"]))
    hidden = len(summary["sequences"]) - limit
    if hidden > 0:
        table.add_row(f"... {hidden} more", "", "", "", "", "", "")
    t = summary["totals"]
    table.add_section()
    table.add_row(f"{t['sequences']} sequences", str(t["frames"]), "", str(t["annotated"]),
                  str(t["ground_truth"]), "", _human_bytes(t["bytes"]))
    console.print(table)
    if summary["incomplete"]:
        console.print(f"[yellow]{len(summary['incomplete'])} incomplete sequences[/] (interrupted ingest; "
                      f"run the same ingest again): {', '.join(summary['incomplete'][:10])}", highlight=False)


@app.command()
def synth(
    out: Annotated[str, typer.Argument(help="store path/URL, or a folder with --format apollo")],
    sequences: Annotated[int, typer.Option(help="number of drives")] = 3,
    frames: Annotated[int, typer.Option(help="frames per drive")] = 30,
    size: Annotated[str, typer.Option(help="frame size WIDTHxHEIGHT")] = "320x240",
    seed: Annotated[int, typer.Option(help="seed of the first drive (drive i uses seed + i)")] = 0,
    fps: Annotated[float, typer.Option(help="frame rate")] = 15.0,
    format: Annotated[str, typer.Option("--format", help="store (frames, labels, exact flow) or apollo (ApolloScape folder)")] = "store",
    window: Annotated[int | None, typer.Option(help="store: annotate each N-frame window's centre")] = None,
    keyframe_every: Annotated[int | None, typer.Option(help="store: annotate frames 0, N, 2N, ... (default 10)")] = None,
) -> None:
    """Render synthetic drives with exact labels and flow."""
    from storage.annotation import AnnotationPolicy
    from storage.synthetic import SyntheticConfig, drive_configs
    from storage.synthetic_io import write_apollo_layout, write_synthetic_store

    width, height = _parse_size(size)
    configs = drive_configs(sequences, SyntheticConfig(width=width, height=height, frames=frames, seed=seed, fps=fps))
    start = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("render", total=sequences * frames)
        tick = lambda: progress.advance(task)  # noqa: E731
        if format == "apollo":
            written = write_apollo_layout(Path(out), configs, on_frame=tick)
            console.print(f"wrote {len(written)} ApolloScape-layout drives under {out}", highlight=False)
            return
        if format != "store":
            raise ConfigError(f"--format must be 'store' or 'apollo', got {format!r}")
        policy = AnnotationPolicy.from_options(window=window, keyframe_every=keyframe_every)
        if policy.mode == "all":
            policy = AnnotationPolicy(mode="keyframe-every", n=10)
        report = write_synthetic_store(out, configs, policy, on_frame=tick)
    _print_report(report, time.perf_counter() - start)


@app.command()
def export(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    method: Annotated[str, typer.Option(help="'gt' for the stored labels, or a propagation method")],
    out: Annotated[Path, typer.Option(help="output folder")],
    overlay: Annotated[bool, typer.Option(help="also write the labels blended over the frames")] = False,
    alpha: Annotated[float, typer.Option(help="overlay opacity")] = 0.5,
    sequence: Annotated[list[str] | None, typer.Option(help="export only this sequence (repeatable)")] = None,
) -> None:
    """Export labels as index PNG, colour PNG and (with --overlay) an alpha overlay."""
    from storage.export import export_sequence
    from storage.store import SequenceStore

    st = SequenceStore.open(store)
    seqs = [st.sequence(s) for s in sequence] if sequence else list(st.sequences())
    total, failures = 0, []
    with _progress() as progress:
        task = progress.add_task(f"export {method}", total=sum(s.num_frames for s in seqs))
        for seq in seqs:
            try:
                total += export_sequence(seq, method, out, with_overlay=overlay, alpha=alpha,
                                         on_frame=lambda: progress.advance(task))
            except AutolabelError as exc:
                failures.append((seq.id, str(exc)))
    console.print(f"exported {total} frames of {len(seqs) - len(failures)} sequences to {out}", highlight=False)
    for seq_id, error in failures:
        err_console.print(f"[red]failed[/] {seq_id}: {error}", highlight=False, soft_wrap=True)
    if failures:
        raise typer.Exit(1)


class _StageProgress:
    """LabelProgress shown as a rich bar per stage."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: Any = None

    def stage(self, seq_id: str, stage: str, total: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"{seq_id}: {stage}", total=max(total, 1))

    def advance(self) -> None:
        self.progress.advance(self.task)


def _set_threads() -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)


@app.command()
def flow(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    backend: Annotated[str, typer.Option("--flow", help="dis-ultrafast, dis-fast, dis-medium, farneback, raft")] = "dis-medium",
    variational_refinement: Annotated[bool, typer.Option(help="DIS: add variational refinement")] = False,
    raft_weights: Annotated[Path | None, typer.Option(help="RAFT: local weights file")] = None,
    workers: Annotated[int, typer.Option(help="flow processes (0 = auto: 1 for DIS, one per core otherwise)")] = 0,
    sequence: Annotated[list[str] | None, typer.Option(help="only this sequence (repeatable)")] = None,
) -> None:
    """Compute and store forward and backward optical flow of every frame pair."""
    from models.optical_flow import FlowConfig, FlowEstimator
    from storage.store import SequenceStore
    from tasks.flow_estimation import estimate_flow

    config = FlowConfig(backend=backend, variational_refinement=variational_refinement,
                        raft_weights=raft_weights, workers=workers)
    st = SequenceStore.open(store, mode="r+")
    ids = sequence or st.sequence_ids()
    computed = 0
    with FlowEstimator(config) as estimator, _progress() as progress:
        bar = _StageProgress(progress)
        for seq_id in ids:
            seq = st.sequence(seq_id)
            bar.stage(seq_id, f"flow {config.stored_name}", seq.num_frames - 1)
            computed += estimate_flow(st, seq_id, config, estimator, bar.advance)
    console.print(f"flow {config.stored_name}: computed for {computed} sequences, {len(ids) - computed} already had it")


@app.command("train-teacher")
def train_teacher_cmd(
    store: Annotated[list[str], typer.Option("--store", help="store with annotated frames (repeatable)")],
    out: Annotated[Path, typer.Option(help="checkpoint file to write")],
    epochs: Annotated[int, typer.Option(help="passes over the annotated frames")] = 40,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps")] = None,
    arch: Annotated[str, typer.Option(help="unet-lite (or unet-tiny for tests)")] = "unet-lite",
    batch_size: Annotated[int, typer.Option()] = 8,
    crop: Annotated[int, typer.Option(help="square training crop")] = 256,
    lr: Annotated[float, typer.Option()] = 3e-3,
    sequence: Annotated[list[str] | None, typer.Option(help="only these sequences' annotations")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train the semantic teacher on the annotated frames of one or more stores."""
    _set_threads()
    from models.teacher import Teacher
    from models.teacher_training import TeacherTrainConfig, train_teacher
    from storage.store import SequenceStore
    from storage.training_data import AnnotatedFrames

    data = AnnotatedFrames([SequenceStore.open(s) for s in store], sequence)
    console.print(f"training {arch} on {data.describe()}", highlight=False)
    cfg = TeacherTrainConfig(arch=arch, epochs=epochs, max_steps=max_steps, batch_size=batch_size, crop=crop,
                             lr=lr, device=device, seed=seed)
    classes = data.classes
    teacher = Teacher.create(arch, classes.names, [list(c) for c in classes.palette], classes.ignore_index)
    with _progress() as progress:
        task = progress.add_task("train", total=None)

        def report(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, description=f"train loss {loss:.3f}")

        info = train_teacher(teacher, data, cfg, report)
    teacher.train_info = {**info, "stores": list(store)}
    digest = teacher.save(out)
    console.print(f"wrote {out} ({info['steps']} steps, {info['seconds']} s, final loss {info['final_loss']:.3f}, "
                  f"sha256 {digest[:12]})", highlight=False)


@app.command("train-refiner")
def train_refiner_cmd(
    store: Annotated[list[str], typer.Option("--store", help="store of annotated sequences (repeatable)")],
    teacher: Annotated[Path, typer.Option(help="teacher checkpoint (its labels inpaint, its features feed the refiner)")],
    out: Annotated[Path, typer.Option(help="refiner checkpoint to write")],
    max_cycle: Annotated[int, typer.Option(help="cycles of every length 1..N frames out and back")] = 6,
    steps: Annotated[int, typer.Option(help="training steps")] = 1500,
    batch_size: Annotated[int, typer.Option()] = 8,
    crop: Annotated[int, typer.Option(help="square training crop")] = 256,
    lr: Annotated[float, typer.Option()] = 2e-3,
    rmi_weight: Annotated[float, typer.Option(help="loss = CE + w * RMI")] = 0.5,
    arch: Annotated[str, typer.Option(help="refine-unet-fr (full-resolution head), refine-unet, or refine-tiny for tests")] = "refine-unet-fr",
    flow_backend: Annotated[str, typer.Option("--flow", help="flow backend, or 'exact' for synthetic drives")] = "dis-medium",
    adapt_steps: Annotated[int, typer.Option(help="teacher adaptation per sequence, as used for labelling")] = 0,
    max_samples: Annotated[int | None, typer.Option(help="use at most this many cycles of each store")] = None,
    sequence: Annotated[list[str] | None, typer.Option(help="only these sequences (ids or globs)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train the refinement network on forward-backward cycles from the annotated frames (no extra labels)."""
    _set_threads()
    from models.optical_flow import FlowConfig
    from models.propagation import PropagationConfig
    from models.refiner_training import RefinerTrainConfig
    from tasks.refiner_training import RefinerRequest, train_refiner_from_stores

    request = RefinerRequest(
        stores=store, teacher=teacher, out=out, adapt_steps=adapt_steps, max_samples=max_samples,
        sequences=sequence or None, flow=FlowConfig(backend=flow_backend, device=device),
        propagation=PropagationConfig(method="warp-inpaint", device=device),
        train=RefinerTrainConfig(arch=arch, max_cycle=max_cycle, steps=steps, batch_size=batch_size, crop=crop,
                                 lr=lr, rmi_weight=rmi_weight, device=device, seed=seed),
    )
    with _progress() as progress:
        cycles = progress.add_task("cycles", total=None)
        train = progress.add_task("train", total=None)

        def on_sample(done: int, total: int) -> None:
            progress.update(cycles, completed=done, total=total, description="cycles")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(train, completed=step, total=total, description=f"train loss {loss:.3f}")

        info = train_refiner_from_stores(request, _StageProgress(progress), on_sample, on_step)
    fit = info["fit"]
    console.print(f"wrote {out} ({info['samples']} cycles, {info['steps']} steps, {info['seconds']} s, "
                  f"{info['samples_per_second']} samples/s, final loss {info['final_loss']:.3f}; on the cycles: "
                  f"mIoU {fit['cycled_miou']} -> {fit['refined_miou']}; sha256 {info['sha256'][:12]})", highlight=False)


@app.command()
def label(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    method: Annotated[str, typer.Option(help="motion-only, semantic-only, warp-inpaint, warp-refine")],
    teacher: Annotated[Path | None, typer.Option(help="teacher checkpoint (methods that use one)")] = None,
    refiner: Annotated[Path | None, typer.Option(help="refiner checkpoint (warp-refine)")] = None,
    max_distance: Annotated[int, typer.Option(help="K: frames to propagate each way")] = 10,
    tau: Annotated[float, typer.Option(help="warp-inpaint photometric threshold (0-255 RGB distance)")] = 40.0,
    inpaint_confidence: Annotated[float, typer.Option(help="warp-inpaint: teacher probability needed to inpaint an untrusted pixel (0 = paper's Eq. 5)")] = 0.9,
    override_confidence: Annotated[float, typer.Option(help="warp-inpaint: teacher probability that overrides a trusted warp (1 = never)")] = 0.98,
    flow_backend: Annotated[str, typer.Option("--flow", help="flow backend, or 'exact' for synthetic drives")] = "dis-medium",
    adapt_steps: Annotated[int, typer.Option(help="fine-tune the teacher on each sequence's annotations first")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    workers: Annotated[int, typer.Option(help="flow processes (0 = auto: 1 for DIS, one per core otherwise)")] = 0,
    sequence: Annotated[list[str] | None, typer.Option(help="only this sequence (repeatable)")] = None,
) -> None:
    """Propagate the annotations with a method; re-runs skip sequences already labelled alike."""
    _set_threads()
    from models.optical_flow import FlowConfig
    from models.propagation import PropagationConfig
    from tasks.label import LabelRequest, label_store

    request = LabelRequest(
        propagation=PropagationConfig(method=method, max_distance=max_distance, tau=tau, device=device,
                                      inpaint_confidence=inpaint_confidence, override_confidence=override_confidence),
        flow=FlowConfig(backend=flow_backend, workers=workers, device=device),
        teacher=teacher, refiner=refiner, adapt_steps=adapt_steps, sequences=sequence or None,
    )
    start = time.perf_counter()
    with _progress() as progress:
        report = label_store(store, request, _StageProgress(progress))
    counts = {s: sum(o.status == s for o in report.outcomes) for s in ("labelled", "skipped", "failed")}
    console.print(f"{method}: labelled {counts['labelled']}, skipped {counts['skipped']} (already done), "
                  f"failed {counts['failed']} in {time.perf_counter() - start:.1f} s", highlight=False)
    for o in report.failed:
        err_console.print(f"[red]failed[/] {o.id}: {o.error}", highlight=False, soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)


@app.command()
def evaluate(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    method: Annotated[list[str], typer.Option(help="method to score (repeatable)")],
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
    max_distance: Annotated[int, typer.Option(help="score distances 1..K")] = 10,
    sequence: Annotated[list[str] | None, typer.Option(help="only these sequences (ids or globs)")] = None,
    plot: Annotated[Path | None, typer.Option(help="write mIoU-vs-distance and per-class IoU PNGs to this folder")] = None,
) -> None:
    """Score labelled methods against the stored ground truth: mIoU by distance, class, sequence."""
    from storage.ids import select_ids
    from storage.store import SequenceStore
    from tasks.evaluate import evaluate_store

    st = SequenceStore.open(store)
    ids = select_ids(st.sequence_ids(), sequence, f"store {store!r}")
    report = evaluate_store(st, method, max_distance, sequences=ids)
    _print_evaluation(report)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {json_out}")
    if plot is not None:
        from autolabel.plots import plot_report

        for path in plot_report(report, plot):
            console.print(f"wrote {path}")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _print_evaluation(report: dict[str, Any]) -> None:
    k = report["max_distance"]
    table = Table(Column("method", no_wrap=True), *[Column(f"d={d}", justify="right") for d in range(1, k + 1)],
                  Column("mean", justify="right"), Column("frames", justify="right"),
                  title=f"mIoU (%) by propagation distance - {report['store']}", padding=(0, 1))
    for name, m in report["methods"].items():
        table.add_row(name, *[_fmt(m["miou_by_distance"][str(d)]) for d in range(1, k + 1)],
                      _fmt(m["miou_mean"]), str(m["frames_scored"]))
    console.print(table)
    for name, m in report["methods"].items():
        if m["sequences_missing"]:
            console.print(f"[yellow]{name}[/]: no results for {len(m['sequences_missing'])} sequences "
                          f"({', '.join(m['sequences_missing'][:5])}); run `autolabel label` first", highlight=False)


def _annotation_policy(window: int | None, keyframe_every: int | None) -> Any:
    from storage.annotation import AnnotationPolicy

    if window and keyframe_every:
        raise ConfigError("choose one of --window and --keyframe-every")
    if window:
        return AnnotationPolicy(mode="window", n=window)
    if keyframe_every:
        return AnnotationPolicy(mode="keyframe-every", n=keyframe_every)
    return AnnotationPolicy()


def _print_flow_result(result: dict[str, Any], method: str) -> None:
    report = result["report"]
    table = Table("sequence", "frames", "labelled", "mIoU (%)", "coverage (%)", "confidence (%)", "worker",
                  title=f"{method}: per sequence")
    for row in report["rows"].get(method, []):
        miou = _fmt(row["miou"]) if row["has_gt"] else "no ground truth"
        table.add_row(row["sequence"], str(row["frames"]), str(row["frames_labelled"]), miou,
                      _fmt(row["coverage"]), _fmt(row["mean_confidence"]), result["workers"].get(row["sequence"], "-"))
    console.print(table)
    distances = list(next(iter(report["miou_by_distance"].values()), {}))
    by_d = Table("method", *[f"d={d}" for d in distances], "mean", title="mIoU (%) by distance, pooled")
    for m, values in report["miou_by_distance"].items():
        by_d.add_row(m, *[_fmt(values[d]) for d in distances], _fmt(report["miou_mean"][m]))
    console.print(by_d)
    for seq, err in result["failed"].items():
        err_console.print(f"[red]failed[/] {seq}: {err}", highlight=False, soft_wrap=True)


@app.command()
def run(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    teacher: Annotated[Path, typer.Option(help="teacher checkpoint")],
    refiner: Annotated[Path | None, typer.Option(help="refiner checkpoint (warp-refine)")] = None,
    method: Annotated[str, typer.Option(help="warp-refine (stores warp-inpaint too) or warp-inpaint")] = "warp-refine",
    inbox: Annotated[Path | None, typer.Option(help="ingest new or changed drives from this folder first")] = None,
    layout: Annotated[str, typer.Option(help="the inbox's layout: apollo, camvid, davis, cityscapes, folder")] = "apollo",
    window: Annotated[int | None, typer.Option(help="inbox: annotate each N-frame window's centre")] = None,
    keyframe_every: Annotated[int | None, typer.Option(help="inbox: annotate frames 0, N, 2N, ...")] = None,
    flow_backend: Annotated[str, typer.Option("--flow", help="flow backend")] = "dis-medium",
    adapt_steps: Annotated[int, typer.Option(help="per-sequence teacher adaptation steps")] = 0,
    export: Annotated[Path | None, typer.Option(help="write index / colour / overlay PNGs here")] = None,
    deployment: Annotated[str | None, typer.Option(help="fan out to this deployment's workers (label-sequence/gpu)")] = None,
    only_stale: Annotated[bool, typer.Option(help="only drives that are new, changed or labelled with other checkpoints")] = False,
    sequence: Annotated[list[str] | None, typer.Option(help="only these sequences (ids or globs)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """The whole job through the Prefect flows: ingest -> label every sequence -> evaluate -> dashboard."""
    _set_threads()
    from flows.autolabel_flow import autolabel_flow
    from flows.run_requests import AutolabelRequest, LabelSettings
    from models.optical_flow import FlowConfig
    from models.propagation import PropagationConfig

    request = AutolabelRequest(
        store=store, inbox=str(inbox) if inbox else None, layout=layout,
        annotation=_annotation_policy(window, keyframe_every), sequences=sequence or None, only_stale=only_stale,
        label_deployment=deployment,
        label=LabelSettings(method=method, teacher=str(teacher), refiner=str(refiner) if refiner else None,
                            propagation=PropagationConfig(method=method, device=device),
                            flow=FlowConfig(backend=flow_backend, device=device), adapt_steps=adapt_steps,
                            export_dir=str(export) if export else None))
    result = autolabel_flow(request)
    _print_flow_result(result, method)
    if result["failed"]:
        raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for the demo inbox, store, checkpoints and exports")] = Path("demo-output"),
    sequences: Annotated[int, typer.Option(help="synthetic drives")] = 3,
    frames: Annotated[int, typer.Option(help="frames per drive")] = 42,
    size: Annotated[str, typer.Option(help="frame size WIDTHxHEIGHT")] = "256x192",
    teacher_steps: Annotated[int, typer.Option(help="teacher training steps")] = 300,
    refiner_steps: Annotated[int, typer.Option(help="refiner training steps")] = 150,
    fresh: Annotated[bool, typer.Option(help="delete an earlier demo output first")] = True,
) -> None:
    """The main job on built-in synthetic drives, through the same Prefect flows as production (in-process):
    ApolloScape-layout inbox -> ingest -> train a teacher and a refiner -> warp-refine labelling ->
    evaluation table -> overlays exported."""
    _set_threads()
    from flows.autolabel_flow import autolabel_flow
    from flows.run_requests import AutolabelRequest, LabelSettings
    from flows.training import RefinerRequest, RefinerTrainConfig, TeacherRequest, train_refiner_flow, train_teacher_flow
    from models.optical_flow import FlowConfig
    from models.teacher_training import TeacherTrainConfig
    from storage.annotation import AnnotationPolicy
    from storage.ingest import IngestOptions, ingest as ingest_dataset
    from storage.readers import read_dataset
    from storage.synthetic import SyntheticConfig, drive_configs
    from storage.synthetic_io import write_apollo_layout

    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    width, height = _parse_size(size)
    inbox, store_url = out / "inbox", str(out / "apollo.zarr")
    policy = AnnotationPolicy(mode="window", n=21) if frames >= 21 else AnnotationPolicy(mode="keyframe-every", n=10)
    console.rule(f"1. render {sequences} synthetic drives as an ApolloScape inbox and ingest them")
    write_apollo_layout(inbox, drive_configs(sequences, SyntheticConfig(width=width, height=height, frames=frames,
                                                                       seed=0)))
    report = ingest_dataset(read_dataset("apollo", inbox), store_url, IngestOptions(annotation=policy))
    console.print(f"ingested {len(report.by_status('ingested'))} drives; annotated frames: "
                  f"{sum(o.annotated for o in report.outcomes)} (window centres), the rest is ground truth for scoring",
                  highlight=False)
    _print_summary(store_summary(store_url))
    console.rule("2. train the teacher on the annotated frames (flow train-teacher)")
    teacher_path, refiner_path = out / "teacher.pt", out / "refiner.pt"
    crop = min(128, width, height) // 32 * 32
    train_teacher_flow(TeacherRequest(stores=[store_url], out=str(teacher_path), train=TeacherTrainConfig(
        max_steps=teacher_steps, crop=max(crop, 64), batch_size=8)))
    console.rule("3. train the refiner on forward-backward cycles (flow train-refiner)")
    flow = FlowConfig(backend="dis-fast")
    train_refiner_flow(RefinerRequest(stores=[store_url], teacher=teacher_path, out=refiner_path, flow=flow,
                                      train=RefinerTrainConfig(steps=refiner_steps, crop=max(crop, 64), batch_size=8)))
    console.rule("4. label every drive with warp-refine, evaluate, publish the dashboard (flow autolabel)")
    request = AutolabelRequest(
        store=store_url, inbox=str(inbox), layout="apollo", annotation=policy,
        label=LabelSettings(method="warp-refine", teacher=str(teacher_path), refiner=str(refiner_path), flow=flow,
                            export_dir=str(out / "export")))
    result = autolabel_flow(request)
    console.rule("5. results")
    _print_flow_result(result, "warp-refine")
    console.print(f"overlays, colour and index PNGs: {out / 'export'}/<sequence>/", highlight=False)
    if result["failed"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    main()
