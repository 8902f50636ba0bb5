"""Dashboard rows, history and summary from an evaluation report (no Prefect server needed)."""

from __future__ import annotations

from autolabel.flows.dashboard import (
    DashboardSettings,
    drive_rows,
    headline,
    history_row,
    run_name,
    store_slug,
    summary_markdown,
)
from autolabel.tasks.evaluate import EvaluationReport, MethodEvaluation, SequenceEvaluation


def _row(seq: str, method: str, miou: float | None, est: float | None) -> SequenceEvaluation:
    return SequenceEvaluation(sequence=seq, method=method, max_distance=10, frames=63, annotated=3,
                              frames_labelled=63, frames_scored=60 if miou is not None else 0,
                              has_gt=miou is not None, miou=miou, estimated_miou=est)


def _report(values: dict[str, dict[str, tuple[float | None, float | None]]]) -> EvaluationReport:
    methods = {}
    for method, rows in values.items():
        seqs = [_row(s, method, m, e) for s, (m, e) in rows.items()]
        methods[method] = MethodEvaluation(method=method, miou_mean=70.0, miou_by_distance={"1": 80.0, "10": 60.0},
                                           per_class_iou={}, frames_scored=60, sequences=seqs, sequences_missing=[],
                                           estimated_miou_mean=68.0, estimated_miou_by_distance={"1": 79.0, "10": 58.0})
    return EvaluationReport(store="/data/Apollo.zarr", max_distance=10, methods=methods)


REPORT = _report({
    "warp-inpaint": {"a": (75.0, 74.0), "b": (None, 50.0), "c": (None, None)},
    "warp-refine": {"a": (78.0, 76.0), "b": (None, 55.5), "c": (None, None)},
})
STAGES = {"a": {"labelled": {"worker": "w1", "finished_at": 0.0, "flow_run": "run-a"},
                "teacher": {"settings": {"checkpoint_sha256": "t" * 64}},
                "results/warp-refine": {"settings": {"refiner_sha256": "r" * 64}}}}


class TestDriveRows:
    def test_worst_first_true_or_estimated_with_gain_change_and_flags(self) -> None:
        rows = drive_rows(REPORT, "warp-refine", STAGES, {"a": 80.0, "b": 55.0}, DashboardSettings(flag_below=60),
                          "http://ui/runs/flow-run/")
        assert [r["drive"] for r in rows] == ["b", "a", "c"]  # no value last
        b, a, c = rows
        assert (b["mIoU"], b["basis"], b["refine gain"], b["change"]) == (55.5, "estimate", 5.5, 0.5)
        assert b["flag"] == "below 60"
        assert (a["mIoU"], a["basis"], a["refine gain"], a["change"]) == (78.0, "ground truth", 3.0, -2.0)
        assert a["flag"] == "" and a["worker"] == "w1" and a["run"] == "http://ui/runs/flow-run/run-a"
        assert a["teacher"] == "t" * 12 and a["refiner"] == "r" * 12 and a["labelled at"] == "1970-01-01 00:00"
        assert c["mIoU"] is None and c["flag"] == "no estimate" and c["run"] == "-"

    def test_regression_is_flagged(self) -> None:
        rows = drive_rows(REPORT, "warp-refine", STAGES, {"a": 85.0}, DashboardSettings())
        assert {r["drive"]: r["flag"] for r in rows}["a"] == "regressed"


class TestSummary:
    def test_failures_first_then_drives_with_actions_then_numbers(self) -> None:
        rows = drive_rows(REPORT, "warp-refine", STAGES, {}, DashboardSettings())
        text = summary_markdown("/data/Apollo.zarr", "apollo-x", rows, REPORT, "warp-refine",
                                {"d": "InputDataError: frame 5 is truncated"}, {"labelled": 2},
                                DashboardSettings(), None)
        lines = text.splitlines()
        assert lines[2] == "## 1 drive failed" and "frame 5 is truncated" in text
        assert text.index("## Drives that need you") < text.index("## Numbers")
        assert "| b | 55.5 | estimate |" in text and "autolabel review" in text

    def test_refine_gain_warning(self) -> None:
        flat = _report({"warp-inpaint": {"a": (75.0, 74.0)}, "warp-refine": {"a": (75.0, 74.0)}})
        rows = drive_rows(flat, "warp-refine", {}, {}, DashboardSettings())
        text = summary_markdown("s", "n", rows, flat, "warp-refine", {}, {}, DashboardSettings(), None)
        assert "warp-refine adds +0.0 points over warp-inpaint" in text


def test_history_row_headline_and_names() -> None:
    row = history_row(REPORT, "warp-refine", "apollo-x", {"labelled": 2, "failed": 1}, {"teacher": "t" * 64})
    assert (row["true mIoU"], row["estimated mIoU"], row["true d=10"], row["est. d=1"]) == (70.0, 68.0, 60.0, 79.0)
    assert row["teacher"] == "t" * 12 and row["refiner"] == "-" and row["failed"] == 1
    rows = drive_rows(REPORT, "warp-refine", {}, {}, DashboardSettings())
    assert headline(REPORT, "warp-refine", {}, rows).endswith("worst b 55.5 (estimate)")
    assert store_slug("/data/Apollo.zarr") == "apollo" and run_name("s3://b/Nightly_Drives.zarr").startswith(
        "nightly-drives-20")
