"""Propagation quality: mIoU by distance for every method on CamVid, DAVIS and synthetic drives.

    python benchmarks/propagation_quality.py --workdir runs/quality [--datasets camvid davis synthetic]
        [--camvid-teacher runs/teacher-camvid.pt] [--flow dis-medium] [--tau 40] [--epochs 40]

Protocol (paper App. C.2): sequences are cut into 21-frame windows whose centre frame is the
annotation; the other frames are propagated up to K = 10 frames and scored against their ground
truth. Teachers never see those frames:

* camvid: teacher trained on ``camvid/train`` (single 1 Hz keyframes), adapted per sequence on
  its own two window-centre annotations (--adapt-steps); ``camvid/dense`` (42 frames of drive
  0016E5, two windows) is labelled and scored. The refiner trains on the cycles of those two
  annotated frames (the train keyframes have no neighbouring frames, so no cycles).
* davis: teacher and refiner trained on the window-centre annotations of the 10 DAVIS sequences.
* synthetic: teacher and refiner trained on keyframes of 8 separate training drives (seeds
  100-107), the teacher adapted for half the steps; 4 drives (seeds 0-3, 63 frames at 320x240,
  three windows each) are labelled and scored.

Teachers and stores are kept in --workdir, so a re-run reuses them (delete them to retrain).
Prints one table per dataset and writes the evaluation JSON of all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._report import machine, print_table, write_json  # noqa: E402
from autolabel.models.optical_flow import FlowConfig  # noqa: E402
from autolabel.models.propagation import PropagationConfig  # noqa: E402
from autolabel.models.quality import EstimateConfig  # noqa: E402
from autolabel.models.refiner_training import RefinerTrainConfig  # noqa: E402
from autolabel.models.teacher import Teacher  # noqa: E402
from autolabel.models.teacher_training import TeacherTrainConfig, train_teacher  # noqa: E402
from autolabel.storage.annotation import AnnotationPolicy  # noqa: E402
from autolabel.storage.ids import select_ids  # noqa: E402
from autolabel.storage.ingest import IngestOptions, ingest  # noqa: E402
from autolabel.storage.readers import read_dataset  # noqa: E402
from autolabel.storage.store import SequenceStore  # noqa: E402
from autolabel.storage.synthetic import SyntheticConfig, drive_configs  # noqa: E402
from autolabel.storage.synthetic_io import write_synthetic_store  # noqa: E402
from autolabel.storage.training_data import AnnotatedFrames  # noqa: E402
from autolabel.tasks.evaluate import evaluate_store  # noqa: E402
from autolabel.tasks.pipeline import LabelSettings, label_store  # noqa: E402
from autolabel.tasks.refiner_training import RefinerRequest, train_refiner_from_stores  # noqa: E402

METHODS = ["motion-only", "semantic-only", "warp-inpaint", "warp-refine"]
WINDOW = AnnotationPolicy(mode="window", n=21)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_teacher(path: Path, stores: list[str], patterns: list[str] | None, cfg: TeacherTrainConfig) -> Path:
    if path.is_file():
        log(f"reusing teacher {path}")
        return path
    data = AnnotatedFrames([SequenceStore.open(s) for s in stores], patterns)
    log(f"training teacher {path.name} on {data.describe()}")
    torch.manual_seed(cfg.seed)  # the initial weights too: the same seed, the same teacher
    teacher = Teacher.create(cfg.arch, data.classes.names, [list(c) for c in data.classes.palette], data.classes.ignore_index)
    info = train_teacher(teacher, data, cfg, lambda s, n, loss: log(f"  step {s}/{n} loss {loss:.3f}") if s % 200 == 0 else None)
    teacher.train_info = {**info, "stores": stores}
    teacher.save(path)
    log(f"  done in {info['seconds']} s, final loss {info['final_loss']:.3f}")
    return path


def ensure_refiner(path: Path, stores: list[str], patterns: list[str] | None, teacher: Path,
                   args: argparse.Namespace, adapt_steps: int) -> Path:
    """Train (or reuse) a refiner on the cycles of the annotated frames of ``stores``."""
    if path.is_file():
        log(f"reusing refiner {path}")
        return path
    log(f"training refiner {path.name} on {stores} {patterns or ''}")
    request = RefinerRequest(
        stores=stores, teacher=teacher, out=path, sequences=patterns, adapt_steps=adapt_steps,
        max_samples=args.refiner_samples, flow=FlowConfig(backend=args.flow, workers=args.workers),
        propagation=PropagationConfig(method="warp-inpaint", tau=args.tau),
        train=RefinerTrainConfig(steps=args.refiner_steps, crop=args.refiner_crop))
    info = train_refiner_from_stores(request, on_step=lambda s, n, loss: log(f"  step {s}/{n} loss {loss:.3f}")
                                     if s % 100 == 0 else None)
    log(f"  {info['samples']} cycles, {info['seconds']} s; on the cycles mIoU {info['fit']['cycled_miou']} -> "
        f"{info['fit']['refined_miou']}")
    return path


def label_and_score(store: str, teacher: Path, sequences: list[str] | None, args: argparse.Namespace,
                    adapt_steps: int, refiner: Path, estimate: EstimateConfig | None = None) -> dict:
    log(f"  labelling (teacher adapted {adapt_steps} steps per sequence)")
    for method in METHODS:
        settings = LabelSettings(
            propagation=PropagationConfig(method=method, max_distance=10, tau=args.tau),
            flow=FlowConfig(backend=args.flow, workers=args.workers), teacher=str(teacher),
            adapt_steps=adapt_steps, refiner=str(refiner), compare_with_warp_inpaint=False,
            estimate=estimate or EstimateConfig())
        start = time.perf_counter()
        report = label_store(store, settings, sequences)
        if report.failed:
            raise SystemExit(f"{method} failed: {report.failed}")
        log(f"  {method}: {time.perf_counter() - start:.1f} s")
    st = SequenceStore.open(store)
    return evaluate_store(st, METHODS, 10, sequences=select_ids(st.sequence_ids(), sequences, store)).model_dump()


def camvid(args: argparse.Namespace, data: Path) -> dict:
    store = str(args.workdir / "camvid.zarr")
    if not Path(store).exists():
        ingest(read_dataset("camvid", data / "camvid"), store, IngestOptions(annotation=WINDOW))
    teacher = args.camvid_teacher or args.workdir / "teacher-camvid.pt"
    ensure_teacher(teacher, [store], ["train_*"], TeacherTrainConfig(epochs=args.epochs))
    refiner = ensure_refiner(args.workdir / "refiner-camvid.pt", [store], ["dense_*"], teacher, args, args.adapt_steps)
    return label_and_score(store, teacher, ["dense_*"], args, args.adapt_steps, refiner)


def davis(args: argparse.Namespace, data: Path) -> dict:
    store = str(args.workdir / "davis.zarr")
    if not Path(store).exists():
        ingest(read_dataset("davis", data / "davis2016"), store, IngestOptions(annotation=WINDOW))
    teacher = ensure_teacher(args.workdir / "teacher-davis.pt", [store], None,
                             TeacherTrainConfig(epochs=max(args.epochs, 60)))
    refiner = ensure_refiner(args.workdir / "refiner-davis.pt", [store], None, teacher, args, 0)
    # the DAVIS teacher is trained on these very annotations: adapting it again adds nothing
    return label_and_score(store, teacher, None, args, 0, refiner)


def ensure_synth_train(workdir: Path) -> str:
    """8 synthetic drives of 30 frames at 320x240, keyframes every 3rd frame: teachers' and refiners'
    training data (written once per workdir)."""
    train = str(workdir / "synth-train.zarr")
    if not Path(train).exists():
        size = SyntheticConfig(width=320, height=240, frames=30, seed=100)
        write_synthetic_store(train, drive_configs(8, size), AnnotationPolicy(mode="keyframe-every", n=3))
    return train


def synthetic(args: argparse.Namespace, data: Path) -> dict:
    train, test = ensure_synth_train(args.workdir), str(args.workdir / "synth-test.zarr")
    size = SyntheticConfig(width=320, height=240, frames=30, seed=100)
    if not Path(test).exists():
        write_synthetic_store(test, drive_configs(4, size.model_copy(update={"frames": 63, "seed": 0})), WINDOW)
    teacher = ensure_teacher(args.workdir / "teacher-synth.pt", [train], None, TeacherTrainConfig(epochs=args.epochs))
    refiner = ensure_refiner(args.workdir / "refiner-synth.pt", [train], None, teacher, args, 0)
    return label_and_score(test, teacher, None, args, args.adapt_steps // 2, refiner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/quality"))
    parser.add_argument("--datasets", nargs="+", default=["camvid", "davis", "synthetic"])
    parser.add_argument("--camvid-teacher", type=Path, default=None, help="reuse a teacher trained on camvid/train")
    parser.add_argument("--flow", default="dis-medium")
    parser.add_argument("--tau", type=float, default=40.0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--adapt-steps", type=int, default=600,
                        help="per-sequence teacher adaptation on CamVid (half on synthetic drives, none on DAVIS)")
    parser.add_argument("--refiner-steps", type=int, default=1000)
    parser.add_argument("--refiner-crop", type=int, default=192)
    parser.add_argument("--refiner-samples", type=int, default=300, help="at most this many cycles per store")
    parser.add_argument("--workers", type=int, default=0, help="flow processes (0 = auto)")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from autolabel.settings import shared_data_dir

    torch.set_num_threads(os.cpu_count() or 1)
    data = args.data or shared_data_dir()
    args.workdir.mkdir(parents=True, exist_ok=True)
    runners = {"camvid": camvid, "davis": davis, "synthetic": synthetic}
    defaults = PropagationConfig()
    results: dict = {"machine": machine(), "settings": {"flow": args.flow, "tau": args.tau, "max_distance": 10,
                     "window": 21, "teacher_epochs": args.epochs,
                     "refiner_steps": args.refiner_steps, "refiner_crop": args.refiner_crop,
                     "refiner_samples": args.refiner_samples, "adapt_steps": args.adapt_steps, "methods": METHODS,
                     "inpaint_confidence": defaults.inpaint_confidence,
                     "override_confidence": defaults.override_confidence}, "datasets": {}}
    for name in args.datasets:
        log(f"== {name}")
        report = runners[name](args, data)
        results["datasets"][name] = report
        rows = [[m, *(f"{r['miou_by_distance'][str(d)] or float('nan'):.1f}" for d in (1, 2, 5, 10)),
                 f"{r['miou_mean']:.1f}", r["frames_scored"]] for m, r in report["methods"].items()]
        print_table(f"{name}: mIoU (%) by distance", ["method", "d=1", "d=2", "d=5", "d=10", "mean 1-10", "frames"], rows)
        (args.workdir / f"report-{name}.json").write_text(json.dumps(report, indent=2))
    write_json("propagation_quality", results, args.out)


if __name__ == "__main__":
    main()
