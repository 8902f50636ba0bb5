"""Flows ``autolabel`` and ``relabel-new-drives``: ingest an inbox, label every sequence, publish the dashboard.

Fan-out: with ``label_deployment`` set (``label-sequence/gpu``) each sequence becomes a run of that
deployment (``run_deployment``, idempotency key = content hash + settings digest), so any free
worker of the pool takes it; the parent waits, re-submits a run that crashed (a lost worker,
marked Crashed by the zombie automation of ``deploy/``), and reports runs that failed. Without it
(``autolabel run``, the demo) the same ``label-sequence`` flow runs in this process, sequence by
sequence. Either way one failing sequence never stops the others.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autolabel.flows.dashboard import publish, run_name
from autolabel.flows.label_sequence import label_sequence_flow
from autolabel.flows.run_requests import AutolabelRequest
from autolabel.storage.ids import select_ids
from autolabel.storage.readers import read_dataset
from autolabel.storage.store import SequenceStore
from autolabel.tasks.evaluate import evaluate_store
from autolabel.tasks.checkpoints import checkpoint_sha256, teacher_sha256
from autolabel.tasks.pipeline import check_checkpoints, stale_reason
from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_run
from prefect.states import Crashed, StateType

TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


def _child_parameters(request: AutolabelRequest, seq_id: str, drives: set[str]) -> dict[str, Any]:
    source = request.source(seq_id, drives)
    return {"store": request.store, "seq_id": seq_id, "settings": request.label.model_dump(mode="json"),
            "source": source.model_dump(mode="json") if source is not None else None}


def _run_in_process(request: AutolabelRequest, ids: list[str], drives: set[str],
                    progress_id: Any) -> tuple[dict[str, str], dict[str, str]]:
    """label-sequence as subflows here; returns (worker per sequence, failures)."""
    workers: dict[str, str] = {}
    failures: dict[str, str] = {}
    for i, seq_id in enumerate(ids):
        state = label_sequence_flow(request.store, seq_id, request.label, request.source(seq_id, drives),
                                    return_state=True)
        if state.is_completed():
            workers[seq_id] = state.result()["worker"]
        else:
            failures[seq_id] = _state_error(state)
        update_progress_artifact(progress_id, progress=100.0 * (i + 1) / max(len(ids), 1))
    return workers, failures


def _state_error(state: Any) -> str:
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # noqa: BLE001 - result unavailable (another machine's storage)
        exc = err
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    return f"{state.type.value}: {state.message or ''}".strip()


def heartbeat_seconds() -> float:
    """Seconds between flow-run heartbeats (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, Prefect's default 180)."""
    return float(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or os.environ.get(
        "PREFECT_RUNNER_HEARTBEAT_FREQUENCY") or 180)


def _silent_for(client: Any, fr: Any) -> float:
    """Seconds since a running flow run's last heartbeat event (or its start, before the first one)."""
    last = fr.start_time
    response = client.request("POST", "/events/filter", json={
        "filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                   "any_resource": {"id": [f"prefect.flow-run.{fr.id}"]},
                   "occurred": {"since": (fr.start_time or fr.created).isoformat()}},
        "limit": 1})
    events = response.json().get("events", []) if response.status_code == 200 else []
    if events:
        last = datetime.fromisoformat(events[0]["occurred"].replace("Z", "+00:00"))
    if last is None:
        return 0.0
    return (datetime.now(timezone.utc) - last).total_seconds()


def _fan_out(request: AutolabelRequest, ids: list[str], drives: set[str], fingerprints: dict[str, str | None],
             progress_id: Any) -> tuple[dict[str, str], dict[str, str]]:
    """One deployment run per sequence; wait for all, re-submitting crashed ones."""
    logger = get_run_logger()
    assert request.label_deployment is not None
    digest = request.label.digest()
    started = time.time()
    parent = str(current_run.id or "local")[:8]

    store = SequenceStore.open(request.store)
    known = set(store.sequence_ids())

    def submit(seq_id: str, attempt: str) -> Any:
        # content: the inbox files' fingerprint (known before and after ingest), else the stored hash
        content = fingerprints.get(seq_id) or (store.sequence(seq_id).content_hash if seq_id in known else "new")
        key = f"{request.store}:{seq_id}:{content}:{digest}{attempt}"
        return run_deployment(request.label_deployment, timeout=0, idempotency_key=key, as_subflow=True,
                              parameters=_child_parameters(request, seq_id, drives))

    runs: dict[str, Any] = {seq_id: submit(seq_id, "") for seq_id in ids}
    resubmitted: dict[str, int] = {}
    # a run made by an earlier parent (same key) that did not complete is tried again, once
    for seq_id, run in list(runs.items()):
        if run.created and run.created.timestamp() < started - 1 and run.state and run.state.type in TERMINAL \
                and run.state.type != StateType.COMPLETED:
            runs[seq_id] = submit(seq_id, f"-rerun-{parent}")
    logger.info("submitted %d sequences to %s", len(runs), request.label_deployment)
    done: dict[str, Any] = {}
    silence = request.watchdog_seconds or 2.5 * heartbeat_seconds()
    with get_client(sync_client=True) as client:
        while len(done) < len(runs):
            pending = {r.id: s for s, r in runs.items() if s not in done}
            for fr in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending)))):
                seq_id = pending[fr.id]
                kind = fr.state.type if fr.state else None
                if kind == StateType.RUNNING and _silent_for(client, fr) > silence:
                    # its worker died (before its first heartbeat, or the zombie automation is missing)
                    message = f"no heartbeat for more than {silence:.0f} s: worker lost (autolabel watchdog)"
                    client.set_flow_run_state(fr.id, Crashed(message=message), force=True)
                    logger.warning("%s: run %s %s", seq_id, fr.name, message)
                    continue
                if kind in (StateType.CRASHED, StateType.CANCELLED) and resubmitted.get(seq_id, 0) < request.resubmit_crashed:
                    resubmitted[seq_id] = resubmitted.get(seq_id, 0) + 1
                    logger.warning("%s: run %s %s (%s); re-submitting (attempt %d)", seq_id, fr.name, kind.value,
                                   fr.state.message, resubmitted[seq_id] + 1)
                    runs[seq_id] = submit(seq_id, f"-{parent}-retry{resubmitted[seq_id]}")
                elif kind in TERMINAL:
                    done[seq_id] = fr
            update_progress_artifact(progress_id, progress=100.0 * len(done) / max(len(runs), 1))
            if len(done) < len(runs):
                time.sleep(request.poll_seconds)
    workers: dict[str, str] = {}
    failures: dict[str, str] = {}
    for seq_id, fr in done.items():
        if fr.state.type == StateType.COMPLETED:
            labelled = SequenceStore.open(request.store).sequence(seq_id).stages.get("labelled", {})
            workers[seq_id] = labelled.get("worker", "?")
        else:
            failures[seq_id] = f"{fr.state.type.value} ({fr.name}): {fr.state.message or ''}".strip()
    return workers, failures


def run_autolabel(request: AutolabelRequest) -> dict[str, Any]:
    """The body of both parent flows (see the module docstring)."""
    logger = get_run_logger()
    request.check_paths()
    failures: dict[str, str] = {}
    drives: set[str] = set()
    fingerprints: dict[str, str | None] = {}
    if request.inbox:
        dataset = read_dataset(request.layout, Path(request.inbox))
        SequenceStore.create(request.store, dataset.classes)  # before the runs write into it
        drives = {s.id for s in dataset.sequences}
        fingerprints = {s.id: s.fingerprint() for s in dataset.sequences}
    store = SequenceStore.open(request.store, mode="r+")
    check_checkpoints(store, request.label)  # a wrong checkpoint fails here, not on every worker
    known = set(store.sequence_ids())
    ids = select_ids(sorted(known | drives), request.sequences, f"store {request.store!r} and its inbox")
    skipped: list[str] = []
    if request.only_stale:
        reasons = {i: stale_reason(store, i, request.label, fingerprints.get(i)) for i in ids}
        skipped = [i for i, r in reasons.items() if r is None]
        ids = [i for i, r in reasons.items() if r is not None]
        for i in ids:
            logger.info("%s: %s", i, reasons[i])
    logger.info("labelling %d sequences (%d up to date)", len(ids), len(skipped))
    progress_id = create_progress_artifact(progress=0.0, description=f"sequences labelled, {request.store}")
    if request.label_deployment and ids:
        workers, label_failures = _fan_out(request, ids, drives, fingerprints, progress_id)
    else:
        workers, label_failures = _run_in_process(request, ids, drives, progress_id)
    update_progress_artifact(progress_id, progress=100.0)
    failures.update(label_failures)
    store = SequenceStore.open(request.store)
    done = [i for i in store.sequence_ids() if i in set(ids) | set(skipped) and i not in failures]
    report = evaluate_store(store, request.label.methods, request.label.max_distance, done)
    exported = request.label.export_dir
    counts = {"labelled": len([i for i in ids if i not in failures]), "skipped": len(skipped)}
    checkpoints = {"teacher": teacher_sha256(request.label.teacher, request.label.teacher_map)
                   if request.label.teacher else None,
                   "refiner": checkpoint_sha256(request.label.refiner) if request.label.refiner else None}
    dashboard = publish(request.store, report, request.label.method, failures, exported, counts, checkpoints,
                        name=current_run.name or None, settings=request.dashboard)
    for seq, err in failures.items():
        logger.error("%s failed: %s", seq, err)
    logger.info("%s", dashboard["headline"])
    return {"labelled": [i for i in ids if i not in failures], "up_to_date": skipped, "failed": failures,
            "workers": workers, "report": report, "artifacts": dashboard["keys"], "headline": dashboard["headline"]}


def _parent_run_name() -> str:
    """``<store>-<UTC date-time>``, from the run's request parameter."""
    request = current_run.parameters.get("request") or {}
    store = request.get("store") if isinstance(request, dict) else getattr(request, "store", None)
    return run_name(store or "autolabel")


@flow(name="autolabel", flow_run_name=_parent_run_name, log_prints=False)
def autolabel_flow(request: AutolabelRequest) -> dict[str, Any]:
    """Ingest what is new in the inbox, label the sequences, publish the dashboard."""
    return run_autolabel(request)


@flow(name="relabel-new-drives", flow_run_name=_parent_run_name, log_prints=False)
def relabel_new_drives_flow(request: AutolabelRequest) -> dict[str, Any]:
    """Nightly: like ``autolabel`` but only drives that are new, changed or labelled with other checkpoints."""
    return run_autolabel(request.model_copy(update={"only_stale": True}))
