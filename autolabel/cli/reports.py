"""Printed reports of the commands: ingest outcome, store summary, evaluation, a flow run's result."""

from __future__ import annotations

from typing import Any

from autolabel.cli.console import (
    console,
    err_console,
    fmt,
    human_bytes,
    print_failures,
    print_table,
    styled,
    table,
)
from autolabel.wording import count


def print_ingest_report(report: Any, seconds: float) -> None:
    ingested, skipped, failed = (report.by_status(s) for s in ("ingested", "skipped", "failed"))
    frames = report.frames_written
    rate = f", {frames / seconds:.1f} frames/s" if frames and seconds > 0 else ""
    console.print(f"ingested {count(len(ingested), 'sequence')} ({count(frames, 'frame')}{rate}), "
                  f"skipped {len(skipped)}, "
                  f"failed {len(failed)} -> {report.store}", highlight=False)
    if failed:
        out = table(["sequence", "error"], [])
        for o in failed:
            out.add_row(o.id, o.error or "")
        print_table("failures", out)


def stage_lines(stages: list[str]) -> str:
    """Stage names grouped by kind, one kind per line, so a narrow cell folds between names rather
    than inside one: ``evaluation: warp-inpaint, warp-refine`` / ``flow: dis-fast`` / ``ingest``."""
    groups: dict[str, list[str]] = {}
    for name in stages:
        kind, _, variant = name.partition("/")
        groups.setdefault(kind, [])
        if variant:
            groups[kind].append(variant)
    return "\n".join(f"{kind}: {', '.join(v)}" if v else kind for kind, v in groups.items())


def print_store_summary(summary: dict[str, Any], limit: int = 40) -> None:
    """``autolabel info``: one row per sequence (stages listed), totals last."""
    out = table(["sequence", "stages"], ["frames", "size", "annot.", "gt", "bytes"])
    for r in summary["sequences"][:limit]:
        out.add_row(r["id"], stage_lines(r["stages"]), str(r["frames"]), f"{r['width']}x{r['height']}",
                    str(r["annotated"]), str(r["ground_truth"]), human_bytes(r["bytes"]))
    hidden = len(summary["sequences"]) - limit
    if hidden > 0:
        out.add_row(f"... {hidden} more", "", "", "", "", "", "")
    t = summary["totals"]
    out.add_section()
    out.add_row(count(t["sequences"], "sequence"), "", str(t["frames"]), "", str(t["annotated"]),
                str(t["ground_truth"]), human_bytes(t["bytes"]))
    print_table(f"{summary['store']} ({count(len(summary['classes']), 'class', 'classes')})", out,
                "annot.: annotated frames (propagation sources); gt: frames with ground truth")
    for name, why in summary.get("bad_groups", {}).items():
        console.print(styled(("skipped group", "red"), f" {name!r}: {why}"), soft_wrap=True)
    if summary["incomplete"]:
        console.print(styled((count(len(summary['incomplete']), 'incomplete sequence'), "yellow"),
                             " (interrupted ingest; run the same ingest again): "
                             f"{', '.join(summary['incomplete'][:10])}"))


def print_evaluation(report: Any) -> None:
    """mIoU by distance: one row per distance, one column per method (fits 80 columns for 4 methods)."""
    methods = report.methods
    out = table(["distance"], list(methods))
    for d in range(1, report.max_distance + 1):
        out.add_row(f"d={d}", *[fmt(m.miou_by_distance.get(str(d))) for m in methods.values()])
    out.add_section()
    out.add_row("mean", *[fmt(m.miou_mean) for m in methods.values()])
    out.add_row("estimated", *[fmt(m.estimated_miou_mean) for m in methods.values()])
    out.add_row("frames", *[str(m.frames_scored) for m in methods.values()])
    print_table(f"mIoU (%) by propagation distance - {report.store}", out,
                "estimated: mean over distances, estimated without ground truth, all sequences")
    for name, m in methods.items():
        if m.sequences_missing:
            console.print(styled((name, "yellow"), f": no results for {count(len(m.sequences_missing), 'sequence')} "
                                 f"({', '.join(m.sequences_missing[:5])}); run `autolabel label` first"))


def print_sequences(report: Any, method: str, workers: dict[str, str] | None = None) -> None:
    """One row per sequence: mIoU where it has ground truth, else coverage and mean confidence."""
    rows = report.methods[method].sequences
    text = ["sequence", "worker"] if workers else ["sequence"]
    out = table(text, ["frames", "labelled", "mIoU", "est.", "cover", "conf"])
    for r in rows:
        cells = [r.sequence, workers.get(r.sequence, "-")] if workers else [r.sequence]
        out.add_row(*cells, str(r.frames), str(r.frames_labelled), fmt(r.miou) if r.has_gt else "-",
                    fmt(r.estimated_miou), fmt(r.coverage), fmt(r.mean_confidence))
    print_table(f"{method}: per sequence", out, "mIoU (%) against ground truth, - where a drive has none; "
                "est.: mIoU estimated without ground truth; cover: % of pixels labelled; conf: mean "
                "confidence (%)")


def print_flow_result(result: dict[str, Any], method: str) -> None:
    """The end of ``autolabel run`` / ``demo``: per-sequence rows, mIoU by distance, failures."""
    print_sequences(result["report"], method, result["workers"])
    print_evaluation(result["report"])
    print_failures(sorted(result["failed"].items()))
    if result["failed"]:
        err_console.print(f"{count(len(result['failed']), 'sequence')} failed", highlight=False)


def print_verify_report(report: Any) -> None:
    """What ``autolabel verify`` found: one line per problem, grouped by sequence."""
    for where, problems in report.problems.items():
        for problem in problems:
            console.print(styled((where or "store", "red"), f": {problem}"), soft_wrap=True)
    for note in report.notes:
        console.print(styled(("note", "dim"), f": {note}"), soft_wrap=True)
    bad = len(report.problems)
    verdict = ("ok", "green") if report.ok else (f"{bad} with problems", "red")
    console.print(styled(f"{report.store}: {count(report.sequences, 'sequence')} checked, ", verdict))
