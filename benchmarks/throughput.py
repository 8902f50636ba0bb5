"""Labelling throughput: warp-inpaint with DIS-fast, teacher inference included, training excluded.

    python benchmarks/throughput.py [--teacher runs/teacher-camvid.pt] [--device cpu|cuda] [--out ...]

Runs the three stages of ``autolabel label`` (flow estimation, teacher inference, propagation)
on synthetic drives at 480x360 (and on CamVid dense when the shared data is present) and reports
frames per second for each stage and end to end. Without --teacher, a randomly initialised
unet-lite is used: inference costs the same whatever the weights.
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
from models.optical_flow import FlowConfig, FlowEstimator  # noqa: E402
from models.propagation import PropagationConfig  # noqa: E402
from models.teacher import Teacher, file_sha256  # noqa: E402
from storage.annotation import AnnotationPolicy  # noqa: E402
from storage.classes import CAMVID11  # noqa: E402
from storage.ingest import ingest  # noqa: E402
from storage.readers import read_dataset  # noqa: E402
from storage.store import SequenceStore  # noqa: E402
from storage.synthetic import SyntheticConfig, drive_configs  # noqa: E402
from storage.synthetic_io import write_synthetic_store  # noqa: E402
from tasks.flow_estimation import estimate_flow  # noqa: E402
from tasks.propagate import label_sequence  # noqa: E402
from tasks.teacher_inference import infer_teacher  # noqa: E402


def run(store_url: str, teacher: Teacher, teacher_hash: str, flow: FlowConfig, device: str) -> dict:
    store = SequenceStore.open(store_url, mode="r+")
    times = {"flow": 0.0, "teacher": 0.0, "propagate": 0.0}
    frames = 0
    with FlowEstimator(flow) as estimator:
        list(estimator.pairs([store.sequence(store.sequence_ids()[0]).frame(0)] * 2))  # start workers
        for seq_id in store.sequence_ids():
            frames += store.sequence(seq_id).num_frames
            start = time.perf_counter()
            estimate_flow(store, seq_id, flow, estimator)
            times["flow"] += time.perf_counter() - start
            start = time.perf_counter()
            infer_teacher(store, seq_id, teacher, teacher_hash, batch_size=4)
            times["teacher"] += time.perf_counter() - start
            start = time.perf_counter()
            label_sequence(store, seq_id, PropagationConfig(method="warp-inpaint", device=device), flow.stored_name)
            times["propagate"] += time.perf_counter() - start
    total = sum(times.values())
    return {"frames": frames, "seconds": {k: round(v, 2) for k, v in times.items()},
            "frames_per_s": {**{k: frames / v for k, v in times.items()}, "end_to_end": frames / total}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="flow processes (0 = auto)")
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
    flow = FlowConfig(backend="dis-fast", workers=args.workers)
    results = {"machine": machine(), "settings": {"method": "warp-inpaint", "flow": "dis-fast", "workers": args.workers,
               "device": args.device, "teacher": str(args.teacher or "unet-lite, random init"),
               "torch_threads": torch.get_num_threads()}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="autolabel-throughput-") as tmp:
        synth = f"{tmp}/synth.zarr"
        write_synthetic_store(synth, drive_configs(3, SyntheticConfig(width=480, height=360, frames=63, seed=0)),
                              AnnotationPolicy(mode="window", n=21))
        results["runs"].append({"data": "synthetic drives, 3 x 63 frames", "size": "480x360",
                                **run(synth, teacher, digest, flow, args.device)})
        camvid = (args.data or shared_data_dir()) / "camvid"
        if camvid.is_dir():
            url = f"{tmp}/camvid.zarr"
            dataset = read_dataset("camvid", camvid)
            from storage.ingest import IngestOptions

            ingest(dataset, url, IngestOptions(annotation=AnnotationPolicy(mode="window", n=21), sequences=["dense_*"]))
            results["runs"].append({"data": "CamVid dense 0016E5, 42 frames", "size": "480x360",
                                    **run(url, teacher, digest, flow, args.device)})
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [[r["data"], r["size"], r["frames"], *(f"{r['frames_per_s'][k]:.1f}" for k in ("flow", "teacher", "propagate", "end_to_end"))]
            for r in results["runs"]]
    print_table(f"warp-inpaint throughput (frames/s), DIS-fast, {args.device}",
                ["data", "size", "frames", "flow", "teacher", "propagate", "end to end"], rows)
    write_json("throughput", results, args.out)


if __name__ == "__main__":
    main()
