"""Shared helpers for benchmark scripts: machine description, table printing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, memory, Python and key package versions."""
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("numpy", "zarr", "numcodecs", "pillow", "opencv-python-headless", "torch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    # a copy without .git (the device machine's) says which commit it is in $AUTOLABEL_COMMIT
    commit = commit or os.environ.get("AUTOLABEL_COMMIT", "")
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
        "gpu": _gpu(), "git_commit": commit, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _gpu() -> str | None:
    """The first CUDA device's name and memory where torch is loaded and sees one, else None."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s)"


TABLE_WIDTH = 80  # a terminal's and a CI log's width: benchmark tables fold to fit it
TEXT_FOLD_MIN = 12  # a text cell folds to no narrower than this (or its longest word)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x%"))
        return True
    except ValueError:
        return text in ("-", "")


def _wrap(text: str, width: int) -> list[str]:
    """``text`` folded at spaces into lines of at most ``width`` (a longer word keeps its own line)."""
    import textwrap

    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]


def table_lines(columns: list[str], rows: list[list[Any]], width: int = TABLE_WIDTH) -> list[str]:
    """A plain-text table in at most ``width`` columns where it can be: headers fold onto more lines at
    spaces, then the widest text columns fold their cells (down to ``TEXT_FOLD_MIN`` characters);
    numbers are never folded or cut, and are right-aligned."""
    cells = [[str(v) for v in r] for r in rows]
    numeric = [all(_is_number(r[i]) for r in cells) for i in range(len(columns))]
    values = [max((len(r[i]) for r in cells), default=0) for i in range(len(columns))]
    words = [max(len(w) for w in (str(c).split() or [""])) for c in columns]
    narrowest = [max([words[i], min(values[i], TEXT_FOLD_MIN)]
                     + [len(w) for r in cells for w in (r[i].split() or [""])]) for i in range(len(columns))]
    widths = [max(values[i], words[i]) for i in range(len(columns))]

    def total() -> int:
        return sum(widths) + 2 * (len(widths) - 1)

    while total() > width:  # fold the widest text column that can still fold
        foldable = [i for i in range(len(widths)) if not numeric[i] and widths[i] > narrowest[i]]
        if not foldable:
            break
        i = max(foldable, key=lambda k: widths[k])
        widths[i] = max(narrowest[i], widths[i] - (total() - width))
    lines = []
    for row, rule in ((list(map(str, columns)), True), *((r, False) for r in cells)):
        parts = [_wrap(v, w) for v, w in zip(row, widths)]
        for k in range(max((len(p) for p in parts), default=1)):
            line = "  ".join((p[k] if k < len(p) else "").rjust(w) if numeric[i] and not rule else
                             (p[k] if k < len(p) else "").ljust(w) for i, (p, w) in enumerate(zip(parts, widths)))
            lines.append(line.rstrip())
        if rule:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """``title``, then the table folded to 80 columns (:func:`table_lines`)."""
    print(f"\n{title}")
    for line in table_lines(columns, rows):
        print(line)


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")
    return path
