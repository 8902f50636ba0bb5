"""How long work reports its progress, in every layer: a rich bar in the CLI, quarter lines in a
log, a Prefect artifact in the flows (the implementations live with those)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Progress of one piece of work of one sequence (a stage, a check)."""

    def start(self, seq_id: str, title: str, total: int) -> None: ...
    def advance(self) -> None: ...


class QuietProgress:
    """Progress that shows nothing."""

    def start(self, seq_id: str, title: str, total: int) -> None:
        pass

    def advance(self) -> None:
        pass
