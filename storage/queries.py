"""Read-only questions about a store, answered from its metadata (no frame is read)."""

from __future__ import annotations

from typing import Any

from autolabel.storage.store import SequenceStore


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
