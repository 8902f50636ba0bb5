"""Ingest: write a reader's sequences into a store, each fully or not at all.

Each sequence is written by its own :class:`~storage.store.SequenceWriter`. A sequence that fails
(corrupt image, size mismatch, label value outside the class set, empty...) is removed from the
store and reported; the others still complete. Complete sequences already in the store are
skipped, so re-running an interrupted ingest finishes exactly what is missing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.ids import check_unique_ids
from autolabel.storage.readers.base import DatasetSource, SequenceSource
from autolabel.storage.store import SequenceStore, StoreLayout
from pydantic import BaseModel, Field

from autolabel.errors import (
    AutolabelError,
    EmptySequenceError,
    IdCollisionError,
    InputDataError,
    InvalidSequenceIdError,
    describe_os_error,
    storage_refuses_writes,
)


class IngestOptions(BaseModel):
    """Settings of one ingest run."""

    annotation: AnnotationPolicy = AnnotationPolicy()
    sequences: list[str] | None = Field(None, description="ingest only these sequence ids")
    overwrite: bool = Field(False, description="rewrite sequences that are already complete")
    replace_changed: bool = Field(False, description="rewrite complete sequences whose source files changed")
    layout: StoreLayout = StoreLayout()
    prefetch: int = Field(4, ge=1, description="frames decoded ahead in background threads")


@dataclass
class SequenceOutcome:
    """What happened to one sequence."""

    id: str
    status: Literal["ingested", "skipped", "failed"]
    frames: int = 0
    annotated: int = 0
    ground_truth: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class IngestReport:
    """All outcomes of one ingest run, in order."""

    store: str
    outcomes: list[SequenceOutcome] = field(default_factory=list)

    def by_status(self, status: str) -> list[SequenceOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def failed(self) -> list[SequenceOutcome]:
        return self.by_status("failed")

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def frames_written(self) -> int:
        return sum(o.frames for o in self.by_status("ingested"))


class IngestProgress(Protocol):
    """Receives progress while ingest runs (a rich bar in the CLI, artifacts in Prefect)."""

    def sequence_started(self, seq_id: str, expected_frames: int) -> None: ...

    def frame_written(self, seq_id: str) -> None: ...

    def sequence_finished(self, outcome: SequenceOutcome) -> None: ...


class NoProgress:
    """An IngestProgress that reports nothing."""

    def sequence_started(self, seq_id: str, expected_frames: int) -> None:
        pass

    def frame_written(self, seq_id: str) -> None:
        pass

    def sequence_finished(self, outcome: SequenceOutcome) -> None:
        pass


def ingest_sequence(
    source: SequenceSource, store: SequenceStore, options: IngestOptions, progress: IngestProgress
) -> SequenceOutcome:
    """Write one sequence; on any error the partial sequence is deleted and the error re-raised."""
    start = time.perf_counter()
    if source.problem:
        raise InputDataError(source.problem)
    progress.sequence_started(source.id, len(source))
    with store.new_sequence(source.id, expected_frames=len(source), source=source.source,
                            fps=source.fps, layout=options.layout, source_fingerprint=source.fingerprint()) as writer:
        for item in source.iter_items(prefetch=options.prefetch):
            writer.write(item.name, item.rgb, item.label, origin=item.origin)
            progress.frame_written(source.id)
        if not writer.names:
            raise EmptySequenceError(f"{source.source}: sequence {source.id!r} has no frames")
        annotated = options.annotation.select(np.asarray(writer.has_gt, dtype=bool))
        seq = writer.finish(annotated)
    return SequenceOutcome(
        id=source.id, status="ingested", frames=seq.num_frames, annotated=int(seq.annotated.sum()),
        ground_truth=int(seq.has_gt.sum()), seconds=time.perf_counter() - start,
    )


def _changed(store: SequenceStore, source: SequenceSource, options: IngestOptions) -> bool:
    """True when ``replace_changed`` is on and the stored fingerprint differs from the source's."""
    if not options.replace_changed:
        return False
    stored = store.sequence(source.id).source_fingerprint
    current = source.fingerprint()
    return stored is not None and current is not None and stored != current


def ingest(
    dataset: DatasetSource,
    store_url: str,
    options: IngestOptions | None = None,
    progress: IngestProgress | None = None,
) -> IngestReport:
    """Ingest the selected sequences of ``dataset`` into the store at ``store_url``.

    The store is created when missing (with the dataset's class set); an existing store must hold
    the same class set. Never raises for one bad sequence: see the report's ``failed`` list.
    """
    options = options or IngestOptions()
    progress = progress or NoProgress()
    store = SequenceStore.create(store_url, dataset.classes)
    report = IngestReport(store=str(store_url))
    complete = set(store.sequence_ids())
    collisions = check_unique_ids([(s.id, s.source) for s in dataset.sequences])
    for source in dataset.select(options.sequences):
        if source.id in collisions:
            outcome = SequenceOutcome(id=source.id, status="failed",
                                      error=str(IdCollisionError(collisions[source.id])))
        elif source.id in complete and not options.overwrite and not _changed(store, source, options):
            outcome = SequenceOutcome(id=source.id, status="skipped")
        else:
            try:
                outcome = ingest_sequence(source, store, options, progress)
            except InvalidSequenceIdError as exc:
                outcome = SequenceOutcome(id=source.id, status="failed", error=f"{source.source}: {exc}")
            except AutolabelError as exc:
                outcome = SequenceOutcome(id=source.id, status="failed", error=str(exc))
            except OSError as exc:
                error = (f"cannot write to the store: {describe_os_error(exc)}" if storage_refuses_writes(exc)
                         else f"{source.source}: {type(exc).__name__}: {exc}")  # a source file it could not read
                outcome = SequenceOutcome(id=source.id, status="failed", error=error)
            except (ValueError, RuntimeError) as exc:  # unexpected decode failure
                outcome = SequenceOutcome(id=source.id, status="failed",
                                          error=f"{source.source}: {type(exc).__name__}: {exc}")
        report.outcomes.append(outcome)
        progress.sequence_finished(outcome)
    return report
