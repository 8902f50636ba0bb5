"""Labelling and refiner-training throughput, DIS-fast flow, teacher inference included.

    python benchmarks/throughput.py [--method warp-inpaint warp-refine] [--sizes 480x360 960x720]
        [--batch 1 0] [--fresh-frames 105] [--teacher runs/teacher-camvid.pt] [--refiner runs/refiner-camvid.pt]
        [--device cpu|cuda] [--out ...]

Runs the three stages of ``autolabel label`` (flow estimation, teacher inference, propagation)
for each method on synthetic drives at each size (and on CamVid dense at 480x360 when the shared
data is present) and reports frames per second for each stage and end to end; propagation once
per batch size (``--batch``: 1 = one chain at a time, 0 = the automatic choice), with a check that
every batch size stored the same labels. ``--fresh-frames`` times ``autolabel label --method
warp-refine --flow dis-fast`` as a user runs it on a freshly ingested drive (a new process: start,
flow, teacher, warp-inpaint, warp-refine, with and without the estimate stage). It also times
refiner training (cycle samples per second, crop 256, batch 8). Without --teacher / --refiner,
randomly initialised unet-lite / refine-unet nets are used: their cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._report import machine, print_table, write_json  # noqa: E402
from autolabel.cli.console import print_items  # noqa: E402
from autolabel.models.optical_flow import FlowConfig  # noqa: E402
from autolabel.models.cycle import cycle_plan, cycle_sample  # noqa: E402
from autolabel.models.propagation import PropagationConfig, WarpInpaint  # noqa: E402
from autolabel.models.quality import EstimateConfig  # noqa: E402
from autolabel.models.refiner import Refiner, RefinerInput  # noqa: E402
from autolabel.models.refiner_training import RefinerTrainConfig, train_refiner  # noqa: E402
from autolabel.models.teacher import Teacher, file_sha256  # noqa: E402
from autolabel.storage.annotation import AnnotationPolicy  # noqa: E402
from autolabel.storage.classes import CAMVID11  # noqa: E402
from autolabel.storage.ingest import IngestOptions, ingest  # noqa: E402
from autolabel.storage.readers import read_dataset  # noqa: E402
from autolabel.storage.store import SequenceStore  # noqa: E402
from autolabel.storage.synthetic import SyntheticConfig, drive_configs  # noqa: E402
from autolabel.storage.synthetic_io import write_synthetic_store  # noqa: E402
from autolabel.tasks.pipeline import LabelSettings, run_stage, sequence_stages  # noqa: E402
from autolabel.tasks.propagate import StoreSequenceInputs  # noqa: E402
from autolabel.tasks.teacher_inference import infer_teacher  # noqa: E402


def run(store_url: str, teacher: Path, flow: FlowConfig, device: str, method: str, refiner: Path | None,
        batches: list[int]) -> dict:
    """The pipeline's flow, teacher and propagate stages over every drive, timed per stage kind; the
    propagate stage once per batch size (0 = automatic), each on a copy with the same flow and teacher."""
    store = SequenceStore.open(store_url, mode="r+")
    settings = LabelSettings(propagation=PropagationConfig(method=method), flow=flow, teacher=str(teacher),
                             refiner=str(refiner) if refiner else None, device=device,
                             compare_with_warp_inpaint=False,
                             estimate=EstimateConfig(enabled=False))  # the propagation alone, no probes
    stages = [s for s in sequence_stages(settings) if s.kind in ("flow", "teacher")]
    times = {s.kind: 0.0 for s in stages}
    frames = sum(store.sequence(seq_id).num_frames for seq_id in store.sequence_ids())
    for seq_id in store.sequence_ids():
        for stage in stages:
            start = time.perf_counter()
            run_stage(store_url, seq_id, stage)
            times[stage.kind] += time.perf_counter() - start
    propagate: dict[str, float] = {}
    labels: dict[str, list] = {}
    for batch in batches:
        copy = f"{store_url}-b{batch}"
        shutil.copytree(store_url, copy)
        batched = settings.model_copy(update={"propagation": settings.propagation.model_copy(
            update={"batch_size": batch, "device": device})})
        stage = next(s for s in sequence_stages(batched) if s.kind == "propagate")
        start = time.perf_counter()
        for seq_id in store.sequence_ids():
            run_stage(copy, seq_id, stage)
        key = f"batch {batch or 'auto'} ({batched.propagation.chains_per_batch()})"
        propagate[key] = time.perf_counter() - start
        out = SequenceStore.open(copy)
        labels[key] = [out.sequence(s).array(f"results/{method}/labels")[:] for s in out.sequence_ids()]
        shutil.rmtree(copy, ignore_errors=True)
    first = next(iter(labels.values()))
    same = all(all((a == b).all() for a, b in zip(first, other)) for other in labels.values())
    best = min(propagate.values())
    total = times.get("flow", 0.0) + times.get("teacher", 0.0) + best
    return {"frames": frames, "seconds": {**{k: round(v, 2) for k, v in times.items()},
                                          **{f"propagate {k}": round(v, 2) for k, v in propagate.items()}},
            "frames_per_s": {"flow": frames / times["flow"] if times.get("flow") else None,
                             "teacher": frames / times["teacher"] if times.get("teacher") else None,
                             **{f"propagate {k}": frames / v for k, v in propagate.items()},
                             "end_to_end": frames / total},
            "labels_identical_across_batches": bool(same)}


def fresh_drive(teacher: Path, refiner: Path, frames: int, size: str, estimate: bool, device: str) -> dict:
    """``autolabel label --method warp-refine --flow dis-fast`` as a user runs it, on a freshly ingested
    drive: flow, teacher, warp-inpaint, warp-refine (and the estimate stage), process start included."""
    import subprocess

    w, h = (int(v) for v in size.split("x"))
    with tempfile.TemporaryDirectory(prefix="autolabel-fresh-") as tmp:
        url = f"{tmp}/drive.zarr"
        write_synthetic_store(url, drive_configs(1, SyntheticConfig(width=w, height=h, frames=frames, seed=7)),
                              AnnotationPolicy(mode="window", n=21))
        cmd = [sys.executable, "-m", "autolabel.cli", "label", url, "--method", "warp-refine", "--flow", "dis-fast",
               "--teacher", str(teacher), "--refiner", str(refiner), "--device", device]
        if not estimate:
            cmd.append("--no-estimate")
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"autolabel label failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    stages = next((line.split(": ", 1)[1] for line in done.stdout.splitlines()
                   if line.startswith("time per stage:")), "")
    return {"frames": frames, "size": size, "estimate": estimate, "device": device, "seconds": round(seconds, 2),
            "frames_per_s": round(frames / seconds, 2), "stage_seconds": stages}


def warm_up(teacher: Teacher, refiner: Refiner, device: str, sizes: list[str]) -> None:
    """One untimed teacher and refiner pass per size and batch shape, so that the first timed stage
    does not pay CUDA's start (context, kernel selection) that later ones do not."""
    for size in sizes:
        w, h = (int(v) for v in size.split("x"))
        for batch in (1, 4, PropagationConfig(device=device).chains_per_batch()):
            frames = torch.zeros((batch, h, w, 3), dtype=torch.uint8)
            features = teacher.predict(frames).features
            image = torch.zeros((batch, 3, h, w), device=device)
            refiner.refine(RefinerInput(torch.zeros((batch, h, w), dtype=torch.long, device=device),
                                        torch.ones((batch, h, w), device=device),
                                        torch.ones((batch, h, w), dtype=torch.bool, device=device),
                                        image, image, features))
    torch.cuda.synchronize()


def refiner_training_rate(teacher: Teacher, refiner: Refiner, device: str, steps: int) -> dict:
    """Cycle samples per second of refiner training (crop 256, batch 8) on one synthetic drive."""
    with tempfile.TemporaryDirectory(prefix="autolabel-refiner-") as tmp:
        url = f"{tmp}/drive.zarr"
        write_synthetic_store(url, drive_configs(1, SyntheticConfig(width=480, height=360, frames=15, seed=5)),
                              AnnotationPolicy(mode="keyframe-every", n=7))
        store = SequenceStore.open(url, mode="r+")
        seq = store.sequence(store.sequence_ids()[0])
        infer_teacher(store, seq.id, teacher, "benchmark")
        inputs = StoreSequenceInputs(store.sequence(seq.id), "exact", need_teacher=True)
        method = WarpInpaint(PropagationConfig(device=device))
        start = time.perf_counter()
        samples = [cycle_sample(method, inputs, t, n, d) for t, n, d in cycle_plan(seq.annotated, 6)]
        cycle_rate = len(samples) / (time.perf_counter() - start)
    net = refiner.copy()
    cfg = RefinerTrainConfig(steps=steps, batch_size=8, crop=256, device=device)
    train_refiner(net, teacher, samples, cfg.model_copy(update={"steps": 2}))  # warm-up
    info = train_refiner(net, teacher, samples, cfg)
    return {"cycles": len(samples), "cycle_samples_per_s": round(cycle_rate, 2),
            "train_samples_per_s": info["samples_per_second"], "steps": steps, "batch_size": 8, "crop": 256}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None)
    parser.add_argument("--refiner", type=Path, default=None)
    parser.add_argument("--method", nargs="+", default=["warp-inpaint", "warp-refine"])
    parser.add_argument("--sizes", nargs="+", default=["480x360", "960x720"])
    parser.add_argument("--frames", type=int, default=63, help="frames per synthetic drive (3 drives)")
    parser.add_argument("--train-steps", type=int, default=10, help="refiner training steps to time (0 = skip)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="flow processes (0 = auto)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 0],
                        help="propagation batch sizes to compare (0 = automatic for the device)")
    parser.add_argument("--fresh-frames", type=int, default=105,
                        help="frames of the fresh drive timed through `autolabel label` (0 = skip)")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from autolabel.settings import shared_data_dir

    torch.set_num_threads(os.cpu_count() or 1)
    if args.teacher:
        teacher, digest = Teacher.load(args.teacher, args.device), file_sha256(args.teacher)
    else:
        torch.manual_seed(0)
        teacher = Teacher.create("unet-lite", CAMVID11.names, [list(c) for c in CAMVID11.palette]).to(args.device)
        digest = "random-init"
    work = Path(tempfile.mkdtemp(prefix="autolabel-throughput-"))
    teacher_path = args.teacher or work / "teacher-random.pt"
    if not args.teacher:
        digest = teacher.save(teacher_path)
    if args.refiner:
        refiner = Refiner.load(args.refiner, args.device)
    else:
        torch.manual_seed(0)
        refiner = Refiner.create("refine-unet", teacher.classes, teacher.feature_channels, digest).to(args.device)
    refiner_path = args.refiner or work / "refiner-random.pt"
    if not args.refiner:
        refiner.save(refiner_path)
    flow = FlowConfig(backend="dis-fast", workers=args.workers)
    results: dict = {"machine": machine(), "settings": {
        "methods": args.method, "flow": "dis-fast", "workers": args.workers, "device": args.device,
        "batches": args.batch,
        "teacher": str(args.teacher or "unet-lite, random init"),
        "refiner": str(args.refiner or "refine-unet, random init"), "torch_threads": torch.get_num_threads()},
        "runs": []}
    if args.device.startswith("cuda"):
        warm_up(teacher, refiner, args.device, args.sizes)
    with tempfile.TemporaryDirectory(prefix="autolabel-throughput-") as tmp:
        refiner_for = {m: refiner_path if m == "warp-refine" else None for m in args.method}
        camvid = (args.data or shared_data_dir()) / "camvid"
        for method in args.method:
            for size in args.sizes:
                w, h = (int(v) for v in size.split("x"))
                synth = f"{tmp}/synth-{method}-{size}.zarr"
                write_synthetic_store(synth, drive_configs(3, SyntheticConfig(width=w, height=h, frames=args.frames,
                                                                             seed=0)),
                                      AnnotationPolicy(mode="window", n=21))
                results["runs"].append({"method": method, "data": f"synthetic drives, 3 x {args.frames} frames",
                                        "size": size, **run(synth, teacher_path, flow, args.device, method,
                                                            refiner_for[method], args.batch)})
                shutil.rmtree(synth, ignore_errors=True)
            if camvid.is_dir():
                url = f"{tmp}/camvid-{method}.zarr"
                ingest(read_dataset("camvid", camvid), url,
                       IngestOptions(annotation=AnnotationPolicy(mode="window", n=21), sequences=["dense_*"]))
                results["runs"].append({"method": method, "data": "CamVid dense 0016E5, 42 frames", "size": "480x360",
                                        **run(url, teacher_path, flow, args.device, method, refiner_for[method],
                                              args.batch)})
        shutil.rmtree(tmp, ignore_errors=True)
    keys = [k for k in results["runs"][0]["frames_per_s"] if k.startswith("propagate")] if results["runs"] else []
    rows = [[r["method"], r["data"], r["size"], r["frames"],
             *(f"{r['frames_per_s'][k]:.1f}" if r["frames_per_s"].get(k) else "-"
               for k in ("flow", "teacher", *keys, "end_to_end")),
             "yes" if r["labels_identical_across_batches"] else "NO"] for r in results["runs"]]
    print_table(f"labelling throughput (frames/s), DIS-fast, {args.device}",
                ["method", "data", "size", "frames", "flow", "teacher", *keys, "end to end", "same labels"], rows)
    if args.fresh_frames > 0 and "warp-refine" in args.method:
        results["fresh_drive"] = [fresh_drive(teacher_path, refiner_path, args.fresh_frames, args.sizes[0], est,
                                              args.device)
                                  for est in (False, True)]
        print_table("autolabel label --method warp-refine --flow dis-fast, fresh drive, process start included",
                    ["frames", "size", "estimate", "seconds", "frames/s"],
                    [[r["frames"], r["size"], "yes" if r["estimate"] else "no", r["seconds"], r["frames_per_s"]]
                     for r in results["fresh_drive"]])
        for r in results["fresh_drive"]:  # folded between stages, as `label` prints them
            print_items(f"estimate {'on' if r['estimate'] else 'off'}, time per stage:",
                        [s.strip() for s in r["stage_seconds"].split(",") if s.strip()])
    if args.train_steps > 0:
        rate = refiner_training_rate(teacher, refiner, args.device, args.train_steps)
        results["refiner_training"] = rate
        print_table(f"refiner training, {args.device}", ["cycles", "cycle samples/s", "train samples/s", "crop", "batch"],
                    [[rate["cycles"], rate["cycle_samples_per_s"], rate["train_samples_per_s"], 256, 8]])
    write_json("throughput", results, args.out)


if __name__ == "__main__":
    main()
