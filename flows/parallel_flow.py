"""Flow ``estimate-flow``: one long sequence's optical flow, fanned out over frame-pair pieces with dask.

The pieces (whole shards of the flow arrays, so no two writers share one) are mapped over a
prefect-dask ``DaskTaskRunner``: a LocalCluster of CPU worker processes by default, or an existing
Dask cluster when ``$AUTOLABEL_DASK_ADDRESS`` (or the ``address`` argument) names its scheduler.
The stage is marked done only after every piece is written.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from autolabel.models.optical_flow import FlowConfig
from autolabel.storage.stages import flow_stage
from autolabel.storage.store import SequenceStore
from autolabel.tasks.flow_estimation import (
    estimate_flow_piece,
    finish_flow,
    flow_is_current,
    flow_pieces,
)
from autolabel.tasks.pipeline import worker_name
from autolabel.tasks.stage_tasks import retry_on_io
from prefect import flow, task
from prefect.futures import wait

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner


@task(name="flow-piece", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_io)
def flow_piece(store: str, seq_id: str, config: FlowConfig, version: str, start: int, stop: int) -> int:
    """Flow of pairs ``start..stop-1`` into the version being written (runs on a dask worker)."""
    return estimate_flow_piece(SequenceStore.open(store, mode="r+"), seq_id, config, version, start, stop)


def dask_runner(address: str | None = None, workers: int | None = None) -> DaskTaskRunner:
    """An existing cluster at ``address`` (or ``$AUTOLABEL_DASK_ADDRESS``), else a LocalCluster of processes.

    prefect-dask (and dask.distributed) load here, not at import: every label-sequence run imports
    this module, and only long sequences need them (~0.45 s of each run's start).
    """
    from prefect_dask import DaskTaskRunner

    address = address or os.environ.get("AUTOLABEL_DASK_ADDRESS") or None
    if address:
        return DaskTaskRunner(address=address)
    n = workers or max(1, min(4, os.cpu_count() or 1))
    return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@flow(name="estimate-flow")
def estimate_flow_parallel(store: str, seq_id: str, config: FlowConfig, piece_pairs: int = 32) -> dict[str, Any]:
    """Compute and store the flow of every pair of ``seq_id``, pieces in parallel (see module docstring)."""
    start = time.perf_counter()
    st = SequenceStore.open(store, mode="r+")
    with st.writing(seq_id, flow_stage(config.stored_name)) as out:  # the lease is held here, pieces write
        if flow_is_current(st.sequence(seq_id), config):
            return {"stage": flow_stage(config.stored_name), "computed": False, "pairs": 0, "pieces": 0,
                    "cached": False, "seconds": round(time.perf_counter() - start, 2), "worker": worker_name()}
        pieces = flow_pieces(out, config, piece_pairs)
        futures = [flow_piece.submit(store, seq_id, config, out.path, a, b) for a, b in pieces]
        wait(futures)
        done = sum(f.result() for f in futures)
        finish_flow(out, config)
    return {"stage": flow_stage(config.stored_name), "computed": True, "pairs": done, "pieces": len(pieces),
            "cached": False, "seconds": round(time.perf_counter() - start, 2), "worker": worker_name()}


def run_parallel_flow(store: str, seq_id: str, config: FlowConfig, address: str | None = None,
                      workers: int | None = None, piece_pairs: int = 32) -> dict[str, Any]:
    """:func:`estimate_flow_parallel` on the chosen dask cluster."""
    runner = dask_runner(address, workers)
    return estimate_flow_parallel.with_options(task_runner=runner)(store, seq_id, config, piece_pairs)
