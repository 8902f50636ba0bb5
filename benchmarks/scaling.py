"""Peak memory of labelling against drive length.

    python benchmarks/scaling.py [--frames 100 2000] [--size 320x240] [--method warp-refine] [--out ...]

For each length, one synthetic drive (21-frame windows) is written to a fresh store, then
``autolabel label STORE --method M --flow dis-fast --no-estimate`` runs as a user runs it, in a
new process; its peak resident memory (the process and its flow workers together, sampled every
0.1 s with psutil) and its wall time are recorded. Teacher and refiner are randomly initialised
``unet-lite`` / ``refine-unet`` nets (their cost does not depend on the weights). Labelling reads
and writes frame by frame and propagates one group of keyframe gaps at a time, so the peak should
not grow with the drive's length.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402

from benchmarks._report import machine, print_table, write_json  # noqa: E402
from autolabel.models.refiner import Refiner  # noqa: E402
from autolabel.models.teacher import Teacher  # noqa: E402
from autolabel.storage.annotation import AnnotationPolicy  # noqa: E402
from autolabel.storage.classes import CAMVID11  # noqa: E402
from autolabel.storage.synthetic import SyntheticConfig, drive_configs  # noqa: E402
from autolabel.storage.synthetic_io import write_synthetic_store  # noqa: E402


def peak_rss(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS of the process tree in MB, wall seconds, return code) of ``cmd``."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "100"})
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.read().decode()[-3000:] if proc.stderr else "")
    return peak / 2**20, time.perf_counter() - start, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 2000])
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--method", default="warp-refine")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    rows, runs = [], []
    with tempfile.TemporaryDirectory(prefix="autolabel-scaling-") as tmp:
        torch.manual_seed(0)
        teacher = Teacher.create("unet-lite", CAMVID11.names, [list(c) for c in CAMVID11.palette])
        digest = teacher.save(Path(tmp) / "teacher.pt")
        Refiner.create("refine-unet", CAMVID11.names, teacher.feature_channels, digest).save(Path(tmp) / "refiner.pt")
        for frames in args.frames:
            store = f"{tmp}/drive-{frames}.zarr"
            write_synthetic_store(store, drive_configs(1, SyntheticConfig(width=w, height=h, frames=frames, seed=3)),
                                  AnnotationPolicy(mode="window", n=21))
            cmd = [sys.executable, "-m", "autolabel.cli", "label", store, "--method", args.method, "--flow", "dis-fast",
                   "--teacher", f"{tmp}/teacher.pt", "--no-estimate"]
            if args.method == "warp-refine":
                cmd += ["--refiner", f"{tmp}/refiner.pt"]
            peak, seconds, rc = peak_rss(cmd)
            if rc != 0:
                raise SystemExit(f"autolabel label failed on {frames} frames")
            runs.append({"frames": frames, "peak_rss_mb": round(peak, 1), "seconds": round(seconds, 1),
                         "frames_per_s": round(frames / seconds, 2)})
            rows.append([frames, args.size, args.method, f"{peak:.0f}", f"{seconds:.0f}", f"{frames / seconds:.2f}"])
    print_table("peak RSS of `autolabel label` (process + flow workers)",
                ["frames", "size", "method", "peak MB", "seconds", "frames/s"], rows)
    if len(runs) > 1:
        growth = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"] - 1
        print(f"peak RSS at {runs[-1]['frames']} frames is {growth * 100:+.1f} % of {runs[0]['frames']} frames")
    write_json("scaling", {"machine": machine(), "settings": {"size": args.size, "method": args.method,
                                                               "flow": "dis-fast", "estimate": False},
                           "runs": runs}, args.out)


if __name__ == "__main__":
    main()
