"""Read-only questions about a store, answered from its metadata (no frame is read)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from autolabel.errors import StageNotDoneError
from autolabel.storage.stages import labelled_methods, results_stage
from autolabel.storage.store import Sequence, SequenceStore
from autolabel.wording import count


def _label_command(url: str, method: str) -> str:
    return f"`autolabel label {url} --method {method}`"


def require_results(seq: Sequence, method: str) -> None:
    """Raise :class:`StageNotDoneError` unless ``seq`` has finished results of ``method``; the message
    names the sequence, the methods it does have and the command that makes the missing ones."""
    if seq.stage_done(results_stage(method)):
        return
    have = ", ".join(labelled_methods(seq.stages)) or "none yet"
    raise StageNotDoneError(f"sequence {seq.id!r} has no results of {method!r} (methods labelled: {have}); "
                            f"run {_label_command(seq.store.url, method)} first")


def sequences_with_results(store: SequenceStore, methods: Seq[str], ids: Seq[str], action: str) -> list[str]:
    """The sequences among ``ids`` with finished results of any of ``methods``.

    Raises :class:`StageNotDoneError` when there is none (a command would otherwise print an empty
    report, or one failure per sequence); ``action`` says what was asked ("evaluate", "export").
    """
    found = [i for i in ids if any(store.sequence(i).stage_done(results_stage(m)) for m in methods)]
    if ids and not found:
        raise StageNotDoneError(f"nothing to {action}: no selected sequence of store {store.url!r} "
                                f"({count(len(ids), 'sequence')}) has results of {' or '.join(methods)}; "
                                f"run {_label_command(store.url, methods[0])} first")
    return found


def store_summary(url: str) -> dict[str, Any]:
    """A store's classes, sequences (frames, size, annotations, stages, bytes) and totals.

    What ``autolabel info --json`` prints.
    """
    st = SequenceStore.open(url)
    rows = []
    for seq in st.sequences():
        rows.append({
            "id": seq.id, "frames": seq.num_frames, "width": seq.width, "height": seq.height,
            "fps": seq.fps, "annotated": int(seq.annotated.sum()), "ground_truth": int(seq.has_gt.sum()),
            "annotated_frames": [int(t) for t in seq.annotated.nonzero()[0]],
            "stages": sorted(seq.stages), "bytes": st.nbytes(seq.id), "content_hash": seq.content_hash,
            "source": seq.source,
        })
    totals = {k: sum(r[k] for r in rows) for k in ("frames", "annotated", "ground_truth", "bytes")}
    return {
        "store": url, "schema_version": st.root.attrs["schema_version"], "classes": st.classes.names,
        "ignore_index": st.classes.ignore_index, "sequences": rows,
        "totals": {"sequences": len(rows), **totals}, "incomplete": st.incomplete_ids(),
        "bad_groups": st.bad_groups(),
    }
