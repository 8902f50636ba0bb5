"""Helpers of the fault-injection tests: tiny stores, `autolabel` processes, and store snapshots."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from autolabel.storage.store import SequenceStore

LABEL_ARGS = {
    # the estimate stage writes one record under its lease like any stage; left out to keep the loops short
    "motion-only": ["--method", "motion-only", "--flow", "dis-fast", "--max-distance", "5", "--no-estimate"],
    "warp-inpaint": ["--method", "warp-inpaint", "--flow", "dis-fast", "--max-distance", "5", "--no-estimate"],
}


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", **(extra or {})}


def start_cli(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
    """``autolabel ARGS`` as a background process (stderr carries the progress lines)."""
    return subprocess.Popen([sys.executable, "-m", "autolabel.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(env), **kw)


def label_args(store: str, method: str, teacher: Path) -> list[str]:
    args = ["label", store, *LABEL_ARGS[method]]
    return [*args, "--teacher", str(teacher)] if method == "warp-inpaint" else args


def run_concurrently(commands: list[list[str]], env: dict[str, str] | None = None,
                     timeout: float = 300) -> list[tuple[int, str]]:
    """Start every command at once; ``(exit code, stderr)`` of each."""
    procs = [start_cli(*c, env=env) for c in commands]
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def kill_at_progress(args: list[str], pattern: str, nth: int, env: dict[str, str] | None = None,
                     timeout: float = 300) -> bool:
    """Run ``autolabel ARGS`` and SIGKILL it at the ``nth`` progress line matching ``pattern``.

    Returns whether it was killed (False: it finished first).
    """
    return signal_at_progress(args, pattern, nth, signal.SIGKILL, env, timeout)[0]


def signal_at_progress(args: list[str], pattern: str, nth: int, sig: signal.Signals,
                       env: dict[str, str] | None = None, timeout: float = 300) -> tuple[bool, int, str]:
    """Run ``autolabel ARGS`` and send it ``sig`` at the ``nth`` progress line matching ``pattern``.

    Returns (whether it was sent before the run finished, exit code, stderr). SIGINT reaches the
    child as Ctrl-C does: its disposition is reset to the default (a shell's background job would
    ignore it).
    """
    proc = start_cli(*args, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr is not None
    seen, lines = 0, []
    deadline = time.monotonic() + timeout
    sent = False
    for line in proc.stderr:
        lines.append(line)
        if re.search(pattern, line):
            seen += 1
            if seen > nth:
                proc.send_signal(sig)
                sent = True
                break
        if time.monotonic() > deadline:
            break
    _, rest = proc.communicate(timeout=60)
    return sent, proc.returncode, "".join(lines) + rest


def kill_after(args: list[str], seconds: float, env: dict[str, str] | None = None) -> bool:
    """Run ``autolabel ARGS`` and SIGKILL it after ``seconds`` (False: it finished first)."""
    proc = start_cli(*args, env=env)
    try:
        proc.communicate(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        return True


def snapshot(url: str) -> dict[str, Any]:
    """What the store holds, comparable across runs: every sequence's stage names and a hash of each
    stage array's content, and the evaluated mIoU (timestamps, versions and workers left out)."""
    store = SequenceStore.open(url)
    out: dict[str, Any] = {}
    for seq in store.sequences():
        stages = seq.stages
        arrays = {}
        for stage, record in stages.items():
            at = record.get("at")
            if not at:
                continue
            group = seq.group[at]
            for path, node in sorted(group.members(max_depth=None)):
                if hasattr(node, "shape"):
                    arrays[f"{stage}:{path}"] = hashlib.sha256(np.ascontiguousarray(node[:]).tobytes()).hexdigest()
        scores = {name: record["evaluation"].get("miou") for name, record in stages.items()
                  if name.startswith("evaluation/")}
        out[seq.id] = {"stages": sorted(stages), "arrays": arrays, "miou": scores,
                       "content_hash": seq.content_hash}
    return out


def copy_store(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment holds ``AUTOLABEL_TEST_TAG=tag``."""
    pids = []
    needle = f"AUTOLABEL_TEST_TAG={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids
