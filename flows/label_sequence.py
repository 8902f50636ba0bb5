"""Flow ``label-sequence``: the per-sequence pipeline of ``autolabel.tasks.pipeline`` as Prefect tasks.

ingest-drive (from the parent's inbox, if new or changed) -> flow-estimation -> teacher-inference
-> refine (writing warp-inpaint's results in the same pass) / warp-inpaint (or any method), each followed
by its quality estimate -> evaluate -> export. Each stage is a task run (retries
on I/O, store-aware cache keys, ``refresh_cache`` whenever the store lacks the stage's output), so
a killed run resumes at the first unfinished stage and a re-run of a finished sequence is served
from the cache. A long drive's flow is computed in pieces on dask (``estimate-flow``). The
deployment ``label-sequence/gpu`` runs this flow on the ``gpu`` work pool, one run per worker.
"""

from __future__ import annotations

from typing import Any

from autolabel.flows.parallel_flow import run_parallel_flow
from autolabel.flows.run_requests import confine_paths
from autolabel.runtime import configure_process
from autolabel.storage.store import SequenceStore
from autolabel.tasks.pipeline import (
    DriveSource,
    FlowStage,
    LabelSettings,
    Stage,
    label_sequence,
)
from autolabel.tasks.stage_tasks import prefect_runner
from prefect import flow, get_run_logger
from prefect.runtime import flow_run


def _sequence_run_name() -> str:
    params = flow_run.parameters
    return f"{params.get('seq_id', 'sequence')}"


def _runner(settings: LabelSettings) -> Any:
    """Stages as tasks; a long sequence's missing flow as the dask ``estimate-flow`` subflow instead."""

    def run(store: str, seq_id: str, stage: Stage) -> dict[str, Any]:
        if isinstance(stage, FlowStage) and stage.flow.backend != "exact":
            st = SequenceStore.open(store)
            if st.sequence(seq_id).num_frames - 1 >= settings.parallel_flow_pairs \
                    and not stage.is_current(st, seq_id):
                return run_parallel_flow(store, seq_id, stage.flow, settings.dask_address)
        return prefect_runner(store, seq_id, stage)

    return run


@flow(name="label-sequence", flow_run_name=_sequence_run_name, log_prints=False, persist_result=True)
def label_sequence_flow(store: str, seq_id: str, settings: LabelSettings,
                        source: DriveSource | None = None) -> dict[str, Any]:
    """Label one sequence with ``settings``; returns its stage results and evaluation rows.

    With ``source`` the drive is first ingested from its inbox when new or changed. Raises (the
    run fails) on bad input, naming the sequence and file; other sequences are unaffected.
    """
    configure_process()  # malloc arenas, $AUTOLABEL_THREADS
    confine_paths(store, source.inbox if source else None, settings.export_dir)
    result = label_sequence(store, seq_id, settings, source, runner=_runner(settings),
                            marker={"flow_run": str(flow_run.id)})
    here = [s for s in result["stages"] if not s["cached"]]
    # a stage writing other outputs in its pass (warp-refine's writes warp-inpaint's, and their estimates)
    computed = [name for s in here
                for name, done in ((s["stage"], s["computed"]), (s.get("also"), s.get("also_computed")),
                                   *((e, True) for e in s.get("estimated", []))) if done]
    reused = [s["stage"] for s in result["stages"] if s["stage"] not in computed]
    get_run_logger().info("%s: stages computed %s, reused %s", seq_id, computed or "none", reused or "none")
    return result
