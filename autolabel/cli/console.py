"""What the command line shows: consoles, progress (bars in a terminal, quarter lines in logs), tables.

Tables fit the terminal, and 80 columns in a pipe or CI log: text cells fold onto more lines,
numbers never wrap and are never cut. Nothing printed is read as rich markup: messages, paths and
ids print as they are (``pip install 'autolabel[onnx]'`` lost its ``[onnx]`` as a style tag);
colour comes from :func:`styled`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

from autolabel.wording import duration

console = Console(markup=False)
err_console = Console(stderr=True, markup=False)


def styled(*parts: str | tuple[str, str]) -> Text:
    """A line of plain text with styled pieces: ``styled(("failed", "red"), f" {seq}: {error}")``."""
    return Text.assemble(*parts)


def fmt(value: float | None, digits: int = 1) -> str:
    """A percentage or other number for a table; ``-`` where undefined."""
    return "-" if value is None else f"{value:.{digits}f}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def table(text: Sequence[str], numbers: Sequence[str]) -> Table:
    """A table whose ``text`` columns (left) fold and whose ``numbers`` columns (right) never wrap."""
    columns = [Column(name, overflow="fold") for name in text]
    columns += [Column(name, justify="right", no_wrap=True, min_width=len(name)) for name in numbers]
    return Table(*columns, padding=(0, 1))


def print_items(head: str, items: Sequence[str]) -> None:
    """``head`` then ``items`` separated by commas, folded onto more lines only between items (a
    number is never parted from its unit); continuation lines are indented by two spaces."""
    lines, line = [], head.rstrip()
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if line.strip() and len(line) + 1 + len(piece) > console.width:
            lines.append(line)
            line = "  " + piece
        else:
            line = f"{line} {piece}" if line else piece
    lines.append(line)
    for text in lines:
        console.print(text, highlight=False, markup=False, soft_wrap=True)


def print_section(title: str) -> None:
    """A rule with ``title`` in it; a title too long for the width goes under a plain rule, folded at
    spaces (rich would cut it: ``... publish the dashboard (flo…``)."""
    if len(title) + 6 <= console.width:
        console.rule(title)
    else:
        console.rule()
        console.print(title, highlight=False, markup=False)


def print_table(title: str, body: Table, note: str | None = None) -> None:
    """``title`` on its own line (it wraps, it is never cut), the table, then an optional note."""
    console.print(title, style="bold", highlight=False, soft_wrap=False)
    console.print(body)
    if note:
        console.print(note, highlight=False, style="dim")


class LogProgress:
    """Progress for logs (no terminal): one line per task at every quarter of the way, at most, with
    the time spent and, between the first and the last line, the time left at the pace so far."""

    def __init__(self, out: Console) -> None:
        self.console = out
        self._tasks: dict[int, dict[str, Any]] = {}

    def add_task(self, description: str, total: float | None = None) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = {"description": description, "total": total, "completed": 0, "reported": -1,
                                "start": time.perf_counter()}
        return task_id

    def update(self, task_id: int, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:
        task = self._tasks[task_id]
        if total is not None:
            task["total"] = total
        if description is not None:
            task["description"] = description
        if completed is not None:
            task["completed"] = completed
        self._report(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self._tasks[task_id]["completed"] += advance
        self._report(self._tasks[task_id])

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def _report(self, task: dict[str, Any]) -> None:
        total = task["total"]
        if not total:
            return
        quarter = int(4 * task["completed"] / total)
        if quarter > task["reported"]:
            task["reported"] = quarter
            elapsed = time.perf_counter() - task["start"]
            share = min(1.0, task["completed"] / total)
            percent = int(100 * share)  # the true share, not the quarter
            # time left, from the pace so far: not on the first line (one item, start-up included) nor the last
            left = ""
            if 0 < quarter < 4 and share < 1:
                remaining = elapsed * (1 - share) / share
                left = f", {'<1 s' if remaining < 0.5 else '~' + duration(remaining)} left"
            self.console.print(f"{task['description']}: {int(task['completed'])}/{int(total)} "
                               f"({percent}%, {duration(elapsed)}{left})", highlight=False)


@contextmanager
def progress_display(transient: bool = False) -> Iterator[Any]:
    """A rich progress display on a terminal, quarter-way log lines otherwise (both on stderr)."""
    if not err_console.is_terminal:
        yield LogProgress(err_console)
        return
    with Progress(
        TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=transient,
    ) as progress:
        yield progress


class StageBar:
    """The pipeline's Progress protocol shown as one bar per (sequence, stage)."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.task: Any = None

    def start(self, seq_id: str, title: str, total: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"{seq_id}: {title}", total=max(total, 1))

    def advance(self) -> None:
        if self.task is not None:
            self.progress.advance(self.task)


class IngestBar:
    """storage.ingest's IngestProgress as one bar over all frames."""

    def __init__(self, progress: Any, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task("ingest", total=total)

    def sequence_started(self, seq_id: str, expected_frames: int) -> None:
        self.progress.update(self.task, description=f"ingest {seq_id}")

    def frame_written(self, seq_id: str) -> None:
        self.progress.advance(self.task)

    def sequence_finished(self, outcome: Any) -> None:
        if outcome.status == "failed":
            err_console.print(styled(("failed", "red"), f" {outcome.id}: {outcome.error}"), soft_wrap=True)
        elif outcome.status == "skipped":
            err_console.print(f"skipped {outcome.id} (already ingested)", style="dim", highlight=False)


def print_failures(failures: Sequence[tuple[str, str]]) -> None:
    for seq_id, error in failures:
        err_console.print(styled(("failed", "red"), f" {seq_id}: {error}"), soft_wrap=True)
