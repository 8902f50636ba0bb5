"""Optical-flow benchmark: accuracy (EPE) on Middlebury and speed per backend.

    python benchmarks/flow.py [--data ../shared/data] [--out benchmarks/results/flow.json]

EPE: average end-point error of the forward flow frame10 -> frame11 over the pixels with known
ground truth, on the eight Middlebury pairs. Speed: pairs per second (forward + backward flow of
one pair) in one process, and with the 2-process FlowEstimator, at 480x360 and 960x720 on
synthetic drive frames; one flow direction costs half a pair.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._report import machine, print_table, write_json  # noqa: E402
from autolabel.models.optical_flow import FlowConfig, FlowEstimator, create_backend, endpoint_error, read_flo  # noqa: E402
from autolabel.storage.synthetic import SyntheticConfig, SyntheticDrive  # noqa: E402

BACKENDS = [("dis-ultrafast", False), ("dis-fast", False), ("dis-medium", False), ("dis-medium", True), ("farneback", False)]


def middlebury_epe(root: Path, config: FlowConfig) -> dict[str, float]:
    backend = create_backend(config)
    scores = {}
    for scene in sorted(p for p in root.iterdir() if (p / "flow10.flo").is_file()):
        a = np.asarray(Image.open(scene / "frame10.png").convert("RGB"))
        b = np.asarray(Image.open(scene / "frame11.png").convert("RGB"))
        fw, _ = backend.pair(a, b)
        scores[scene.name] = endpoint_error(fw, read_flo(scene / "flow10.flo"))
    return scores


def speed(config: FlowConfig, frames: list[np.ndarray], repeats: int = 2) -> float:
    """Pairs per second over consecutive ``frames`` (best of ``repeats``, pool start excluded)."""
    best = 0.0
    with FlowEstimator(config) as estimator:
        list(estimator.pairs(frames[:3]))  # warm up (and start the worker processes)
        for _ in range(repeats):
            start = time.perf_counter()
            n = sum(1 for _ in estimator.pairs(frames))
            best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--frames", type=int, default=25, help="frames per speed run")
    args = parser.parse_args()
    from autolabel.settings import shared_data_dir

    middlebury = (args.data or shared_data_dir()) / "middlebury_flow"
    sizes = [(480, 360), (960, 720)]
    clips = {size: [SyntheticDrive(SyntheticConfig(width=size[0], height=size[1], frames=args.frames, seed=0)).render(t).rgb
                    for t in range(args.frames)] for size in sizes}
    rows, results = [], []
    for backend, vr in BACKENDS:
        name = backend + ("+vr" if vr else "")
        entry: dict = {"backend": name}
        if middlebury.is_dir():
            scores = middlebury_epe(middlebury, FlowConfig(backend=backend, variational_refinement=vr))
            entry["middlebury_epe"] = scores
            entry["middlebury_epe_mean"] = float(np.mean(list(scores.values())))
        for size in sizes:
            for workers in (1, 2):
                entry[f"pairs_per_s_{size[0]}x{size[1]}_w{workers}"] = speed(
                    FlowConfig(backend=backend, variational_refinement=vr, workers=workers), clips[size])
        results.append(entry)
        rows.append([name, f"{entry.get('middlebury_epe_mean', float('nan')):.3f}",
                     *(f"{entry[f'pairs_per_s_{w}x{h}_w{k}']:.1f}" for (w, h) in sizes for k in (1, 2))])
        print(f"done {name}", flush=True)
    print_table("optical flow: Middlebury EPE (px) and pairs/s (forward + backward)",
                ["backend", "EPE", "480x360 1p", "480x360 2p", "960x720 1p", "960x720 2p"], rows)
    write_json("flow", {"machine": machine(), "data": str(middlebury), "settings": {"speed_frames": args.frames,
               "speed_data": "synthetic drive frames, seed 0"}, "backends": results}, args.out)


if __name__ == "__main__":
    main()
