"""Flow ``label-segment``: one segment job of a long drive (``autolabel.tasks.segments``) on the work pool.

The parent flow plans a long drive's segments and submits one run of the ``label-segment/gpu``
deployment per segment and phase (prepare: flow and teacher; propagate: every method; evaluate:
the segment's frames) and, for each method's quality estimate, up to one per segment (each a
part of the drive's probes), so all free workers share one drive; then the drive's own
``label-sequence`` run finishes it.
"""

from __future__ import annotations

from typing import Any

from autolabel.flows.run_requests import confine_paths
from autolabel.runtime import configure_process
from autolabel.tasks.segments import SegmentJob
from autolabel.tasks.stage_tasks import segment_task
from prefect import flow, get_run_logger
from prefect.runtime import flow_run


def _segment_run_name() -> str:
    job = flow_run.parameters.get("job") or {}
    name = job.name if isinstance(job, SegmentJob) else SegmentJob.model_validate(job).name if job else "segment"
    return name


@flow(name="label-segment", flow_run_name=_segment_run_name, log_prints=False, persist_result=True)
def label_segment_flow(job: SegmentJob) -> dict[str, Any]:
    """Write the frames one segment owns for the stages of one phase; the last segment publishes each stage."""
    configure_process()  # malloc arenas, $AUTOLABEL_THREADS
    confine_paths(job.store, None, None)
    result = segment_task.with_options(name=job.phase)(job)
    done = [s["stage"] for s in result["stages"] if s["computed"]]
    get_run_logger().info("%s: wrote %s", job.name, done or "nothing (already written)")
    return result
