"""Flow ``label-sequence``: one sequence through flow-estimation -> teacher -> warp-inpaint -> refine -> evaluate.

Each stage is a task of ``tasks.stage_tasks`` (retries on I/O, store-aware cache keys). Before
each task the flow asks the store whether that stage already holds output made with exactly these
settings; if not, the task runs with ``refresh_cache`` so no stale cache record can replace it.
A killed run therefore resumes from the first unfinished stage, and a re-run of a finished
sequence is served from the cache. The deployment ``label-sequence/gpu`` runs this flow on the
``gpu`` work pool, one run per worker (GPU) at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.flow_estimation import run_parallel_flow
from flows.run_requests import DriveSource, LabelSettings
from models.optical_flow import EXACT
from models.teacher import file_sha256
from storage.export import export_sequence
from storage.store import SequenceStore
from tasks.flow_estimation import flow_is_current
from tasks.propagate import results_are_current
from tasks.stage_tasks import (
    evaluate_sequence,
    flow_estimation,
    ingest_drive,
    refine,
    teacher_inference,
    warp_inpaint,
    worker_name,
)
from tasks.teacher_inference import teacher_is_current


def _run(state: Any) -> dict[str, Any]:
    """A stage task's result, marked ``cached`` when Prefect served it from the cache."""
    result = dict(state.result())
    result["cached"] = state.name == "Cached"
    return result


def _sequence_run_name() -> str:
    params = flow_run.parameters
    return f"{params.get('seq_id', 'sequence')}"


@flow(name="label-sequence", flow_run_name=_sequence_run_name, log_prints=False, persist_result=True)
def label_sequence_flow(store: str, seq_id: str, settings: LabelSettings, max_distance: int = 10,
                        source: DriveSource | None = None) -> dict[str, Any]:
    """Label one sequence with ``settings`` and return its stage results and evaluation rows.

    With ``source`` the drive is first ingested from its inbox when new or changed. Raises (the
    run fails) on bad input, naming the sequence and file; other sequences are unaffected.
    """
    logger = get_run_logger()
    stages: list[dict[str, Any]] = []
    if source is not None:
        stages.append(_run(ingest_drive(source.inbox, source.layout, store, seq_id, source.annotation,
                                        return_state=True)))
    st = SequenceStore.open(store, mode="r+")
    prop = settings.propagation
    needs_flow = any(m != "semantic-only" for m in settings.methods)
    flow_name = settings.flow.stored_name
    if needs_flow and settings.flow.backend != EXACT:
        seq = st.sequence(seq_id)
        fresh = not flow_is_current(seq, settings.flow)
        if fresh and seq.num_frames - 1 >= settings.parallel_flow_pairs:
            stages.append(run_parallel_flow(store, seq_id, settings.flow, settings.dask_address))
        else:
            stages.append(_run(flow_estimation.with_options(refresh_cache=fresh)(
                store, seq_id, settings.flow, return_state=True)))
    if settings.teacher:
        teacher_hash = file_sha256(Path(settings.teacher))
        fresh = not teacher_is_current(st.sequence(seq_id), teacher_hash, settings.adapt_steps)
        stages.append(_run(teacher_inference.with_options(refresh_cache=fresh)(
            store, seq_id, settings.teacher, settings.adapt_steps, prop.device, return_state=True)))
    for method in settings.methods:
        config = prop.model_copy(update={"method": method})
        refiner_hash = file_sha256(Path(settings.refiner)) if method == "warp-refine" and settings.refiner else None
        fresh = not results_are_current(st.sequence(seq_id), config, flow_name if needs_flow else None, refiner_hash)
        if method == "warp-refine":
            assert settings.teacher and settings.refiner  # checked by LabelSettings
            stages.append(_run(refine.with_options(refresh_cache=fresh)(
                store, seq_id, prop, flow_name, settings.teacher, settings.refiner, return_state=True)))
        elif method == "warp-inpaint":
            assert settings.teacher
            stages.append(_run(warp_inpaint.with_options(refresh_cache=fresh)(
                store, seq_id, prop, flow_name, settings.teacher, return_state=True)))
        else:
            raise ValueError(f"label-sequence runs warp-inpaint and warp-refine, not {method!r}; "
                             "use `autolabel label` for the baselines")
    rows = evaluate_sequence(store, seq_id, settings.methods, max_distance)
    exported = None
    if settings.export_dir:
        out = Path(settings.export_dir)
        export_sequence(SequenceStore.open(store).sequence(seq_id), settings.method, out, with_overlay=True)
        exported = str(out / seq_id)
    st.mark_stage_done(seq_id, "labelled", {"worker": worker_name(), "flow_run": str(flow_run.id),
                                            "settings_digest": settings.digest()})
    computed = [s["stage"] for s in stages if s["computed"] and not s["cached"]]
    logger.info("%s: stages computed %s, reused %s", seq_id, computed or "none",
                [s["stage"] for s in stages if s["stage"] not in computed] or "none")
    return {"sequence": seq_id, "worker": worker_name(), "stages": stages, "evaluation": rows,
            "exported": exported, "settings_digest": settings.digest()}
