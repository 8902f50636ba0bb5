"""Commands for people: ``review`` (frames to correct, as a CVAT task) and ``suggest-keyframes``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from autolabel.atomic import write_text_atomic
from autolabel.cli.console import console, print_table, progress_display, table
from autolabel.cli.options import Sequences, check_methods, check_outside_store, default, describe
from autolabel.tasks.review import ReviewConfig
from autolabel.wording import count

Method = Annotated[str, typer.Option(help=describe(ReviewConfig, "method"))]
Budget = Annotated[int, typer.Option(help=describe(ReviewConfig, "budget"))]


def _errors(store: str, method: str, sequence: list[str] | None, action: str):  # noqa: ANN202 - (errors, K per sequence)
    from autolabel.storage.ids import select_ids
    from autolabel.storage.queries import sequences_with_results
    from autolabel.storage.store import SequenceStore
    from autolabel.tasks.review import store_frame_errors

    check_methods([method])
    st = SequenceStore.open(store)
    ids = select_ids(st.sequence_ids(), sequence, f"store {store!r}")
    ids = sequences_with_results(st, [method], ids, action)  # the progress counts the frames read
    with progress_display() as progress:
        task = progress.add_task(f"read {method}", total=sum(st.sequence(i).num_frames for i in ids))
        errors, ks = store_frame_errors(st, method, ids, lambda: progress.advance(task))
    return st, errors, ks


def _print_choices(title: str, choices: list, what: str) -> None:  # noqa: ANN001
    out = table(["sequence", "frame"], ["t", "d", "est. err %", "disagree %", what])
    for c in choices:
        out.add_row(c.sequence, c.frame, str(c.t), str(c.distance), f"{100 * c.error:.1f}",
                    f"{100 * c.disagreement:.1f}", f"{c.score:.3f}")
    print_table(title, out, "est. err: estimated share of wrong pixels (no ground truth); d: distance to its keyframe")


def review(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    out: Annotated[Path, typer.Option(help="folder for the queue (queue.json) and the CVAT task")],
    method: Method = default(ReviewConfig, "method"),
    budget: Budget = default(ReviewConfig, "budget"),
    sequence: Sequences = None,
    images: Annotated[bool, typer.Option(help="include the frames (JPEGImages/) for a new CVAT task")] = True,
) -> None:
    """Rank frames by estimated error and export the worst as a CVAT 'Segmentation mask 1.1' task.

    Correct them in CVAT, export as 'Segmentation mask 1.1' and bring them back with
    `autolabel ingest cvat-mask EXPORT.zip --store STORE`; the next `label` relabels only the
    frames that depend on them.
    """
    from autolabel.storage.cvat import export_frames, zip_export
    from autolabel.tasks.review import review_queue

    check_outside_store(out, store)

    config = ReviewConfig(method=method, budget=budget)
    st, errors, _ = _errors(store, method, sequence, "review")
    queue = review_queue(errors, config)
    _print_choices(f"review queue: {method}, {count(len(queue), 'frame')}, worst first", queue, "score")
    task = out / "cvat-task"
    written = export_frames(st, method, task, [(c.sequence, c.t) for c in queue], with_images=images)
    archive = zip_export(task, out / "cvat-task.zip")
    write_text_atomic(out / "queue.json", json.dumps({"store": store, "method": method,
                                                "frames": [c.as_dict() for c in queue]}, indent=2))
    console.print(f"wrote {count(written, 'frame')} to {task} and {archive}; queue in {out / 'queue.json'}",
                  highlight=False)


def suggest_keyframes(
    store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
    budget: Budget = default(ReviewConfig, "budget"),
    method: Method = default(ReviewConfig, "method"),
    per_block: Annotated[int | None, typer.Option(help=describe(ReviewConfig, "per_block"))] = None,
    sequence: Sequences = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the suggestions here")] = None,
    out: Annotated[Path | None, typer.Option(help="also export the suggested frames as a CVAT task here")] = None,
) -> None:
    """Propose the frames whose manual label would improve the most labels (estimated, no ground truth)."""
    from autolabel.tasks.review import suggest_keyframes as suggest

    check_outside_store(out, store)
    config = ReviewConfig(method=method, budget=budget, per_block=per_block)
    st, errors, ks = _errors(store, method, sequence, "suggest keyframes for")
    picks = suggest(errors, ks, config)
    _print_choices(f"suggested keyframes: {len(picks)}, best first", picks, "gain")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json_out, json.dumps({"store": store, "method": method,
                                        "frames": [c.as_dict() for c in picks]}, indent=2))
        console.print(f"wrote {json_out}", highlight=False)
    if out is not None:
        from autolabel.storage.cvat import export_frames, zip_export

        written = export_frames(st, method, out / "cvat-task", [(c.sequence, c.t) for c in picks])
        zip_export(out / "cvat-task", out / "cvat-task.zip")
        console.print(f"wrote {count(written, 'frame')} to {out / 'cvat-task'}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(review)
    app.command("suggest-keyframes")(suggest_keyframes)
