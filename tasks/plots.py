"""PNG plots of an :class:`~autolabel.tasks.evaluate.EvaluationReport`: mIoU vs propagation distance (paper Fig. 1), per-class IoU (Fig. 5).

Uses matplotlib's non-interactive Agg backend, so it runs on headless workers.
"""

from __future__ import annotations

from pathlib import Path
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from autolabel.tasks.evaluate import EvaluationReport  # noqa: E402

# a fixed colour per method, so figures of different stores compare at a glance
METHOD_STYLE = {
    "motion-only": ("#1f77b4", "o"),
    "semantic-only": ("#ff7f0e", "s"),
    "warp-inpaint": ("#2ca02c", "^"),
    "warp-refine": ("#d62728", "D"),
}


def _style(method: str, i: int) -> tuple[str, str]:
    return METHOD_STYLE.get(method, (f"C{4 + i}", "x"))


def plot_miou_by_distance(report: EvaluationReport, path: Path, title: str | None = None) -> Path:
    """One line per method: mIoU (%) at each propagation distance 1..K."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, (method, res) in enumerate(report.methods.items()):
        points = [(int(d), v) for d, v in res.miou_by_distance.items() if v is not None]
        if not points:
            continue
        colour, marker = _style(method, i)
        xs, ys = zip(*sorted(points))
        mean = res.miou_mean
        label = f"{method} (mean {mean:.1f})" if mean is not None else method
        ax.plot(xs, ys, marker=marker, color=colour, label=label, linewidth=1.8, markersize=5)
    ax.set_xlabel("propagation distance (frames from the annotated frame)")
    ax.set_ylabel("mIoU (%)")
    ax.set_xticks(range(1, report.max_distance + 1))
    ax.grid(alpha=0.3)
    ax.set_title(title or f"mIoU vs distance - {Path(report.store).name}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_per_class_iou(report: EvaluationReport, path: Path, title: str | None = None) -> Path:
    """Grouped bars: IoU (%) of each class for each method (distances 1..K pooled)."""
    methods = list(report.methods)
    classes = list(next(iter(report.methods.values())).per_class_iou) if methods else []
    fig, ax = plt.subplots(figsize=(max(6.4, 0.75 * len(classes) + 2), 4.2), dpi=120)
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(classes))
    for i, method in enumerate(methods):
        values = [report.methods[method].per_class_iou.get(c) for c in classes]
        heights = [np.nan if v is None else v for v in values]
        colour, _ = _style(method, i)
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, heights, width, label=method, color=colour)
    ax.set_xticks(x, classes, rotation=35, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or f"per-class IoU - {Path(report.store).name}")
    ax.legend(fontsize=8, ncols=min(len(methods), 4), loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_report(report: EvaluationReport, folder: Path, prefix: str = "") -> list[Path]:
    """Both figures into ``folder``: ``<prefix>miou_by_distance.png`` and ``<prefix>per_class_iou.png``."""
    folder = Path(folder)
    return [plot_miou_by_distance(report, folder / f"{prefix}miou_by_distance.png"),
            plot_per_class_iou(report, folder / f"{prefix}per_class_iou.png")]
