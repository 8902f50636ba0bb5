"""Flows ``autolabel`` and ``relabel-new-drives``: ingest an inbox, label every sequence, publish the dashboard.

Fan-out: with ``label_deployment`` set (``label-sequence/gpu``) each sequence becomes a run of that
deployment (``run_deployment``, idempotency key = content hash + settings digest), so any free
worker of the pool takes it. A drive longer than ``label.segment_frames`` is first ingested here
and split into segment jobs, runs of ``segment_deployment`` phase by phase, so that all free
workers share it; its own run then only finishes it (estimate, evaluation, export). The parent
waits, re-submits a run that crashed (a lost worker, marked Crashed by the zombie automation of
``deploy/``), and reports runs that failed. Without it (``autolabel run``, the demo) the same
``label-sequence`` flow runs in this process, sequence by sequence, each drive as one job. Either way one failing sequence never stops the others.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
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
from autolabel.errors import AutolabelError, describe_os_error
from autolabel.tasks.pipeline import IngestStage, check_checkpoints, run_stage, stale_reason
from autolabel.tasks.segments import is_segmented, segment_phases
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
    if isinstance(exc, OSError) and not isinstance(exc, AutolabelError):  # disk full, ulimit -f, read-only
        return describe_os_error(exc)
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


def _await_runs(request: AutolabelRequest, submit: Callable[[str, str], Any], keys: list[str],
                progress: Callable[[int, int], None], what: str) -> dict[str, Any]:
    """One deployment run per key (``submit(key, attempt)``); wait until all are final, re-submitting crashed ones.

    A run an earlier parent made with the same idempotency key that did not complete is tried again
    once. A running run silent for longer than the watchdog allows (its worker died) is marked
    Crashed; a crashed or cancelled run is re-submitted up to ``request.resubmit_crashed`` times.
    Returns the final flow run of every key.
    """
    logger = get_run_logger()
    started = time.time()
    parent = str(current_run.id or "local")[:8]
    runs: dict[str, Any] = {key: submit(key, "") for key in keys}
    resubmitted: dict[str, int] = {}
    for key, run in list(runs.items()):
        if run.created and run.created.timestamp() < started - 1 and run.state and run.state.type in TERMINAL \
                and run.state.type != StateType.COMPLETED:
            runs[key] = submit(key, f"-rerun-{parent}")
    logger.info("submitted %d %s", len(runs), what)
    done: dict[str, Any] = {}
    silence = request.watchdog_seconds or 2.5 * heartbeat_seconds()
    with get_client(sync_client=True) as client:
        while len(done) < len(runs):
            pending = {r.id: k for k, r in runs.items() if k not in done}
            for fr in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending)))):
                key = pending[fr.id]
                kind = fr.state.type if fr.state else None
                if kind == StateType.RUNNING and _silent_for(client, fr) > silence:
                    # its worker died (before its first heartbeat, or the zombie automation is missing)
                    message = f"no heartbeat for more than {silence:.0f} s: worker lost (autolabel watchdog)"
                    client.set_flow_run_state(fr.id, Crashed(message=message), force=True)
                    logger.warning("%s: run %s %s", key, fr.name, message)
                    continue
                if kind in (StateType.CRASHED, StateType.CANCELLED) and resubmitted.get(key, 0) < request.resubmit_crashed:
                    resubmitted[key] = resubmitted.get(key, 0) + 1
                    logger.warning("%s: run %s %s (%s); re-submitting (attempt %d)", key, fr.name, kind.value,
                                   fr.state.message, resubmitted[key] + 1)
                    runs[key] = submit(key, f"-{parent}-retry{resubmitted[key]}")
                elif kind in TERMINAL:
                    done[key] = fr
            progress(len(done), len(runs))
            if len(done) < len(runs):
                time.sleep(request.poll_seconds)
    return done


def _run_failure(fr: Any) -> str | None:
    """None for a completed run, else what happened to it."""
    if fr.state.type == StateType.COMPLETED:
        return None
    return f"{fr.state.type.value} ({fr.name}): {fr.state.message or ''}".strip()


def _label_segments(request: AutolabelRequest, ids: list[str], drives: set[str],
                    lengths: dict[str, int]) -> tuple[list[str], dict[str, str]]:
    """Long drives (``label.segment_frames``): ingest here, then each phase's segment jobs on the pool.

    Returns the drives whose segments are all written (their ``label-sequence`` run finishes them)
    and the failures of the others.
    """
    settings = request.label
    store = SequenceStore.open(request.store, mode="r+")
    long: list[str] = []
    failures: dict[str, str] = {}
    for seq_id in ids:
        source = request.source(seq_id, drives)
        frames = lengths.get(seq_id) if source is not None else store.sequence(seq_id).num_frames
        if frames is None or not is_segmented(frames, settings):
            continue
        try:
            if source is not None:
                run_stage(request.store, seq_id, IngestStage(source=source))
            long.append(seq_id)
        except AutolabelError as exc:
            failures[seq_id] = str(exc)
    if not long:
        return [], failures
    assert request.segment_deployment is not None
    digest = settings.digest()
    phases = {seq_id: segment_phases(request.store, seq_id, settings) for seq_id in long}
    for phase in range(max(len(p) for p in phases.values())):
        jobs = {job.name: job for seq_id, p in phases.items() if seq_id not in failures and phase < len(p)
                for job in p[phase]}

        def submit(key: str, attempt: str) -> Any:
            job = jobs[key]
            return run_deployment(request.segment_deployment, timeout=0, as_subflow=True,
                                  idempotency_key=f"{request.store}:{key}:{job.plan_key}:{digest}{attempt}",
                                  parameters={"job": job.model_dump(mode="json")})

        what = f"segment jobs ({next(iter(jobs.values())).phase}) of {len(long)} long drives"
        for key, fr in _await_runs(request, submit, list(jobs), lambda done, total: None, what).items():
            if (why := _run_failure(fr)) is not None:
                failures.setdefault(jobs[key].seq_id, f"segment {key}: {why}")
    return [s for s in long if s not in failures], failures


def _fan_out(request: AutolabelRequest, ids: list[str], drives: set[str], fingerprints: dict[str, str | None],
             lengths: dict[str, int], progress_id: Any) -> tuple[dict[str, str], dict[str, str]]:
    """One deployment run per sequence (long drives: their segment jobs first); wait for all."""
    assert request.label_deployment is not None
    digest = request.label.digest()
    _, failures = _label_segments(request, ids, drives, lengths)
    store = SequenceStore.open(request.store)
    known = set(store.sequence_ids())

    def submit(seq_id: str, attempt: str) -> Any:
        # content: the inbox files' fingerprint (known before and after ingest), else the stored hash
        content = fingerprints.get(seq_id) or (store.sequence(seq_id).content_hash if seq_id in known else "new")
        key = f"{request.store}:{seq_id}:{content}:{digest}{attempt}"
        return run_deployment(request.label_deployment, timeout=0, idempotency_key=key, as_subflow=True,
                              parameters=_child_parameters(request, seq_id, drives))

    def progress(done: int, total: int) -> None:
        update_progress_artifact(progress_id, progress=100.0 * done / max(total, 1))

    todo = [s for s in ids if s not in failures]
    done = _await_runs(request, submit, todo, progress, f"sequences to {request.label_deployment}")
    workers: dict[str, str] = {}
    for seq_id, fr in done.items():
        if (why := _run_failure(fr)) is None:
            labelled = SequenceStore.open(request.store).sequence(seq_id).stages.get("labelled", {})
            workers[seq_id] = labelled.get("worker", "?")
        else:
            failures[seq_id] = why
    return workers, failures


def run_autolabel(request: AutolabelRequest) -> dict[str, Any]:
    """The body of both parent flows (see the module docstring)."""
    logger = get_run_logger()
    if request.label_deployment:  # the sequence runs resolve paths on their workers, not in this folder
        request = request.with_absolute_paths()
    request.check_paths()
    failures: dict[str, str] = {}
    drives: set[str] = set()
    fingerprints: dict[str, str | None] = {}
    lengths: dict[str, int] = {}
    if request.inbox:
        dataset = read_dataset(request.layout, Path(request.inbox))
        SequenceStore.create(request.store, dataset.classes)  # before the runs write into it
        drives = {s.id for s in dataset.sequences}
        fingerprints = {s.id: s.fingerprint() for s in dataset.sequences}
        lengths = {s.id: len(s) for s in dataset.sequences}
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
        workers, label_failures = _fan_out(request, ids, drives, fingerprints, lengths, progress_id)
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
