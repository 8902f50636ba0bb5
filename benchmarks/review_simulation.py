"""Simulated review: does a keyframe chosen by ``suggest-keyframes`` help more than a fixed one?

    python benchmarks/review_simulation.py --workdir runs/quality [--datasets synthetic davis]

Run after ``quality_estimate.py`` (it labels the stores and trains the checkpoints used here).
For every 21-frame window of every sequence with ground truth, one frame is added as a keyframe,
its ground truth playing the reviewer's correction:

* ``suggested``: ``suggest-keyframes`` with one frame per window (``per_block=21``), from the
  estimate alone (no ground truth read);
* ``quarter``: the frame at the window's quarter point (window start + 5).

Each arm is a copy of the store, relabelled (only the frames that depend on the new keyframes are
propagated again) and scored on the same frames: every frame with ground truth except the
original keyframes (a new keyframe counts with its corrected label). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._report import machine, print_table, write_json  # noqa: E402
from benchmarks.propagation_quality import log  # noqa: E402
from autolabel.models.metrics import confusion_matrix, mean_iou  # noqa: E402
from autolabel.models.optical_flow import FlowConfig  # noqa: E402
from autolabel.models.propagation import PropagationConfig  # noqa: E402
from autolabel.models.quality import EstimateConfig  # noqa: E402
from autolabel.storage.store import SequenceStore  # noqa: E402
from autolabel.tasks.pipeline import LabelSettings, label_store  # noqa: E402
from autolabel.tasks.review import ReviewConfig, store_frame_errors, suggest_keyframes  # noqa: E402

WINDOW = 21
METHODS = ["warp-inpaint", "warp-refine"]


def score(store: SequenceStore, method: str, original: dict[str, np.ndarray]) -> float:
    """mIoU over every frame with ground truth except the original keyframes (new keyframes included)."""
    c, ignore = store.classes.num_classes, store.classes.ignore_index
    cm = np.zeros((c, c + 1), np.int64)
    for seq_id, keys in original.items():
        seq = store.sequence(seq_id)
        labels = seq.array(f"results/{method}/labels")
        gt_frames = np.asarray(seq.array("has_gt")[:], dtype=bool)
        for t in np.flatnonzero(gt_frames & ~keys):
            cm += confusion_matrix(np.asarray(seq.array("gt")[int(t)]), np.asarray(labels[int(t)]), c, ignore)
    return round(mean_iou(cm), 2)


def relabel(url: str, sequences: list[str], teacher: Path, refiner: Path, args: argparse.Namespace) -> float:
    start = time.perf_counter()
    for method in METHODS:
        settings = LabelSettings(
            propagation=PropagationConfig(method=method, max_distance=10, tau=args.tau),
            flow=FlowConfig(backend=args.flow, workers=args.workers), teacher=str(teacher), refiner=str(refiner),
            compare_with_warp_inpaint=False, estimate=EstimateConfig(enabled=False))
        report = label_store(url, settings, sequences)
        if report.failed:
            raise SystemExit(f"{method} failed: {report.failed[0].error}")
    return time.perf_counter() - start


def simulate(name: str, url: str, groups: list[tuple[list[str], Path, Path]], args: argparse.Namespace) -> dict[str, Any]:
    """``groups``: (sequences, teacher, refiner) labelled together (DAVIS: one per cross-fitted half)."""
    store = SequenceStore.open(url)
    ids = [s for g in groups for s in g[0]]
    original = {s: store.sequence(s).annotated.copy() for s in ids}
    errors, ks = store_frame_errors(store, "warp-refine", ids)
    blocks = sum(len({int(t) // WINDOW for t in np.flatnonzero(~original[s])}) for s in ids)
    picks = suggest_keyframes(errors, ks, ReviewConfig(method="warp-refine", budget=blocks, per_block=WINDOW))
    suggested: dict[str, list[int]] = {}
    for p in picks:
        suggested.setdefault(p.sequence, []).append(p.t)
    quarter: dict[str, list[int]] = {}
    for s in ids:
        n = store.sequence(s).num_frames
        quarter[s] = [b + WINDOW // 4 for b in range(0, n, WINDOW) if b + WINDOW // 4 < n
                      and not original[s][b + WINDOW // 4]]
    out: dict[str, Any] = {"frames_added": {"suggested": len(picks), "quarter": sum(map(len, quarter.values()))},
                           "baseline": {m: score(store, m, original) for m in METHODS}}
    for arm, chosen in (("suggested", suggested), ("quarter", quarter)):
        copy = str(args.workdir / f"review-{name}-{arm}.zarr")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(url, copy)
        st = SequenceStore.open(copy, mode="r+")
        for seq_id, frames in chosen.items():
            seq = st.sequence(seq_id)
            st.add_keyframes(seq_id, {t: seq.ground_truth(t) for t in frames}, source=f"simulated review ({arm})")
        seconds = 0.0
        for sequences, teacher, refiner in groups:
            seconds += relabel(copy, sequences, teacher, refiner, args)
        out[arm] = {m: score(SequenceStore.open(copy), m, original) for m in METHODS}
        out[arm]["seconds"] = round(seconds, 1)
        out[arm]["frames"] = {s: sorted(v) for s, v in chosen.items()}
        log(f"  {name} {arm}: {out[arm]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/quality"))
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "davis"])
    parser.add_argument("--flow", default="dis-medium")
    parser.add_argument("--tau", type=float, default=40.0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    w = args.workdir
    results: dict[str, Any] = {}
    for name in args.datasets:
        log(f"== {name}")
        if name == "synthetic":
            url = str(w / "synth-varied.zarr")
            groups = [(SequenceStore.open(url).sequence_ids(), w / "teacher-synth.pt", w / "refiner-synth.pt")]
        else:
            url = str(w / "davis-x.zarr")
            ids = SequenceStore.open(url).sequence_ids()
            half = len(ids) // 2
            # each half was labelled with the teacher and refiner trained on the other half
            groups = [(ids[half:], w / "teacher-davis-a.pt", w / "refiner-davis-a.pt"),
                      (ids[:half], w / "teacher-davis-b.pt", w / "refiner-davis-b.pt")]
        results[name] = simulate(name, url, groups, args)
    rows = []
    for name, r in results.items():
        for m in METHODS:
            rows.append([name, m, r["baseline"][m], r["quarter"][m], r["suggested"][m],
                         f"{r['suggested'][m] - r['quarter'][m]:+.2f}", r["frames_added"]["suggested"]])
    print_table("mIoU (%) after adding one keyframe per 21-frame window (ground truth as the reviewer)",
                ["dataset", "method", "no new", "quarter", "suggested", "gain", "added"], rows)
    write_json("review_simulation", {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()},
                                     "results": results}, args.out)


if __name__ == "__main__":
    main()
