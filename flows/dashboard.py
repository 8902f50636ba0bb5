"""The dashboard: keyed Prefect artifacts that every ``autolabel`` run publishes.

Keys are per store (``<slug>-per-sequence``, ``<slug>-miou-by-distance``, ``<slug>-per-class-iou``,
``<slug>-summary``), so the Artifacts page shows each table's history across runs.
"""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact


def store_slug(store: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes: ``/data/Apollo.zarr`` -> ``apollo``."""
    name = store.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "store"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def sequence_table(report: dict[str, Any], method: str, workers: dict[str, str]) -> list[dict[str, Any]]:
    """One row per sequence: mIoU where it has ground truth, coverage and mean confidence otherwise."""
    rows = []
    for r in report["rows"][method]:
        rows.append({
            "sequence": r["sequence"], "frames": r["frames"], "annotated": r["annotated"],
            "frames labelled": r["frames_labelled"],
            "mIoU (%)": _fmt(r["miou"]) if r["has_gt"] else "no ground truth",
            "coverage (%)": _fmt(r["coverage"]), "mean confidence (%)": _fmt(r["mean_confidence"]),
            "worker": workers.get(r["sequence"], "-"),
        })
    return rows


def publish(store: str, report: dict[str, Any], final_method: str, workers: dict[str, str],
            failures: dict[str, str], exported: str | None, counts: dict[str, int]) -> dict[str, str]:
    """Create the four keyed artifacts; returns their keys."""
    slug = store_slug(store)
    keys = {name: f"{slug}-{name}" for name in ("per-sequence", "miou-by-distance", "per-class-iou", "summary")}
    create_table_artifact(key=keys["per-sequence"], table=sequence_table(report, final_method, workers),
                          description=f"{final_method}: per-sequence mIoU (or coverage) and frames labelled, {store}")
    methods = list(report["miou_by_distance"])
    distances = list(next(iter(report["miou_by_distance"].values()), {}))
    create_table_artifact(
        key=keys["miou-by-distance"],
        table=[{"method": m, **{f"d={d}": _fmt(report["miou_by_distance"][m][d]) for d in distances},
                "mean": _fmt(report["miou_mean"][m])} for m in methods],
        description=f"mIoU (%) by propagation distance, pooled over the sequences with ground truth, {store}")
    classes = list(next(iter(report["per_class_iou"].values()), {}))
    create_table_artifact(
        key=keys["per-class-iou"],
        table=[{"class": c, **{m: _fmt(report["per_class_iou"][m][c]) for m in methods}} for c in classes],
        description=f"per-class IoU (%), distances pooled, {store}")
    lines = [f"# autolabel: {store}", "",
             f"- sequences labelled: **{counts.get('labelled', 0)}**, already up to date: {counts.get('skipped', 0)}, "
             f"failed: **{len(failures)}**"]
    for m in methods:
        lines.append(f"- {m}: mean mIoU over distances **{_fmt(report['miou_mean'][m])}**")
    lines.append(f"- overlays: `{exported}`" if exported else "- overlays: not exported (set export_dir)")
    if failures:
        lines += ["", "## Failures", "", "| sequence | error |", "|---|---|"]
        lines += [f"| {seq} | {err.replace('|', '/')} |" for seq, err in sorted(failures.items())]
    create_markdown_artifact(key=keys["summary"], markdown="\n".join(lines), description=f"autolabel summary, {store}")
    return keys
