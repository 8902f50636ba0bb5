"""Peak memory of labelling against drive length, and wall time against the number of workers.

    python benchmarks/scaling.py [--frames 100 2000] [--repeat 3] [--workers 1 2 4] [--size 320x240]
                                 [--method warp-refine] [--parts memory workers concurrent]
                                 [--concurrent 2] [--wait-policy ACTIVE|PASSIVE] [--out ...]

For each length, one synthetic drive (21-frame windows) is written to a fresh store, then
``autolabel label STORE --method M --flow dis-fast --no-estimate`` (``--estimate``: without
``--no-estimate``, the estimate made in the propagation's pass) runs as a user runs it, in a
new process; its high-water resident memory (the kernel's ``ru_maxrss``), the sampled peak of its
process tree (every 0.1 s with psutil: a short run is sampled less often, so this one is biased
towards long runs) and its wall time are recorded, ``--repeat`` times on fresh copies (medians: the
high-water mark of the same run moves by tens of MB from run to run). Teacher and refiner are randomly initialised
``unet-lite`` / ``refine-unet`` nets (their cost does not depend on the weights). Labelling reads
and writes frame by frame and propagates one group of keyframe gaps at a time, so the peak should
not grow with the drive's length.

Workers (CPU process workers on this machine; the cores are shared among them through
``$AUTOLABEL_THREADS``): *one long drive* (``--long-frames``) labelled with ``--segment-frames
--jobs N``, i.e. N worker processes taking its segment jobs; and *an inbox* of ``--inbox-drives``
drives, N ``autolabel label --sequence`` processes at a time, each taking the next drive (what N
pool workers do with one run per drive); ``--estimate`` labels them with the quality estimate
(``label``'s default). Every run starts from the same freshly written store;
the long drive's labels are checked to be identical for every N. Wall time and speed-up over one
worker are reported. One worker gets every core unless ``--equal-threads`` gives it only what each
of the most workers gets: on a small machine a lone worker already uses all cores through torch's
threads, which is not what splitting a drive across separate worker machines is about.

Concurrent (``--parts concurrent``): ``--concurrent`` fresh drives of ``--inbox-frames`` frames
labelled at once by separate processes that each take every core (two users' runs on one machine,
several pool workers on one host), against one drive alone, with OpenMP's waiting threads spinning
(``OMP_WAIT_POLICY=ACTIVE``, OpenMP's default) and sleeping (``PASSIVE``, autolabel's default);
``--repeat`` rounds, the two policies alternating.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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


def peak_rss(cmd: list[str]) -> tuple[float, float, float, int]:
    """(kernel high-water RSS of the labelling process in MB, sampled peak of its process tree in MB,
    wall seconds, return code) of ``cmd``.

    The high-water mark (``ru_maxrss`` from ``wait4``) is exact whatever the run's length; the tree
    is sampled every 0.1 s (it also counts flow worker processes, when there are any).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "100"})
    root = psutil.Process(proc.pid)
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        sys.stderr.write(proc.stderr.read().decode()[-3000:] if proc.stderr else "")
    return usage.ru_maxrss / 1024, peak / 2**20, time.perf_counter() - start, code


def label_cmd(store: str, tmp: str, method: str, *extra: str, estimate: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "autolabel.cli", "label", store, "--method", method, "--flow", "dis-fast",
           "--teacher", f"{tmp}/teacher.pt", *([] if estimate else ["--no-estimate"]), *extra]
    if method == "warp-refine":
        cmd += ["--refiner", f"{tmp}/refiner.pt"]
    return cmd


def run_all(cmds: list[list[str]], at_once: int, threads: int | None, wait_policy: str | None = None) -> float:
    """Wall seconds to run ``cmds``, ``at_once`` processes at a time, each with ``threads`` threads
    (None: every core, as a user's run gets) and OpenMP's ``wait_policy`` (None: autolabel's default)."""
    env = {**os.environ, "COLUMNS": "100"}
    env.pop("AUTOLABEL_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    env.update({"AUTOLABEL_THREADS": str(threads)} if threads else {})
    env.update({"OMP_WAIT_POLICY": wait_policy} if wait_policy else {})
    start = time.perf_counter()
    pending, running = list(cmds), []
    while pending or running:
        while pending and len(running) < at_once:
            running.append(subprocess.Popen(pending.pop(0), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            env=env))
        for proc in list(running):
            if proc.poll() is not None:
                running.remove(proc)
                if proc.returncode != 0:
                    raise SystemExit(f"{' '.join(proc.args)} failed:\n{proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    return time.perf_counter() - start


def workers_part(args: argparse.Namespace, tmp: str, w: int, h: int) -> list[dict]:
    """Wall time of the long drive and of the inbox for each number of workers."""
    import shutil

    import numpy as np

    from autolabel.storage.store import SequenceStore

    cores = os.cpu_count() or 1
    # --equal-threads: every worker, the lone one included, gets what each of the most workers gets
    fewest = max(1, cores // max(args.workers)) if args.equal_threads else None
    long_src, inbox_src = f"{tmp}/long.zarr", f"{tmp}/inbox.zarr"
    write_synthetic_store(long_src, drive_configs(1, SyntheticConfig(width=w, height=h, frames=args.long_frames,
                                                                     seed=7)), AnnotationPolicy(mode="window", n=21))
    write_synthetic_store(inbox_src, drive_configs(args.inbox_drives, SyntheticConfig(
        width=w, height=h, frames=args.inbox_frames, seed=11)), AnnotationPolicy(mode="window", n=21))
    drives = SequenceStore.open(inbox_src).sequence_ids()
    results, reference = [], None
    for n in args.workers:
        threads = fewest or max(1, cores // n)
        store = f"{tmp}/long-{n}.zarr"
        shutil.copytree(long_src, store)
        seconds = run_all([label_cmd(store, tmp, args.method, "--segment-frames", str(args.segment_frames),
                                     "--jobs", str(n), estimate=args.estimate)], 1,
                          cores if n == 1 and not fewest else threads, args.wait_policy)
        seq = SequenceStore.open(store).sequence(SequenceStore.open(store).sequence_ids()[0])
        labels = np.asarray(seq.array(f"results/{args.method}/labels")[:])
        same = reference is None or bool(np.array_equal(labels, reference))
        reference = labels if reference is None else reference
        results.append({"case": f"one drive of {args.long_frames} frames", "workers": n, "threads_each": threads,
                        "seconds": round(seconds, 1), "same_labels": same})
        log(f"long drive, {n} workers: {seconds:.1f} s")
        store = f"{tmp}/inbox-{n}.zarr"
        shutil.copytree(inbox_src, store)
        seconds = run_all([label_cmd(store, tmp, args.method, "--sequence", d, estimate=args.estimate)
                           for d in drives], n, threads, args.wait_policy)
        results.append({"case": f"{len(drives)} drives of {args.inbox_frames} frames", "workers": n,
                        "threads_each": threads, "seconds": round(seconds, 1), "same_labels": None})
        log(f"inbox, {n} workers: {seconds:.1f} s")
    for r in results:
        base = next(b["seconds"] for b in results if b["case"] == r["case"] and b["workers"] == args.workers[0])
        r["speedup"] = round(base / r["seconds"], 2)
    return results


def concurrent_part(args: argparse.Namespace, tmp: str, w: int, h: int) -> list[dict]:
    """Wall time of ``--concurrent`` fresh drives labelled at once by separate processes that each take
    every core (two users' runs, several workers on one host), against one drive alone, with OpenMP's
    waiting threads spinning (``ACTIVE``, OpenMP's default) and sleeping (``PASSIVE``, autolabel's)."""
    src = f"{tmp}/concurrent.zarr"
    write_synthetic_store(src, drive_configs(1, SyntheticConfig(width=w, height=h, frames=args.inbox_frames,
                                                                seed=7)), AnnotationPolicy(mode="window", n=21))
    results = []
    for repeat in range(args.repeat):
        for policy in ("ACTIVE", "PASSIVE"):  # alternating: a shared machine's speed drifts
            for n in (1, args.concurrent):
                stores = [f"{tmp}/concurrent-{policy}-{n}-{i}.zarr" for i in range(n)]
                for store in stores:
                    shutil.copytree(src, store)
                seconds = run_all([label_cmd(s, tmp, args.method, estimate=args.estimate) for s in stores], n,
                                  None, policy)
                for store in stores:
                    shutil.rmtree(store, ignore_errors=True)
                results.append({"wait_policy": policy, "processes": n, "repeat": repeat, "seconds": round(seconds, 1)})
                log(f"{n} at once, OMP_WAIT_POLICY={policy}: {seconds:.1f} s")
    return results


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 2000])
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--method", default="warp-refine")
    parser.add_argument("--parts", nargs="+", default=["memory", "workers"],
                        choices=["memory", "workers", "concurrent"])
    parser.add_argument("--concurrent", type=int, default=2,
                        help="concurrent: drives labelled at once by processes that each take every core")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--long-frames", type=int, default=400)
    parser.add_argument("--segment-frames", type=int, default=64)
    parser.add_argument("--inbox-drives", type=int, default=4)
    parser.add_argument("--inbox-frames", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="runs per drive length (medians reported)")
    parser.add_argument("--estimate", action="store_true",
                        help="label with the quality estimate (the default of `label`; off otherwise)")
    parser.add_argument("--equal-threads", action="store_true",
                        help="workers: one worker gets the threads each of the most workers gets (cores / max "
                             "--workers), not every core: the speed-up of splitting alone, as on workers that "
                             "are separate machines")
    parser.add_argument("--wait-policy", choices=["ACTIVE", "PASSIVE"], default=None,
                        help="workers: OMP_WAIT_POLICY of the labelling processes (default: autolabel's, PASSIVE)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    rows, runs = [], []
    with tempfile.TemporaryDirectory(prefix="autolabel-scaling-") as tmp:
        torch.manual_seed(0)
        teacher = Teacher.create("unet-lite", CAMVID11.names, [list(c) for c in CAMVID11.palette])
        digest = teacher.save(Path(tmp) / "teacher.pt")
        Refiner.create("refine-unet", CAMVID11.names, teacher.feature_channels, digest).save(Path(tmp) / "refiner.pt")
        for frames in args.frames if "memory" in args.parts else []:
            store = f"{tmp}/drive-{frames}.zarr"
            write_synthetic_store(store, drive_configs(1, SyntheticConfig(width=w, height=h, frames=frames, seed=3)),
                                  AnnotationPolicy(mode="window", n=21))
            repeats = []
            for r in range(args.repeat):  # each run on a fresh copy: the high-water mark varies run to run
                copy = f"{tmp}/drive-{frames}-run{r}.zarr"
                shutil.copytree(store, copy)
                high, peak, seconds, rc = peak_rss(label_cmd(copy, tmp, args.method, estimate=args.estimate))
                if rc != 0:
                    raise SystemExit(f"autolabel label failed on {frames} frames")
                repeats.append((high, peak, seconds))
                shutil.rmtree(copy, ignore_errors=True)
                log(f"{frames} frames, run {r + 1}/{args.repeat}: high-water {high:.0f} MB in {seconds:.0f} s")
            high = statistics.median(x[0] for x in repeats)
            peak = statistics.median(x[1] for x in repeats)
            seconds = statistics.median(x[2] for x in repeats)
            runs.append({"frames": frames, "max_rss_mb": round(high, 1), "peak_rss_mb": round(peak, 1),
                         "max_rss_mb_runs": [round(x[0], 1) for x in repeats],
                         "seconds": round(seconds, 1), "frames_per_s": round(frames / seconds, 2)})
            spread = f"{min(x[0] for x in repeats):.0f}-{max(x[0] for x in repeats):.0f}"
            rows.append([frames, args.size, args.method, f"{high:.0f}", spread, f"{peak:.0f}", f"{seconds:.0f}",
                         f"{frames / seconds:.2f}"])
        scaling = workers_part(args, tmp, w, h) if "workers" in args.parts else []
        concurrent = concurrent_part(args, tmp, w, h) if "concurrent" in args.parts else []
    if runs:
        print_table("memory of `autolabel label`: high-water RSS (median, range), sampled peak of the tree, "
                    f"estimate {'on' if args.estimate else 'off'}",
                    ["frames", "size", "method", "max MB", "range", "sampled MB", "seconds", "frames/s"], rows)
    if len(runs) > 1:
        growth = runs[-1]["max_rss_mb"] / runs[0]["max_rss_mb"] - 1
        print(f"high-water RSS at {runs[-1]['frames']} frames is {growth * 100:+.1f} % of {runs[0]['frames']} frames")
    if scaling:
        print_table(f"workers: wall time ({args.size}, {args.method}, dis-fast, estimate "
                    f"{'on' if args.estimate else 'off'}, {os.cpu_count()} cores shared)",
                    ["case", "workers", "threads", "seconds", "speed-up", "same labels"],
                    [[r["case"], r["workers"], r["threads_each"], r["seconds"], r["speedup"],
                      "" if r["same_labels"] is None else "yes" if r["same_labels"] else "NO"] for r in scaling])
    if concurrent:
        rows = []
        for policy in ("ACTIVE", "PASSIVE"):
            alone = [r["seconds"] for r in concurrent if r["wait_policy"] == policy and r["processes"] == 1]
            many = [r["seconds"] for r in concurrent if r["wait_policy"] == policy and r["processes"] > 1]
            rows.append([policy, f"{statistics.median(alone):.1f}", args.concurrent, f"{statistics.median(many):.1f}",
                         f"{args.concurrent * statistics.median(alone) / statistics.median(many):.2f}",
                         " / ".join(f"{s:.0f}" for s in many)])
        print_table(f"{args.concurrent} processes at once, every core each ({args.inbox_frames} x {args.size}):"
                    f" wall s, median of {args.repeat}",
                    ["OMP_WAIT_POLICY", "one alone", "at once", "all of them", "vs one by one", "runs"], rows)
    write_json("scaling", {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()} | {
                               "flow": "dis-fast", "estimate": args.estimate},
                           "runs": runs, "workers": scaling, "concurrent": concurrent}, args.out)


if __name__ == "__main__":
    main()
