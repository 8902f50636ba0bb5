"""The dashboard: keyed Prefect artifacts that answer "which drives need me?" after every run.

Keys are per store (``<slug>-...``), so the Artifacts page keeps each one's history across runs:

* ``<slug>-drives``: one row per drive, worst first: its mIoU (true where it has ground truth,
  else the estimate, and which), the gain of warp-refine over warp-inpaint, the change since the
  previous run, a flag, frames, when and where it was labelled, the checkpoints, its run's link;
* ``<slug>-history``: one row per run (date, drives, pooled true and estimated mIoU, d=1 / d=K,
  checkpoint hashes), the previous rows carried over, so trends across nights are visible;
* ``<slug>-miou-by-distance``, ``<slug>-per-class-iou``: tables (absent classes: blank, not 0);
* ``<slug>-summary``: failures first, then the worst drives and regressions, each with the next
  action, then the headline numbers;
* image artifacts ``<slug>-figure-...``: mIoU by distance, per-class IoU and the worst frame, inline.

Building rows and text is pure (:func:`drive_rows`, :func:`history_row`, :func:`summary_markdown`);
:func:`publish` reads the previous run's artifacts and writes the new ones.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from autolabel.storage.store import SequenceStore
from autolabel.tasks.evaluate import EvaluationReport, MethodEvaluation, SequenceEvaluation
from autolabel.wording import count


class DashboardSettings(BaseModel):
    """What the dashboard flags and keeps."""

    model_config = ConfigDict(frozen=True)

    flag_below: float = Field(60.0, ge=0, le=100, description="flag drives whose mIoU (true or estimated) is below")
    regression: float = Field(2.0, ge=0, description="flag drives that lost more mIoU points than this since the "
                                                     "previous run")
    min_refine_gain: float = Field(0.5, description="warn when warp-refine adds less than this over warp-inpaint")
    history_rows: int = Field(90, ge=1, description="runs kept in the history table")
    worst: int = Field(5, ge=1, description="drives listed in the summary")
    figures: bool = Field(True, description="publish the figures as image artifacts")


def store_slug(store: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes: ``/data/Apollo.zarr`` -> ``apollo``."""
    name = store.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "store"


def run_name(store: str, when: datetime | None = None) -> str:
    """A parent run's name: ``<store slug>-<UTC date and time>``, e.g. ``apollo-2026-11-29-0200``."""
    when = when or datetime.now(timezone.utc)
    return f"{store_slug(store)}-{when:%Y-%m-%d-%H%M}"


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 1)


def quality(row: SequenceEvaluation) -> tuple[float | None, str]:
    """A drive's mIoU and its basis: the true value where ground truth exists, else the estimate."""
    if row.has_gt and row.miou is not None:
        return row.miou, "ground truth"
    if row.estimated_miou is not None:
        if row.estimate_basis and "cycles" in row.estimate_basis:
            return row.estimated_miou, "estimate (cycles: optimistic)"
        return row.estimated_miou, "estimate"
    return None, "none"


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "-"


def drive_rows(report: EvaluationReport, method: str, stages: dict[str, dict[str, Any]], previous: dict[str, float],
               settings: DashboardSettings, run_url: str | None = None) -> list[dict[str, Any]]:
    """One row per drive (numbers as numbers), worst first; drives without a value last.

    ``stages``: each drive's stage records (``Sequence.stages``: labelled, teacher, results);
    ``previous``: each drive's mIoU in the previous run's table; ``run_url``: the UI's flow-run URL
    prefix (``.../runs/flow-run/``) for links to the drives' ``label-sequence`` runs.
    """
    inpaint = {r.sequence: r for r in report.methods["warp-inpaint"].sequences} \
        if method == "warp-refine" and "warp-inpaint" in report.methods else {}
    rows = []
    for r in report.methods[method].sequences:
        value, basis = quality(r)
        gain = None
        if r.sequence in inpaint:
            base, base_basis = quality(inpaint[r.sequence])
            if value is not None and base is not None and base_basis == basis:
                gain = _r(value - base)
        before = previous.get(r.sequence)
        change = _r(value - before) if value is not None and before is not None else None
        flags = []
        if value is not None and value < settings.flag_below:
            flags.append(f"below {settings.flag_below:g}")
        if change is not None and change < -settings.regression:
            flags.append("regressed")
        if value is None:
            flags.append("no estimate")
        records = stages.get(r.sequence, {})
        labelled = records.get("labelled", {})
        results = records.get(f"results/{method}", {}).get("settings", {})
        flow_run = labelled.get("flow_run")
        finished = labelled.get("finished_at")
        rows.append({
            "drive": r.sequence, "mIoU": _r(value), "basis": basis, "refine gain": gain, "change": change,
            "flag": ", ".join(flags), "frames": r.frames, "annotated": r.annotated,
            "labelled at": datetime.fromtimestamp(finished, timezone.utc).strftime("%Y-%m-%d %H:%M")
            if finished is not None else "-",
            "worker": labelled.get("worker", "-"),
            "teacher": _short(records.get("teacher", {}).get("settings", {}).get("checkpoint_sha256")),
            "refiner": _short(results.get("refiner_sha256")),
            "run": f"{run_url}{flow_run}" if run_url and flow_run and flow_run != "None" else "-",
        })
    rows.sort(key=lambda row: (row["mIoU"] is None, row["mIoU"] if row["mIoU"] is not None else 0.0))
    return rows


def _at(m: MethodEvaluation, d: int, estimated: bool) -> float | None:
    values = m.estimated_miou_by_distance if estimated else m.miou_by_distance
    return _r(values.get(str(d)))


def history_row(report: EvaluationReport, method: str, name: str, counts: dict[str, int],
                checkpoints: dict[str, str | None]) -> dict[str, Any]:
    """This run's row of the history table."""
    m = report.methods[method]
    k = report.max_distance
    return {
        "run": name, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "drives": len(m.sequences), "labelled": counts.get("labelled", 0), "failed": counts.get("failed", 0),
        "true mIoU": _r(m.miou_mean), "estimated mIoU": _r(m.estimated_miou_mean),
        "true d=1": _at(m, 1, False), f"true d={k}": _at(m, k, False),
        "est. d=1": _at(m, 1, True), f"est. d={k}": _at(m, k, True),
        "teacher": _short(checkpoints.get("teacher")), "refiner": _short(checkpoints.get("refiner")),
    }


def summary_markdown(store: str, name: str, rows: list[dict[str, Any]], report: EvaluationReport, method: str,
                     failures: dict[str, str], counts: dict[str, int], settings: DashboardSettings,
                     exported: str | None) -> str:
    """Failures first, then drives to look at and regressions with the next action, then the numbers."""
    lines = [f"# {name}: {method} on `{store}`", ""]
    if failures:
        lines += [f"## {count(len(failures), 'drive')} failed", "",
                  "Fix the input named in each error, then run again (the others are done and kept).", "",
                  "| drive | error |", "|---|---|"]
        lines += [f"| {seq} | {err.replace('|', '/')} |" for seq, err in sorted(failures.items())]
        lines.append("")
    low = [r for r in rows if r["mIoU"] is not None and r["mIoU"] < settings.flag_below]
    regressed = [r for r in rows if r["change"] is not None and r["change"] < -settings.regression]
    if low or regressed:
        lines += ["## Drives that need you", "", "| drive | mIoU | basis | change | next action |", "|---|---|---|---|---|"]
        for r in (low[: settings.worst] + [r for r in regressed if r not in low]):
            action = (f"review its worst frames: `autolabel review {store} --sequence "
                      f"{r['drive']} --method {method} --budget 10 --out review/`")
            if r in regressed and r not in low:
                action = "compare checkpoints with the previous run (history table); relabel or roll back"
            change = "-" if r["change"] is None else f"{r['change']:+.1f}"
            lines.append(f"| {r['drive']} | {r['mIoU']:.1f} | {r['basis']} | {change} | {action} |")
        lines.append("")
    else:
        lines += [f"No drive below {settings.flag_below:g} mIoU and no regression over "
                  f"{settings.regression:g} points.", ""]
    gains = [r["refine gain"] for r in rows if r["refine gain"] is not None]
    if method == "warp-refine" and gains:
        mean_gain = sum(gains) / len(gains)
        if mean_gain < settings.min_refine_gain:
            lines += [f"**warp-refine adds {mean_gain:+.1f} points over warp-inpaint on average**: the refiner "
                      "does not help these drives; train it on cycles of drives like them "
                      "(`autolabel train-refiner`) or label with warp-inpaint.", ""]
    m = report.methods[method]
    lines += ["## Numbers", "",
              f"- drives: **{len(rows)}** (labelled now {counts.get('labelled', 0)}, up to date "
              f"{counts.get('skipped', 0)}, failed {len(failures)})",
              f"- {method}: true mIoU **{_fmt(m.miou_mean)}** on drives with ground truth, estimated "
              f"**{_fmt(m.estimated_miou_mean)}** over all drives (mean over distances 1..{report.max_distance})"]
    if m.estimated_miou_mean is None:
        why = next((s.estimate_basis for s in m.sequences if s.estimate_basis), None)
        if why:
            lines.append(f"  - why no estimate: {why}")
    if method == "warp-refine" and "warp-inpaint" in report.methods:
        w = report.methods["warp-inpaint"]
        lines.append(f"- warp-inpaint: true {_fmt(w.miou_mean)}, estimated {_fmt(w.estimated_miou_mean)}")
    lines.append(f"- overlays: `{exported}`" if exported else "- overlays: not exported (set export_dir)")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def headline(report: EvaluationReport, method: str, failures: dict[str, str], rows: list[dict[str, Any]]) -> str:
    """One line for the parent run's log."""
    m = report.methods[method]
    worst = next((r for r in rows if r["mIoU"] is not None), None)
    worst_text = f"; worst {worst['drive']} {worst['mIoU']:.1f} ({worst['basis']})" if worst else ""
    return (f"{method}: {count(len(rows), 'drive')}, true mIoU {_fmt(m.miou_mean)}, "
            f"estimated {_fmt(m.estimated_miou_mean)}, "
            f"failed {len(failures)}{worst_text}")


# --- Prefect I/O --------------------------------------------------------------------------------------


def _latest_table(key: str) -> list[dict[str, Any]]:
    """Rows of the newest table artifact under ``key`` (empty when there is none)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    if not found:
        return []
    data = found[0].data
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError:
            return []
    return data if isinstance(data, list) else []


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _figures(store: SequenceStore, report: EvaluationReport, method: str, rows: list[dict[str, Any]],
             folder: Path) -> dict[str, Path]:
    from autolabel.tasks.plots import plot_miou_by_distance, plot_per_class_iou, plot_worst_frame

    title = Path(report.store).name
    figures = {"miou-by-distance": plot_miou_by_distance(report, folder / "miou_by_distance.png", dpi=80),
               "per-class-iou": plot_per_class_iou(report, folder / "per_class_iou.png", dpi=80)}
    worst = next((r for r in rows if r["mIoU"] is not None), None)
    row = next((s for s in report.methods[method].sequences if worst and s.sequence == worst["drive"]), None)
    if row is not None and row.worst_frames:
        t, estimated, right = row.worst_frames[0]
        figures["worst-frame"] = plot_worst_frame(store.sequence(row.sequence), method, t,
                                                  folder / "worst_frame.png",
                                                  f"{title} / {row.sequence}: worst frame ({method})")
    return figures


def publish(store: str, report: EvaluationReport, method: str, failures: dict[str, str], exported: str | None,
            counts: dict[str, int], checkpoints: dict[str, str | None], name: str | None = None,
            settings: DashboardSettings | None = None) -> dict[str, Any]:
    """Create every artifact of the module docstring; returns their keys, the rows and the headline."""
    from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
    from prefect.settings import PREFECT_UI_URL

    settings = settings or DashboardSettings()
    name = name or run_name(store)
    slug = store_slug(store)
    keys = {k: f"{slug}-{k}" for k in ("drives", "history", "miou-by-distance", "per-class-iou", "summary")}
    st = SequenceStore.open(store)
    previous = {r["drive"]: r["mIoU"] for r in _latest_table(keys["drives"])
                if isinstance(r, dict) and isinstance(r.get("mIoU"), (int, float))}
    ui = PREFECT_UI_URL.value()
    stages = {r.sequence: st.sequence(r.sequence).stages for r in report.methods[method].sequences}
    rows = drive_rows(report, method, stages, previous, settings, f"{ui.rstrip('/')}/runs/flow-run/" if ui else None)
    create_table_artifact(key=keys["drives"], table=rows,
                          description=f"{method}: drives worst first; mIoU is the true value where a drive has "
                                      f"ground truth, else the estimate (basis); {store}")
    history = [history_row(report, method, name, {**counts, "failed": len(failures)}, checkpoints)]
    history += [r for r in _latest_table(keys["history"]) if isinstance(r, dict)][: settings.history_rows - 1]
    create_table_artifact(key=keys["history"], table=history, description=f"one row per run, newest first, {store}")
    methods = report.methods
    create_table_artifact(
        key=keys["miou-by-distance"],
        table=[{"method": n, **{f"d={d}": _r(v) for d, v in m.miou_by_distance.items()}, "mean": _r(m.miou_mean),
                "estimated mean": _r(m.estimated_miou_mean)} for n, m in methods.items()],
        description=f"mIoU (%) by propagation distance, pooled over the drives with ground truth, {store}")
    classes = list(next(iter(methods.values())).per_class_iou) if methods else []
    create_table_artifact(
        key=keys["per-class-iou"],
        table=[{"class": c, **{n: _r(m.per_class_iou[c]) for n, m in methods.items()}} for c in classes],
        description=f"per-class IoU (%), distances pooled; blank: class absent from ground truth and labels, {store}")
    create_markdown_artifact(key=keys["summary"], description=f"autolabel summary, {store}",
                             markdown=summary_markdown(store, name, rows, report, method, failures, counts, settings,
                                                       exported))
    if settings.figures and methods:
        with tempfile.TemporaryDirectory() as tmp:
            for fig, path in _figures(st, report, method, rows, Path(tmp)).items():
                keys[f"figure-{fig}"] = f"{slug}-figure-{fig}"
                create_image_artifact(image_url=_data_url(path), key=keys[f"figure-{fig}"],
                                      description=f"{fig.replace('-', ' ')}, {store}")
    return {"keys": keys, "rows": rows, "headline": headline(report, method, failures, rows)}
