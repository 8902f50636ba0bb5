"""PNG plots of an :class:`~autolabel.tasks.evaluate.EvaluationReport`: mIoU vs propagation distance (paper Fig. 1), per-class IoU (Fig. 5).

Uses matplotlib's non-interactive Agg backend, so it runs on headless workers.
"""

from __future__ import annotations

from pathlib import Path
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from autolabel.atomic import atomic_path
from autolabel.storage.store import Sequence  # noqa: E402
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


def plot_miou_by_distance(report: EvaluationReport, path: Path, title: str | None = None, dpi: int = 120) -> Path:
    """One line per method: mIoU (%) at each propagation distance 1..K (dashed: estimated, no ground truth)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=dpi)
    for i, (method, res) in enumerate(report.methods.items()):
        points = [(int(d), v) for d, v in res.miou_by_distance.items() if v is not None]
        if not points:
            continue
        colour, marker = _style(method, i)
        xs, ys = zip(*sorted(points))
        mean = res.miou_mean
        label = f"{method} (mean {mean:.1f})" if mean is not None else method
        ax.plot(xs, ys, marker=marker, color=colour, label=label, linewidth=1.8, markersize=5)
    for i, (method, res) in enumerate(report.methods.items()):
        points = [(int(d), v) for d, v in res.estimated_miou_by_distance.items() if v is not None]
        if not points:
            continue
        colour, marker = _style(method, i)
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, color=colour, linestyle="--", linewidth=1.2, alpha=0.8, label=f"{method}, estimated")
    ax.set_xlabel("propagation distance (frames from the annotated frame)")
    ax.set_ylabel("mIoU (%)")
    ax.set_xticks(range(1, report.max_distance + 1))
    ax.grid(alpha=0.3)
    ax.set_title(title or f"mIoU vs distance - {Path(report.store).name}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=8)
    else:  # every drive failed, or none has results yet: say so instead of an empty grid
        ax.text(0.5, 0.5, "nothing scored: no drive has results", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
        ax.set_ylim(0, 100)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def plot_per_class_iou(report: EvaluationReport, path: Path, title: str | None = None, dpi: int = 120) -> Path:
    """Grouped bars: IoU (%) of each class for each method (distances 1..K pooled)."""
    methods = list(report.methods)
    classes = list(next(iter(report.methods.values())).per_class_iou) if methods else []
    fig, ax = plt.subplots(figsize=(max(6.4, 0.75 * len(classes) + 2), 4.2), dpi=dpi)
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def plot_report(report: EvaluationReport, folder: Path, prefix: str = "") -> list[Path]:
    """Both figures into ``folder``: ``<prefix>miou_by_distance.png`` and ``<prefix>per_class_iou.png``."""
    folder = Path(folder)
    return [plot_miou_by_distance(report, folder / f"{prefix}miou_by_distance.png"),
            plot_per_class_iou(report, folder / f"{prefix}per_class_iou.png")]


def plot_worst_frame(seq: Sequence, method: str, t: int, path: Path, title: str | None = None, dpi: int = 80) -> Path:
    """Three panels of frame ``t``: the image, its labels over it, and where they are likely wrong.

    The third panel shows the pixels that disagree with the ground truth where the frame has it,
    else the method's confidence (dark: unsure).
    """
    from autolabel.storage.export import class_boundaries, overlay
    from autolabel.storage.stages import result_array_names

    labels_name, conf_name, _ = result_array_names(method)
    labels = np.asarray(seq.array(labels_name)[t])
    conf = np.asarray(seq.array(conf_name)[t])
    classes = seq.store.classes
    frame = seq.frame(t)
    blended = overlay(frame, classes.colour_lut()[labels], labels != classes.ignore_index,
                      boundaries=class_boundaries(labels))
    h, w = labels.shape
    fig, axes = plt.subplots(1, 3, figsize=(3 * 3.2, 3.2 * h / w + 0.5), dpi=dpi)
    axes[0].imshow(frame)
    axes[0].set_title(f"frame {seq.frame_names[t]}", fontsize=9)
    axes[1].imshow(blended)
    axes[1].set_title(f"{method} labels", fontsize=9)
    if seq.has_gt[t] and not seq.annotated[t]:
        gt = seq.ground_truth(t)
        wrong = (labels != gt) & (gt != classes.ignore_index)
        axes[2].imshow(np.where(wrong[..., None], np.array([220, 30, 30], np.uint8), frame // 3))
        axes[2].set_title(f"wrong pixels (red): {100 * wrong.mean():.1f} %", fontsize=9)
    else:
        axes[2].imshow(conf, cmap="magma", vmin=0, vmax=255)
        axes[2].set_title("confidence (dark: unsure)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title or f"{seq.id}: frame {t}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path
