"""Validation of the quality estimate: estimated vs true mIoU where ground truth exists.

    python benchmarks/quality_estimate.py --workdir runs/quality [--datasets synthetic davis camvid]

For every sequence with ground truth and every method, the estimate of ``autolabel evaluate``
(``estimated_miou``: confidence calibrated on the keyframes' cycles, turned into expected IoU,
no ground truth read) is compared with the true per-sequence mIoU: mean absolute error (points),
bias, Spearman rank correlation, and a scatter plot. Per pixel (scored frames, sampled): the
reliability diagram and expected calibration error of the calibrated probability, and the AUROC
of the confidence for "this pixel is wrong".

Data and models (teachers and refiners never saw the scored sequences' keyframes' cycles):

* synthetic: 12 drives of 63 frames at 320x240 that vary fps (10/15/30), ego speed (3-5, 6-9,
  10-14 m/s) and class set (all 11 or 7 without the thin ones); 21-frame windows, K = 10. Teacher
  and refiner of ``propagation_quality.py`` (8 other drives; trained here when missing).
* davis: the 10 DAVIS-2016 sequences in two halves; each half is labelled with a teacher and a
  refiner trained on the other half's window-centre annotations (cross-fitting).
* camvid: the 2 dense windows of 0016E5 with the ``camvid/train`` teacher (--camvid-teacher) and a
  refiner trained on synthetic drives of CamVid's classes (the dense keyframes are the only
  CamVid frames with neighbours, and their own cycles would flatter the refiner).

Writes the JSON, ``quality_scatter.png`` and ``quality_reliability.png`` next to it (--figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._report import machine, print_table, write_json  # noqa: E402
from benchmarks.propagation_quality import (  # noqa: E402
    METHODS,
    WINDOW,
    ensure_refiner,
    ensure_synth_train,
    ensure_teacher,
    label_and_score,
    log,
)
from autolabel.models.quality import auroc, reliability  # noqa: E402
from autolabel.models.teacher_training import TeacherTrainConfig  # noqa: E402
from autolabel.storage.ingest import IngestOptions, ingest  # noqa: E402
from autolabel.storage.readers import read_dataset  # noqa: E402
from autolabel.storage.stages import result_array_names  # noqa: E402
from autolabel.storage.store import SequenceStore  # noqa: E402
from autolabel.storage.synthetic import SYNTHETIC_CLASSES, SyntheticConfig  # noqa: E402
from autolabel.storage.synthetic_io import write_synthetic_store  # noqa: E402
from autolabel.tasks.evaluate import scored_frames, sequence_calibration  # noqa: E402

THIN = {"Pole", "SignSymbol", "Fence", "Bicyclist"}


def varied_drives(count: int = 12) -> list[SyntheticConfig]:
    """Drives of varied difficulty: fps x speed x class set, seeds 200+."""
    fps = (10.0, 15.0, 30.0)
    speeds = ((3.0, 5.0), (6.0, 9.0), (10.0, 14.0))
    out = []
    for i in range(count):
        classes = list(SYNTHETIC_CLASSES) if i % 2 == 0 else [c for c in SYNTHETIC_CLASSES if c not in THIN]
        out.append(SyntheticConfig(width=320, height=240, frames=63, seed=200 + i, fps=fps[i % 3],
                                   ego_speed=speeds[(i // 3) % 3], classes=classes))
    return out


def spearman(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a, float), np.asarray(b, float)
    if len(x) < 3:
        return float("nan")
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def pixel_samples(store: SequenceStore, method: str, rng: np.random.Generator,
                  per_frame: int = 2000) -> dict[str, np.ndarray]:
    """Sampled scored pixels: raw confidence, calibrated probability, whether the label is right."""
    conf_all, prob_all, right_all = [], [], []
    ignore = store.classes.ignore_index
    for seq_id in store.sequence_ids():
        seq = store.sequence(seq_id)
        cal, _ = sequence_calibration(seq, method)
        if cal is None:
            continue
        labels_name, conf_name, dist_name = result_array_names(method)
        labels, conf = seq.array(labels_name), seq.array(conf_name)
        distance = np.asarray(seq.array(dist_name)[:])
        for t in np.flatnonzero(scored_frames(seq, distance, 10)):
            gt = seq.ground_truth(int(t)).ravel()
            idx = np.flatnonzero(gt != ignore)
            idx = rng.choice(idx, min(per_frame, len(idx)), replace=False)
            c = np.asarray(conf[int(t)]).ravel()[idx] / 255.0
            conf_all.append(c)
            prob_all.append(cal.calibration(c))
            right_all.append(np.asarray(labels[int(t)]).ravel()[idx] == gt[idx])
    if not conf_all:
        return {}
    return {"confidence": np.concatenate(conf_all), "probability": np.concatenate(prob_all),
            "right": np.concatenate(right_all)}


def summarise(name: str, store: SequenceStore, report: dict[str, Any]) -> dict[str, Any]:
    """Per method: the (true, estimated) pairs, MAE, bias, rank correlation and pixel calibration."""
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for method, m in report["methods"].items():
        pairs = [(s["sequence"], s["miou"], s["estimated_miou"], s.get("estimate_basis"))
                 for s in m["sequences"] if s["miou"] is not None]
        est = [(t, e) for _, t, e, _ in pairs if e is not None]
        errors = [e - t for t, e in est]
        px = pixel_samples(store, method, rng)
        pixel: dict[str, Any] = {}
        if px:
            wrong = ~px["right"]
            rel = reliability(px["probability"], px["right"])
            pixel = {"pixels": int(len(wrong)), "error_rate": round(float(wrong.mean()) * 100, 2),
                     "auroc_wrong": round(auroc(-px["confidence"], wrong), 4),
                     "ece_calibrated": round(rel.ece, 2),
                     "ece_raw": round(reliability(px["confidence"], px["right"]).ece, 2),
                     "reliability": {"confidence": np.nan_to_num(rel.confidence).round(4).tolist(),
                                     "accuracy": np.nan_to_num(rel.accuracy).round(4).tolist(),
                                     "count": rel.count.astype(int).tolist()}}
        out[method] = {
            "sequences": [{"sequence": s, "true": t, "estimated": e, "basis": b} for s, t, e, b in pairs],
            "estimated": len(est), "scored": len(pairs),
            "mae": round(float(np.mean(np.abs(errors))), 2) if errors else None,
            "bias": round(float(np.mean(errors)), 2) if errors else None,
            "spearman": round(spearman([t for t, _ in est], [e for _, e in est]), 3) if est else None,
            "pooled_true": m["miou_mean"], "pooled_estimated": m["estimated_miou_mean"], "pixel": pixel,
        }
    return out


def synthetic(args: argparse.Namespace) -> tuple[SequenceStore, dict]:
    train = ensure_synth_train(args.workdir)
    store = str(args.workdir / "synth-varied.zarr")
    if not Path(store).exists():
        write_synthetic_store(store, varied_drives(args.drives), WINDOW)
    teacher = ensure_teacher(args.workdir / "teacher-synth.pt", [train], None, TeacherTrainConfig(epochs=args.epochs))
    refiner = ensure_refiner(args.workdir / "refiner-synth.pt", [train], None, teacher, args, 0)
    return SequenceStore.open(store), label_and_score(store, teacher, None, args, 0, refiner, args.estimate)


def davis(args: argparse.Namespace, data: Path) -> tuple[SequenceStore, dict]:
    store = str(args.workdir / "davis-x.zarr")
    if not Path(store).exists():
        ingest(read_dataset("davis", data / "davis2016"), store, IngestOptions(annotation=WINDOW))
    st = SequenceStore.open(store)
    ids = st.sequence_ids()
    halves = [ids[: len(ids) // 2], ids[len(ids) // 2:]]
    for i, (train, test) in enumerate([(halves[0], halves[1]), (halves[1], halves[0])]):
        tag = "ab"[i]
        teacher = ensure_teacher(args.workdir / f"teacher-davis-{tag}.pt", [store], train,
                                 TeacherTrainConfig(epochs=max(args.epochs, 60)))
        refiner = ensure_refiner(args.workdir / f"refiner-davis-{tag}.pt", [store], train, teacher, args, 0)
        log(f"  half {tag}: trained on {len(train)} sequences, labelling {len(test)}")
        label_and_score(store, teacher, test, args, 0, refiner, args.estimate)
    from autolabel.tasks.evaluate import evaluate_store

    return st, evaluate_store(SequenceStore.open(store), METHODS, 10).model_dump()


def camvid(args: argparse.Namespace, data: Path) -> tuple[SequenceStore, dict]:
    if args.camvid_teacher is None:
        raise SystemExit("camvid needs --camvid-teacher (a teacher trained on camvid/train, see the README)")
    store = str(args.workdir / "camvid-x.zarr")
    if not Path(store).exists():
        ingest(read_dataset("camvid", data / "camvid"), store, IngestOptions(annotation=WINDOW))
    train = ensure_synth_train(args.workdir)
    refiner = ensure_refiner(args.workdir / "refiner-camvid-synth.pt", [train], None, args.camvid_teacher, args, 0)
    return SequenceStore.open(store), label_and_score(store, args.camvid_teacher, ["dense_*"], args,
                                                      args.adapt_steps, refiner, args.estimate)


def plot(results: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autolabel.tasks.plots import METHOD_STYLE

    markers = {"synthetic": "o", "davis": "s", "camvid": "^"}
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=120)
    for dataset, methods in results.items():
        for method, r in methods.items():
            pts = [(s["true"], s["estimated"]) for s in r["sequences"] if s["estimated"] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, s=22, marker=markers.get(dataset, "x"), color=METHOD_STYLE[method][0],
                           alpha=0.8, label=f"{method} ({dataset})")
    ax.plot([0, 100], [0, 100], color="grey", linewidth=1)
    ax.fill_between([0, 100], [-5, 95], [5, 105], color="grey", alpha=0.12, label="within 5 points")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("true per-sequence mIoU (%)")
    ax.set_ylabel("estimated mIoU (%), no ground truth")
    ax.set_title("quality estimate vs ground truth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", ncols=2)
    fig.tight_layout()
    scatter = folder / "quality_scatter.png"
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(scatter)
    plt.close(fig)

    datasets = list(results)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 4.2), dpi=120, squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method, r in results[dataset].items():
            rel = r["pixel"].get("reliability")
            if not rel:
                continue
            ok = np.asarray(rel["count"]) > 0
            conf, acc = np.asarray(rel["confidence"])[ok], np.asarray(rel["accuracy"])[ok]
            ax.plot(conf, acc, marker=METHOD_STYLE[method][1], color=METHOD_STYLE[method][0],
                    label=f"{method} (ECE {r['pixel']['ece_calibrated']:.1f})", markersize=4)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=1)
        ax.set_title(f"{dataset}: calibrated confidence")
        ax.set_xlabel("predicted probability of being right")
        ax.set_ylabel("fraction right")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    rel_path = folder / "quality_reliability.png"
    fig.savefig(rel_path)
    plt.close(fig)
    return [scatter, rel_path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/quality"))
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "davis"])
    parser.add_argument("--drives", type=int, default=12, help="synthetic drives of varied difficulty")
    parser.add_argument("--camvid-teacher", type=Path, default=None)
    parser.add_argument("--flow", default="dis-medium")
    parser.add_argument("--tau", type=float, default=40.0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--adapt-steps", type=int, default=0)
    parser.add_argument("--refiner-steps", type=int, default=500)
    parser.add_argument("--refiner-crop", type=int, default=192)
    parser.add_argument("--refiner-samples", type=int, default=300)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--figures", type=Path, default=Path("docs/figures/quality"))
    parser.add_argument("--label-only", action="store_true", help="label the stores, skip the estimate (a warm-up)")
    args = parser.parse_args()
    from autolabel.models.quality import EstimateConfig
    from autolabel.settings import shared_data_dir

    args.estimate = EstimateConfig(enabled=not args.label_only)

    torch.set_num_threads(os.cpu_count() or 1)
    data = args.data or shared_data_dir()
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for name in args.datasets:
        log(f"== {name}")
        store, report = {"synthetic": lambda: synthetic(args), "davis": lambda: davis(args, data),
                         "camvid": lambda: camvid(args, data)}[name]()
        if args.label_only:
            continue
        results[name] = summarise(name, store, report)
        rows = [[m, f"{r['estimated']}/{r['scored']}", r["mae"], r["bias"], r["spearman"],
                 r["pooled_true"], r["pooled_estimated"], r["pixel"].get("auroc_wrong"),
                 r["pixel"].get("ece_raw"), r["pixel"].get("ece_calibrated")] for m, r in results[name].items()]
        print_table(f"{name}: estimated vs true per-sequence mIoU", ["method", "seqs", "MAE", "bias", "rho",
                    "true", "est.", "AUROC", "ECE raw", "ECE cal"], rows)
    if args.label_only:
        return
    figures = plot(results, args.figures)
    payload = {"machine": machine(), "seconds": round(time.perf_counter() - start, 1),
               "settings": {k: str(v) for k, v in vars(args).items()}, "datasets": results,
               "figures": [str(p) for p in figures]}
    write_json("quality_estimate", payload, args.out)
    (args.workdir / "quality_estimate.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
