"""Wording shared by every layer's messages (CLI lines, errors, dashboard artifacts)."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in the number ``n`` takes: ``count(1, "drive")`` is ``"1 drive"``,
    ``count(3, "drive")`` ``"3 drives"``; ``plural`` where adding an *s* is wrong."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
