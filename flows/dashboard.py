"""The dashboard: keyed Prefect artifacts that every ``autolabel`` run publishes.

Keys are per store (``<slug>-per-sequence``, ``<slug>-miou-by-distance``, ``<slug>-per-class-iou``,
``<slug>-summary``), so the Artifacts page shows each table's history across runs.
"""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from autolabel.tasks.evaluate import EvaluationReport


def store_slug(store: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes: ``/data/Apollo.zarr`` -> ``apollo``."""
    name = store.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "store"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def sequence_table(report: EvaluationReport, method: str, workers: dict[str, str]) -> list[dict[str, Any]]:
    """One row per sequence: mIoU where it has ground truth, coverage and mean confidence otherwise."""
    rows = []
    for r in report.methods[method].sequences:
        rows.append({
            "sequence": r.sequence, "frames": r.frames, "annotated": r.annotated,
            "frames labelled": r.frames_labelled,
            "mIoU (%)": _fmt(r.miou) if r.has_gt else "no ground truth",
            "coverage (%)": _fmt(r.coverage), "mean confidence (%)": _fmt(r.mean_confidence),
            "worker": workers.get(r.sequence, "-"),
        })
    return rows


def publish(store: str, report: EvaluationReport, final_method: str, workers: dict[str, str],
            failures: dict[str, str], exported: str | None, counts: dict[str, int]) -> dict[str, str]:
    """Create the four keyed artifacts; returns their keys."""
    slug = store_slug(store)
    keys = {name: f"{slug}-{name}" for name in ("per-sequence", "miou-by-distance", "per-class-iou", "summary")}
    create_table_artifact(key=keys["per-sequence"], table=sequence_table(report, final_method, workers),
                          description=f"{final_method}: per-sequence mIoU (or coverage) and frames labelled, {store}")
    methods = report.methods
    create_table_artifact(
        key=keys["miou-by-distance"],
        table=[{"method": name, **{f"d={d}": _fmt(v) for d, v in m.miou_by_distance.items()},
                "mean": _fmt(m.miou_mean)} for name, m in methods.items()],
        description=f"mIoU (%) by propagation distance, pooled over the sequences with ground truth, {store}")
    classes = list(next(iter(methods.values())).per_class_iou) if methods else []
    create_table_artifact(
        key=keys["per-class-iou"],
        table=[{"class": c, **{name: _fmt(m.per_class_iou[c]) for name, m in methods.items()}} for c in classes],
        description=f"per-class IoU (%), distances pooled, {store}")
    lines = [f"# autolabel: {store}", "",
             f"- sequences labelled: **{counts.get('labelled', 0)}**, already up to date: {counts.get('skipped', 0)}, "
             f"failed: **{len(failures)}**"]
    for name, m in methods.items():
        lines.append(f"- {name}: mean mIoU over distances **{_fmt(m.miou_mean)}**")
    lines.append(f"- overlays: `{exported}`" if exported else "- overlays: not exported (set export_dir)")
    if failures:
        lines += ["", "## Failures", "", "| sequence | error |", "|---|---|"]
        lines += [f"| {seq} | {err.replace('|', '/')} |" for seq, err in sorted(failures.items())]
    create_markdown_artifact(key=keys["summary"], markdown="\n".join(lines), description=f"autolabel summary, {store}")
    return keys
