"""Ingest benchmark: throughput on 854x480 JPEG and peak memory for 100- vs 1000-frame sequences.

    python benchmarks/ingest.py [--data ../shared/data] [--out benchmarks/results/ingest.json]

Throughput is measured on DAVIS-2016 (854x480 JPEG, 645 frames) when the shared data is present,
and always on a synthetic ApolloScape-layout drive saved as 854x480 JPEG. Peak memory (max RSS of
a fresh process) is measured for ingesting 100- and 1000-frame synthetic JPEG sequences and for
rendering 100- and 1000-frame synthetic drives straight into a store with their exact flow; the
goal is a flat profile: memory must not grow with sequence length.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._report import machine, print_table, write_json  # noqa: E402

_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
mode, arg, store, frames = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
if mode == "ingest":
    from autolabel.storage.ingest import ingest
    from autolabel.storage.readers import read_dataset
    report = ingest(read_dataset(arg.split(":")[0], arg.split(":", 1)[1]), store)
    assert report.ok, report.failed
    written = report.frames_written
else:
    from autolabel.storage.synthetic import SyntheticConfig
    from autolabel.storage.synthetic_io import write_synthetic_store
    w, h = (int(v) for v in arg.split("x"))
    report = write_synthetic_store(store, [SyntheticConfig(width=w, height=h, frames=frames, seed=0)])
    written = report.frames_written
seconds = time.perf_counter() - start
print(json.dumps({{"frames": written, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run_child(mode: str, arg: str, store: Path, frames: int = 0) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD.format(repo=str(REPO)), mode, arg, str(store), str(frames)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_jpeg_drive(folder: Path, frames: int, distinct: int = 60) -> Path:
    """An ApolloScape-layout drive of ``frames`` 854x480 JPEGs (``distinct`` rendered, then repeated)."""
    from autolabel.storage.synthetic import SyntheticConfig
    from autolabel.storage.synthetic_io import write_apollo_layout

    cfg = SyntheticConfig(width=854, height=480, frames=min(frames, distinct), seed=0)
    camera = write_apollo_layout(folder, [cfg])[0]
    labels = folder / "road01" / "Label" / "Record001" / "Camera 5"
    rendered = sorted(camera.glob("*.jpg"))
    for i in range(len(rendered), frames):
        src = rendered[i % len(rendered)]
        stem = f"170908_{i:09d}_Camera_5"
        shutil.copyfile(src, camera / f"{stem}.jpg")
        shutil.copyfile(labels / f"{src.stem}_bin.png", labels / f"{stem}_bin.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="shared data root (default: AUTOLABEL_SHARED_DATA or ../shared/data)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--render-size", default="320x240", help="frame size for the render-into-store memory runs")
    args = parser.parse_args()
    from autolabel.settings import shared_data_dir

    data = args.data or shared_data_dir()
    results: dict = {"machine": machine(), "settings": {"store_codec": "blosc zstd clevel 3 bitshuffle",
                                                        "prefetch_frames": 4, "render_size": args.render_size},
                     "throughput": [], "memory": []}
    with tempfile.TemporaryDirectory(prefix="autolabel-bench-") as tmp_name:
        tmp = Path(tmp_name)
        davis = data / "davis2016"
        if davis.is_dir():
            r = run_child("ingest", f"davis:{davis}", tmp / "davis.zarr")
            results["throughput"].append({"data": f"DAVIS-2016 val ({davis})", "size": "854x480", "format": "JPEG", **r,
                                          "frames_per_s": r["frames"] / r["seconds"]})
        else:
            print(f"(no DAVIS at {davis}; skipping the real-data throughput run)")
        for frames in (100, 1000):
            drive = make_jpeg_drive(tmp / f"jpeg{frames}", frames)
            r = run_child("ingest", f"apollo:{drive}", tmp / f"jpeg{frames}.zarr")
            entry = {"data": f"synthetic drive, {frames} frames", "size": "854x480", "format": "JPEG", **r,
                     "frames_per_s": r["frames"] / r["seconds"]}
            results["throughput"].append(entry)
            results["memory"].append({"what": "ingest JPEG sequence", "size": "854x480", **r})
            shutil.rmtree(drive)
        for frames in (100, 1000):
            r = run_child("render", args.render_size, tmp / f"render{frames}.zarr", frames)
            results["memory"].append({"what": "render drive + exact flow into store", "size": args.render_size, **r})

    print_table("ingest throughput", ["data", "size", "frames", "seconds", "frames/s"],
                [[t["data"], t["size"], t["frames"], f"{t['seconds']:.1f}", f"{t['frames_per_s']:.1f}"] for t in results["throughput"]])
    print_table("peak memory (max RSS of a fresh process)", ["what", "size", "frames", "peak RSS MB", "seconds"],
                [[m["what"], m["size"], m["frames"], f"{m['peak_rss_mb']:.0f}", f"{m['seconds']:.1f}"] for m in results["memory"]])
    print(f"\nmachine: {results['machine']['cpu']}, {results['machine']['cores']} cores")
    write_json("ingest", results, args.out)


if __name__ == "__main__":
    main()
