"""Names of pipeline stages and of the arrays they write inside a sequence group.

Every stage writes all its chunks first and marks itself done last
(:meth:`storage.store.SequenceStore.mark_stage_done`), recording the settings that produced it.
"""

from __future__ import annotations

from collections.abc import Iterable

INGEST = "ingest"
TEACHER = "teacher"
KEYFRAMES = "keyframes"  # annotations added after ingest (a reviewer's corrections): keyframes/{frames,labels}
GROUND_TRUTH = "gt"


def flow_stage(name: str) -> str:
    """Stage of one flow backend's output, e.g. ``flow/dis-medium``."""
    return f"flow/{name}"


def flow_array_names(name: str) -> tuple[str, str]:
    """Forward (t -> t+1) and backward (t+1 -> t) flow arrays of a backend.

    Both are float16 (T - 1, 2, H, W): entry t belongs to the pair (t, t+1); forward flow lives on
    frame t's pixels, backward flow on frame t+1's pixels.
    """
    return f"flow/{name}/fw", f"flow/{name}/bw"


TEACHER_LABELS = "teacher/labels"          # uint8 (T, H, W) argmax class
TEACHER_CONFIDENCE = "teacher/confidence"  # uint8 (T, H, W) max probability x 255


DISTANCE_DTYPE = "int8"  # a frame's distance to its keyframe (at most MAX_DISTANCE); -1 where not reached


def results_stage(method: str) -> str:
    """Stage under which a propagation method's results are marked done."""
    return f"results/{method}"


def labelled_methods(stages: Iterable[str]) -> list[str]:
    """The methods whose results are finished among ``stages`` (a sequence's stage names), sorted."""
    prefix = results_stage("")
    return sorted(s[len(prefix):] for s in stages if s.startswith(prefix) and "/" not in s[len(prefix):])


def result_array_names(method: str) -> tuple[str, str, str]:
    """labels uint8 (T, H, W), confidence uint8 (T, H, W), distance int8 (T,) of a method."""
    return f"results/{method}/labels", f"results/{method}/confidence", f"results/{method}/distance"


def evaluation_stage(method: str) -> str:
    """Stage under which the evaluate stage stores a method's confusion matrices for a sequence."""
    return f"evaluation/{method}"


LABELLED = "labelled"  # marked by the pipeline when every stage of a request is done


def estimate_stage(method: str) -> str:
    """Stage holding a method's quality calibration (from cycles) for a sequence; no arrays."""
    return f"estimate/{method}"
