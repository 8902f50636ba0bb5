"""Wording shared by every layer's messages (CLI lines, errors, dashboard artifacts)."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in the number ``n`` takes: ``count(1, "drive")`` is ``"1 drive"``,
    ``count(3, "drive")`` ``"3 drives"``; ``plural`` where adding an *s* is wrong."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def duration(seconds: float) -> str:
    """A time span for progress lines: ``"42 s"``, ``"7 min"``, ``"2 h 05 min"`` (whole units)."""
    if seconds < 99.5:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 100:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"
