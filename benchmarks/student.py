"""Utility of the auto-labels (the paper's Table 1 on our data): train a student on them.

    python benchmarks/student.py --workdir runs/student [--datasets synthetic davis]

A student segmentation network (the built-in ``unet-lite``) is trained with the same steps,
crop, batch, augmentation and seed on

  (a) the keyframes only,
  (b) keyframes + motion-only labels,
  (c) keyframes + warp-inpaint labels,
  (d) keyframes + warp-refine labels,
  (o) with ``--arms ...o``: keyframes + the ground truth of the same frames (the paper's oracle:
      what perfect propagation would give, the ceiling of (b)-(d)),
  (e) with ``--arms ...de``: the second round: student (d) of the first seed becomes the inpainting
      teacher, a refiner is trained for it on the same keyframe cycles, the training drives are
      labelled again with warp-refine (on a copy of the store), and students train on those labels
      as (d) did,

and scored (mIoU) on held-out drives' ground truth it never saw. The labels reach the students
through the product's own training export (``autolabel export --format folder``: keyframes
marked, a manifest), read back with ``storage.training_export.ExportedFrames``.

The teacher that inpaints (c, d) is student (a) itself: the model one can train from the
keyframes alone; the refiner learns on the training drives' keyframe cycles (no extra labels).

* synthetic: 16 training drives (63 frames, 320x240, fps 10/15/30 x ego speed 3-14 m/s, seeds
  300+) with keyframes every 21 frames (window centres 10, 31, 52) and 4 held-out drives (seeds
  400+) scored on all their frames. ``--motion fast``: every drive at 10 fps and 10-14 m/s, so the
  frames between keyframes show much the keyframes do not.
* davis: the 10 DAVIS-2016 sequences split by sequence (first five train, last five held out);
  the training sequences keep only their 21-frame window centres as keyframes, the held-out ones
  are scored on every annotated frame.

With ``--seeds 0 1 2`` every student is trained once per seed (the paper reports the mean and the
sample standard deviation of three runs); the inpainting teacher stays student (a) of the first
seed. ``--distances 2 4 6 8`` trains (b)-(d) only on frames at those distances from their keyframe
(the paper's sampling), ``--keyframe-share 0.3`` repeats the keyframes to 30 % of what a student
sees (the paper's 70/30). For each labelling method the table also gives the labels' own mIoU
on the training drives' propagated frames, beside what the inpainting teacher (student (a))
predicts on those same frames: what the labels know that the keyframe student does not.

Writes the JSON (``--out``) with the machine, data and settings; prints the table.
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
from benchmarks.propagation_quality import WINDOW, ensure_refiner, log  # noqa: E402
from autolabel.models.metrics import confusion_matrix, iou_per_class, mean_iou  # noqa: E402
from autolabel.models.optical_flow import FlowConfig  # noqa: E402
from autolabel.models.propagation import PropagationConfig  # noqa: E402
from autolabel.models.quality import EstimateConfig  # noqa: E402
from autolabel.models.teacher import Teacher  # noqa: E402
from autolabel.models.teacher_training import TeacherTrainConfig, train_teacher  # noqa: E402
from autolabel.storage.ingest import IngestOptions, ingest  # noqa: E402
from autolabel.storage.readers import read_dataset  # noqa: E402
from autolabel.storage.stages import GROUND_TRUTH  # noqa: E402
from autolabel.storage.store import SequenceStore  # noqa: E402
from autolabel.storage.synthetic import SyntheticConfig  # noqa: E402
from autolabel.storage.synthetic_io import write_synthetic_store  # noqa: E402
from autolabel.storage.training_data import AnnotatedFrames  # noqa: E402
from autolabel.storage.training_export import ExportedFrames, export_training_set  # noqa: E402
from autolabel.tasks.pipeline import LabelSettings, label_store  # noqa: E402

DEFAULT_STEPS = 1500
MAX_DISTANCE = 10  # K of the labelling methods
ARMS = {"a": None, "b": "motion-only", "c": "warp-inpaint", "d": "warp-refine", "o": GROUND_TRUTH,
        "e": "warp-refine"}
ARM_NAMES = {"a": "keyframes only", "b": "+ motion-only", "c": "+ warp-inpaint", "d": "+ warp-refine",
             "o": "+ ground truth (oracle)", "e": "+ warp-refine, round 2"}


MOTIONS = {  # (fps choices, ego-speed ranges in m/s), cycled over the drives
    "mixed": ((10.0, 15.0, 30.0), ((3.0, 5.0), (6.0, 9.0), (10.0, 14.0))),
    # the camera travels 20-28 m between keyframes 21 frames apart: the frames between show streets,
    # cars and people the keyframes do not
    "fast": ((10.0,), ((10.0, 14.0),)),
}


def drives(count: int, seed: int, motion: str = "mixed") -> list[SyntheticConfig]:
    """Drives of the ``motion`` regime's fps and ego speeds, all 11 classes."""
    fps, speeds = MOTIONS[motion]
    return [SyntheticConfig(width=320, height=240, frames=63, seed=seed + i, fps=fps[i % len(fps)],
                            ego_speed=speeds[(i // len(fps)) % len(speeds)]) for i in range(count)]


class KeyframeOversampled:
    """An exported set whose keyframes are repeated so they make ``share`` of what a student sees.

    Indexable like :class:`ExportedFrames`; the propagated frames appear once each.
    """

    def __init__(self, frames: ExportedFrames, share: float) -> None:
        keys = [i for i, row in enumerate(frames.rows) if row.keyframe]
        rest = [i for i, row in enumerate(frames.rows) if not row.keyframe]
        repeat = max(1, round(share * len(rest) / max((1 - share) * len(keys), 1e-9))) if keys else 1
        self.frames, self.index = frames, rest + keys * repeat

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.frames[self.index[i]]


def student_config(args: argparse.Namespace, seed: int) -> TeacherTrainConfig:
    return TeacherTrainConfig(max_steps=args.steps, epochs=10_000, crop=args.crop, batch_size=args.batch,
                              seed=seed)


def train_student(path: Path, samples: Any, classes: Any, args: argparse.Namespace,
                  seed: int = 0) -> tuple[Path, dict]:
    if path.is_file():
        log(f"reusing student {path.name}")
        return path, Teacher.load(path).train_info
    log(f"training student {path.name} on {len(samples)} frames, {args.steps} steps, seed {seed}")
    torch.manual_seed(seed)  # the initial weights too: every arm of one seed starts from the same net
    student = Teacher.create("unet-lite", classes.names, [list(c) for c in classes.palette], classes.ignore_index)
    info = train_teacher(student, samples, student_config(args, seed),
                         lambda s, n, loss: log(f"  step {s}/{n} loss {loss:.3f}") if s % 250 == 0 else None)
    student.train_info = {**info, "frames": len(samples)}
    student.save(path)
    log(f"  {info['seconds']} s, final loss {info['final_loss']:.3f}")
    return path, student.train_info


def score(student: Path, store: SequenceStore, sequences: list[str]) -> dict[str, Any]:
    """mIoU of the student on every ground-truth frame of ``sequences`` (pooled confusion matrix)."""
    model = Teacher.load(student)
    n = store.classes.num_classes
    cm = np.zeros((n, n + 1), np.int64)
    frames = 0
    for seq_id in sequences:
        seq = store.sequence(seq_id)
        gt_frames = np.flatnonzero(seq.has_gt)
        for start in range(0, len(gt_frames), 4):
            chunk = gt_frames[start:start + 4]
            labels, _ = model.predict_labels(np.stack([seq.frame(int(t)) for t in chunk]))
            for t, pred in zip(chunk, labels):
                cm += confusion_matrix(seq.ground_truth(int(t)), pred, n, store.classes.ignore_index)
                frames += 1
    iou = iou_per_class(cm)
    return {"miou": round(mean_iou(cm), 2), "scored_frames": frames,
            "per_class": {c: (None if np.isnan(v) else round(float(v) * 100, 1)) for c, v in zip(store.classes.names, iou)}}


def labels_vs_teacher(store: SequenceStore, method: str, teacher: Path, ids: list[str]) -> dict[str, float]:
    """Pooled mIoU on the propagated (not annotated) ground-truth frames of ``ids``: the stored labels
    of ``method`` and the teacher's own predictions on the same frames."""
    model = Teacher.load(teacher)
    n, ignore = store.classes.num_classes, store.classes.ignore_index
    cm_labels, cm_teacher = np.zeros((n, n + 1), np.int64), np.zeros((n, n + 1), np.int64)
    for seq_id in ids:
        seq = store.sequence(seq_id)
        labels = seq.array(f"results/{method}/labels")
        frames = [int(t) for t in np.flatnonzero(seq.has_gt & ~seq.annotated)]
        for start in range(0, len(frames), 4):
            chunk = frames[start:start + 4]
            predicted, _ = model.predict_labels(np.stack([seq.frame(t) for t in chunk]))
            for t, pred in zip(chunk, predicted):
                gt = seq.ground_truth(t)
                cm_labels += confusion_matrix(gt, np.asarray(labels[t]), n, ignore)
                cm_teacher += confusion_matrix(gt, pred, n, ignore)
    return {"labels_miou": round(mean_iou(cm_labels), 2), "teacher_miou": round(mean_iou(cm_teacher), 2)}


def label_method(name: str, store: SequenceStore, method: str, train_store: str, train_ids: list[str] | None,
                 ids: list[str], teacher: Path, refiner: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Label the training drives with ``method`` (nothing to do for the ground truth); its labels' quality."""
    if method == GROUND_TRUTH:
        return {}
    settings = LabelSettings(propagation=PropagationConfig(method=method, max_distance=MAX_DISTANCE, tau=args.tau),
                             flow=FlowConfig(backend=args.flow), teacher=str(teacher), refiner=str(refiner),
                             compare_with_warp_inpaint=False, estimate=EstimateConfig(enabled=False))
    start = time.perf_counter()
    report = label_store(train_store, settings, train_ids)
    if report.failed:
        raise SystemExit(f"{name}: {method} failed: {report.failed}")
    log(f"  {method}: labelled in {time.perf_counter() - start:.1f} s")
    extra = labels_vs_teacher(store, method, teacher, ids)
    log(f"  {method} labels on the propagated training frames: {extra['labels_miou']} mIoU "
        f"(the inpainting teacher there: {extra['teacher_miou']})")
    return extra


def run_arms(name: str, train_store: str, train_ids: list[str] | None, test_store: str, test_ids: list[str],
             args: argparse.Namespace) -> dict[str, Any]:
    """Train and score the students of one dataset, once per seed."""
    work = args.workdir / name
    store = SequenceStore.open(train_store)
    keyframes = AnnotatedFrames([store], train_ids)
    # the inpainting teacher is student (a) at the default steps and seed 0
    teacher_args = argparse.Namespace(**{**vars(args), "steps": DEFAULT_STEPS})
    student_a, info_a = train_student(work / "student-a.pt", keyframes, store.classes, teacher_args)
    steps_tag = f"-s{args.steps}" if args.steps != DEFAULT_STEPS else ""
    export_tag = f"-c{args.min_confidence:g}" if args.min_confidence > 0 else ""
    sampling_tag = "".join([f"-d{args.max_distance}" if args.max_distance is not None else "",
                            "-t" + "_".join(map(str, args.distances)) if args.distances else "",
                            f"-k{args.keyframe_share:g}" if args.keyframe_share > 0 else "", steps_tag])
    refiner = ensure_refiner(work / "refiner.pt", [train_store], train_ids, student_a, args, 0)
    ids = [s for s in store.sequence_ids() if train_ids is None or s in train_ids]
    test = SequenceStore.open(test_store)
    results: dict[str, Any] = {}
    firsts: dict[str, Path] = {}  # each arm's student of the first seed

    def students(arm: str, samples: Any, tag: str, extra: dict[str, Any]) -> None:
        runs = []
        for seed in args.seeds:
            seed_tag = f"-r{seed}" if seed else ""
            if arm == "a" and not tag and not seed:
                path, info = student_a, info_a
            else:
                path, info = train_student(work / f"student-{arm}{tag}{seed_tag}.pt", samples, store.classes, args,
                                           seed)
            firsts.setdefault(arm, path)
            runs.append({"seed": seed, "train_seconds": info.get("seconds"), **score(path, test, test_ids)})
            log(f"  ({arm}) {ARM_NAMES[arm]}, seed {seed}: held-out mIoU {runs[-1]['miou']}")
        mious = [r["miou"] for r in runs]
        results[arm] = {"training": ARM_NAMES[arm], "method": ARMS[arm], "frames": extra.pop("frames", len(samples)),
                        "miou": round(float(np.mean(mious)), 2),
                        "miou_std": round(float(np.std(mious, ddof=1)), 2) if len(mious) > 1 else None,
                        **extra, "runs": runs}

    def exported(label_store_: SequenceStore, method: str, export: Path, extra: dict[str, Any]) -> Any:
        if not (export / "manifest.json").is_file():
            rows, failures = export_training_set(label_store_, method, export, ids, "folder", args.min_confidence)
            if failures:
                raise SystemExit(f"{name}: export of {method} failed: {failures}")
        # the ground truth covers every frame; keep the frames the methods label (K = MAX_DISTANCE)
        frames = ExportedFrames(export, max_distance=min(args.max_distance or MAX_DISTANCE, MAX_DISTANCE),
                                distances=args.distances)
        extra["frames"] = len(frames)
        return KeyframeOversampled(frames, args.keyframe_share) if args.keyframe_share > 0 else frames

    for arm, method in ARMS.items():
        if (arm not in args.arms and arm != "a") or arm == "e":
            continue
        if method is None:
            students(arm, keyframes, steps_tag, {})
            continue
        extra = label_method(name, store, method, train_store, train_ids, ids, student_a, refiner, args)
        samples = exported(store, method, work / f"export-{method}{export_tag}", extra)
        students(arm, samples, export_tag + sampling_tag, extra)
    if "e" in args.arms:
        if "d" not in firsts:
            raise SystemExit("arm e (the second round) needs arm d: its student is the next teacher")
        # round 2 on a copy of the training store: its teacher and warp-refine stages are made again
        round2 = work / f"{Path(train_store).stem}-round2{export_tag}{sampling_tag}.zarr"
        if not round2.exists():
            shutil.copytree(train_store, round2)
        teacher2 = firsts["d"]
        refiner2 = ensure_refiner(work / f"refiner-round2{export_tag}{sampling_tag}.pt", [str(round2)], train_ids,
                                  teacher2, args, 0)
        store2 = SequenceStore.open(str(round2))
        extra = label_method(name, store2, "warp-refine", str(round2), train_ids, ids, teacher2, refiner2, args)
        samples = exported(store2, "warp-refine", work / f"export-round2{export_tag}{sampling_tag}", extra)
        students("e", samples, export_tag + sampling_tag, extra)
    return results


def synthetic(args: argparse.Namespace) -> dict[str, Any]:
    suffix = "" if args.motion == "mixed" else f"-{args.motion}"
    train, test = str(args.workdir / f"synth-train{suffix}.zarr"), str(args.workdir / f"synth-test{suffix}.zarr")
    if not Path(train).exists():
        write_synthetic_store(train, drives(args.train_drives, 300, args.motion), WINDOW)
    if not Path(test).exists():
        write_synthetic_store(test, drives(args.test_drives, 400, args.motion))
    return run_arms(f"synthetic{suffix}", train, None, test, SequenceStore.open(test).sequence_ids(), args)


def davis(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    train = str(args.workdir / "davis-train.zarr")
    if not Path(train).exists():
        ingest(read_dataset("davis", data / "davis2016"), train, IngestOptions(annotation=WINDOW))
    ids = SequenceStore.open(train).sequence_ids()
    held_out = ids[len(ids) // 2:]
    # the held-out half is scored on all of its ground truth; only the first half trains
    return run_arms("davis", train, ids[: len(ids) // 2], train, held_out, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/student"))
    parser.add_argument("--datasets", nargs="+", default=["synthetic"], choices=["synthetic", "davis"])
    parser.add_argument("--motion", default="mixed", choices=list(MOTIONS),
                        help="synthetic drives: mixed fps and speeds, or fast (10 fps, 10-14 m/s) for all")
    parser.add_argument("--train-drives", type=int, default=16)
    parser.add_argument("--test-drives", type=int, default=4)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="student training steps (every arm)")
    parser.add_argument("--crop", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="train every student once per seed; the table gives the mean and sample std")
    parser.add_argument("--min-confidence", type=float, default=0.0,
                        help="export: propagated pixels below this confidence are ignored (arms b-d)")
    parser.add_argument("--max-distance", type=int, default=None,
                        help="train (b-d) only on frames at most this far from their keyframe")
    parser.add_argument("--distances", type=int, nargs="+", default=None,
                        help="train (b-d) only on frames at these distances from their keyframe (paper: 2 4 6 8)")
    parser.add_argument("--arms", default="abcd", help="which students to train (letters of a-e, o)")
    parser.add_argument("--keyframe-share", type=float, default=0.0,
                        help="repeat keyframes so they make this share of the frames a student (b-d) sees")
    parser.add_argument("--flow", default="dis-medium")
    parser.add_argument("--tau", type=float, default=40.0)
    parser.add_argument("--refiner-steps", type=int, default=400)
    parser.add_argument("--refiner-crop", type=int, default=192)
    parser.add_argument("--refiner-samples", type=int, default=300)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from autolabel.settings import shared_data_dir

    torch.set_num_threads(os.cpu_count() or 1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for name in args.datasets:
        log(f"== {name}")
        results[name] = synthetic(args) if name == "synthetic" else davis(args, args.data or shared_data_dir())
        base = results[name]["a"]["miou"]
        rows = [[f"({arm}) {r['training']}", r["frames"], r["miou"], r["miou_std"] if r["miou_std"] is not None else "",
                 round(r["miou"] - base, 2), r.get("labels_miou", ""), r.get("teacher_miou", "")]
                for arm, r in results[name].items()]
        print_table(f"{name}: student mIoU on held-out ground truth (mean of {len(args.seeds)} seeds)",
                    ["student", "frames", "mIoU", "std", "vs (a)", "labels", "teacher there"], rows)
    payload = {"machine": machine(), "seconds": round(time.perf_counter() - start, 1),
               "settings": {k: str(v) for k, v in vars(args).items()}, "datasets": results}
    write_json("student", payload, args.out)


if __name__ == "__main__":
    main()
