"""Commands about data: ``ingest``, ``info``, ``synth``, ``export``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from autolabel.cli.console import IngestBar, StageBar, console, print_failures, progress_display
from autolabel.cli.options import KeyframeEvery, Sequences, Window, check_methods, check_outside_store, parse_size
from autolabel.cli.reports import print_ingest_report, print_store_summary
from autolabel.errors import AutolabelError, ConfigError, StageNotDoneError
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.export import OVERLAY_ALPHA
from autolabel.wording import count


def ingest(
    layout: Annotated[str, typer.Argument(help="dataset layout: camvid, davis, cityscapes, apollo, folder; or "
                                               "cvat-mask (a CVAT 'Segmentation mask 1.1' export of keyframes)")],
    src: Annotated[Path, typer.Argument(help="dataset root (a video file or frame folder for 'folder'; the "
                                             "export zip or folder for 'cvat-mask')")],
    store: Annotated[str, typer.Option("--store", help="store path or fsspec URL (created if missing)")],
    window: Window = None,
    keyframe_every: KeyframeEvery = None,
    sequence: Sequences = None,
    labels: Annotated[Path | None, typer.Option(help="folder layout: directory of sparse label PNGs")] = None,
    allow_unlabelled: Annotated[bool, typer.Option(
        help="folder layout: ingest a sequence even when no file in --labels matches its frames")] = False,
    classes: Annotated[Path | None, typer.Option(help="folder layout: class file (JSON names/palette/ignore_index)")] = None,
    fps: Annotated[float | None, typer.Option(help="frame rate to record when the layout has none")] = None,
    overwrite: Annotated[bool, typer.Option(help="rewrite sequences already in the store")] = False,
    frames: Annotated[Path | None, typer.Option(help="cvat-mask: a frame folder (or video) to ingest as a new "
                                                     "sequence whose keyframes the export holds")] = None,
) -> None:
    """Ingest a dataset into a store; each sequence is written fully or not at all.

    With layout cvat-mask the export's masks become keyframes of frames already in the store
    (images named '<sequence>/<frame>', or --sequence ID), or of a new sequence from --frames.
    """
    if layout == "cvat-mask":
        _ingest_cvat(src, store, sequence, frames, fps)
        return
    from autolabel.storage.ingest import IngestOptions
    from autolabel.storage.ingest import ingest as run_ingest
    from autolabel.storage.readers import ReaderOptions, read_dataset
    from autolabel.storage.store import SequenceStore

    policy = AnnotationPolicy.from_options(window=window, keyframe_every=keyframe_every)
    existing = None
    if layout == "folder" and classes is None:
        try:
            existing = SequenceStore.open(store).classes
        except AutolabelError:
            existing = None
    dataset = read_dataset(layout, src, ReaderOptions(labels=labels, classes_file=classes, classes=existing, fps=fps,
                                                            allow_unlabelled=allow_unlabelled))
    options = IngestOptions(annotation=policy, sequences=sequence or None, overwrite=overwrite)
    selected = dataset.select(options.sequences)
    console.print(f"{layout}: {count(len(selected), 'sequence')} under {src} ({policy.describe()} annotated)",
                  highlight=False)
    start = time.perf_counter()
    with progress_display() as progress:
        report = run_ingest(dataset, store, options, IngestBar(progress, sum(len(s) for s in selected)))
    print_ingest_report(report, time.perf_counter() - start)
    if not report.ok:
        raise typer.Exit(1)


def _ingest_cvat(src: Path, store: str, sequence: list[str] | None, frames: Path | None, fps: float | None) -> None:
    from autolabel.storage.cvat import import_keyframes, read_cvat_masks
    from autolabel.storage.ingest import IngestOptions
    from autolabel.storage.ingest import ingest as run_ingest
    from autolabel.storage.readers import ReaderOptions, read_dataset
    from autolabel.storage.store import SequenceStore

    if sequence is not None and len(sequence) != 1:
        raise ConfigError("ingest cvat-mask takes at most one --sequence (the sequence of bare image names)")
    target = sequence[0] if sequence else None
    st = SequenceStore.open(store, mode="r+")
    if frames is not None:
        read_cvat_masks(src, st.classes)  # check the export before anything is written
        dataset = read_dataset("folder", frames, ReaderOptions(classes=st.classes, fps=fps, allow_unlabelled=True))
        if len(dataset.sequences) != 1:
            raise ConfigError(f"--frames {frames} holds {count(len(dataset.sequences), 'sequence')}; "
                              "give one frame folder")
        report = run_ingest(dataset, store, IngestOptions())
        if not report.ok:
            print_ingest_report(report, 0.0)
            raise typer.Exit(1)
        target = dataset.sequences[0].id
    added = import_keyframes(st, src, target)
    for seq_id, keyframes in added.items():
        console.print(f"{seq_id}: {count(len(keyframes), 'keyframe')} from {src} ({', '.join(map(str, keyframes[:8]))}"
                      f"{', ...' if len(keyframes) > 8 else ''})", highlight=False)
    console.print(f"run `autolabel label {store} ...` to relabel the frames that depend on them", highlight=False)


def info(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Show a store's sequences: frames, size, annotated and ground-truth counts, stages done."""
    from autolabel.storage.queries import store_summary

    summary = store_summary(store)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    print_store_summary(summary)


def synth(
    out: Annotated[str, typer.Argument(help="store path/URL, or a folder with --format apollo")],
    sequences: Annotated[int, typer.Option(help="number of drives")] = 3,
    frames: Annotated[int, typer.Option(help="frames per drive")] = 30,
    size: Annotated[str, typer.Option(help="frame size WIDTHxHEIGHT")] = "320x240",
    seed: Annotated[int, typer.Option(help="seed of the first drive (drive i uses seed + i)")] = 0,
    fps: Annotated[float, typer.Option(help="frame rate")] = 15.0,
    format: Annotated[str, typer.Option("--format", help="store (frames, labels, exact flow) or apollo (ApolloScape folder)")] = "store",
    window: Window = None,
    keyframe_every: Annotated[int | None, typer.Option(help="store: annotate frames 0, N, 2N, ... (default 10)")] = None,
) -> None:
    """Render synthetic drives with exact labels and flow."""
    from autolabel.storage.synthetic import SyntheticConfig, drive_configs
    from autolabel.storage.synthetic_io import (
        write_apollo_layout,
        write_synthetic_store,
    )

    width, height = parse_size(size)
    if format not in ("store", "apollo"):
        raise ConfigError(f"--format must be 'store' or 'apollo', got {format!r}")
    policy = AnnotationPolicy.from_options(window=window, keyframe_every=keyframe_every)
    if policy.mode == "all":
        policy = AnnotationPolicy(mode="keyframe-every", n=10)
    configs = drive_configs(sequences, SyntheticConfig(width=width, height=height, frames=frames, seed=seed, fps=fps))
    start = time.perf_counter()
    with progress_display() as progress:
        task = progress.add_task("render", total=sequences * frames)

        def tick() -> None:
            progress.advance(task)

        if format == "apollo":
            written = write_apollo_layout(Path(out), configs, on_frame=tick)
            console.print(f"wrote {len(written)} ApolloScape-layout drives under {out}", highlight=False)
            return
        report = write_synthetic_store(out, configs, policy, on_frame=tick)
    print_ingest_report(report, time.perf_counter() - start)


def export(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    method: Annotated[str, typer.Option(help="'gt' for the stored labels, or a propagation method")],
    out: Annotated[Path, typer.Option(help="output folder")],
    overlay: Annotated[bool, typer.Option(help="also write the labels blended over the frames, with class "
                                                "boundaries")] = False,
    alpha: Annotated[float, typer.Option(help="overlay opacity of the class colours")] = OVERLAY_ALPHA,
    sequence: Sequences = None,
    format: Annotated[str, typer.Option("--format", help="png (index, colour, overlay PNGs), cvat-mask (a CVAT "
                                                          "'Segmentation mask 1.1' task), or a training set: "
                                                          "cityscapes (gtFine-style tree) or folder (images + "
                                                          "index PNGs), each with classes.json and a manifest")] = "png",
    frames: Annotated[Path | None, typer.Option(help="cvat-mask: only the frames of this queue (queue.json of "
                                                     "`autolabel review` or --json of suggest-keyframes)")] = None,
    min_confidence: Annotated[float, typer.Option(help="cityscapes/folder: propagated pixels below this confidence "
                                                       "become ignore (255); keyframes are kept whole")] = 0.0,
    split: Annotated[str, typer.Option(help="cityscapes: the split folder name")] = "train",
) -> None:
    """Export labels as index PNG, colour PNG and (with --overlay) an overlay on the frame, for CVAT, or as a
    training set (Cityscapes-like or folder, with a manifest of distance and confidence per frame)."""
    from autolabel.storage.export import export_sequence, label_frames
    from autolabel.storage.ids import select_ids
    from autolabel.storage.queries import sequences_with_results
    from autolabel.storage.stages import GROUND_TRUTH
    from autolabel.storage.store import SequenceStore

    check_outside_store(out, store)
    st = SequenceStore.open(store)
    seqs = [st.sequence(s) for s in select_ids(st.sequence_ids(), sequence, f"store {store!r}")]
    if format not in ("png", "cvat-mask", "cityscapes", "folder"):
        raise ConfigError(f"--format must be png, cvat-mask, cityscapes or folder, got {format!r}")
    if method != GROUND_TRUTH:
        try:
            sequences_with_results(st, [method], [s.id for s in seqs], "export")
        except StageNotDoneError:  # no results: a name that is no method says so (torch imported only here)
            check_methods([method], f", or {GROUND_TRUTH!r} for the stored labels")
            raise
    if format in ("cityscapes", "folder"):
        from autolabel.storage.training_export import export_training_set

        with progress_display() as progress:
            task = progress.add_task(f"export {method}", total=sum(s.num_frames for s in seqs))
            rows, failures = export_training_set(st, method, out, [s.id for s in seqs], format, min_confidence,
                                                 split, on_frame=lambda: progress.advance(task))
        keyframes = sum(r.keyframe for r in rows)
        console.print(f"exported {count(len(rows), 'frame')} ({count(keyframes, 'keyframe')}) of "
                      f"{count(len(seqs) - len(failures), 'sequence')} "
                      f"as a {format} training set to {out} (manifest.csv, classes.json)", highlight=False)
        print_failures(failures)
        if failures:
            raise typer.Exit(1)
        return
    if format == "cvat-mask":
        from autolabel.storage.cvat import export_frames, zip_export

        if frames is not None:
            try:
                queue = json.loads(frames.read_text())["frames"]
                chosen = [(f["sequence"], int(f["t"])) for f in queue]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{frames}: not a frame queue of `autolabel review` ({exc})") from None
        else:
            chosen = [(seq.id, t) for seq in seqs for t in label_frames(seq, method)[0]]
        written = export_frames(st, method, out, chosen)
        archive = zip_export(out, out.with_suffix(".zip"))
        console.print(f"exported {count(written, 'frame')} as a CVAT 'Segmentation mask 1.1' task to {out} "
                      f"and {archive}",
                      highlight=False)
        return
    total, failures = 0, []
    with progress_display() as progress:
        task = progress.add_task(f"export {method}", total=sum(s.num_frames for s in seqs))
        for seq in seqs:
            try:
                total += export_sequence(seq, method, out, with_overlay=overlay, alpha=alpha,
                                         on_frame=lambda: progress.advance(task))
            except AutolabelError as exc:
                failures.append((seq.id, str(exc)))
    console.print(f"exported {count(total, 'frame')} of {count(len(seqs) - len(failures), 'sequence')} to {out}",
                  highlight=False)
    print_failures(failures)
    if failures:
        raise typer.Exit(1)


def verify(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    quick: Annotated[bool, typer.Option(help="only list chunks (do not decode them)")] = False,
    repair: Annotated[bool, typer.Option(help="drop damaged results of later stages so `label` recomputes them")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of text")] = False,
    sequence: Sequences = None,
) -> None:
    """Check every sequence for missing or corrupt chunks and bad metadata; exit 1 on any problem."""
    from autolabel.cli.reports import print_verify_report
    from autolabel.storage.integrity import verify_store

    with progress_display(transient=True) as progress:
        report = verify_store(store, decode=not quick, repair=repair, progress=StageBar(progress), sequences=sequence)
    if as_json:
        typer.echo(json.dumps({"store": report.store, "sequences": report.sequences, "ok": report.ok,
                               "problems": report.problems, "notes": report.notes}, indent=2))
    else:
        print_verify_report(report)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    for command in (ingest, info, synth, export, verify):
        app.command()(command)
