"""Fault injection: concurrent runs, kills at random points, replacements with bad sources.

Every case ends in a store that equals the one a single clean run makes (stage arrays hashed,
mIoU compared), and ``autolabel verify`` finds nothing wrong. The README's "Store safety"
matrix lists these cases.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from autolabel.models.teacher import Teacher
from autolabel.models.teacher_training import TeacherTrainConfig, train_teacher
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_apollo_layout, write_synthetic_store
from autolabel.storage.training_data import AnnotatedFrames

from tests.conftest import run_cli
from tests.faults import (
    cli_env,
    copy_store,
    kill_after,
    kill_at_progress,
    label_args,
    run_concurrently,
    signal_at_progress,
    snapshot,
    start_cli,
    tagged_processes,
)

DRIVE = SyntheticConfig(width=80, height=64, frames=20, seed=5)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A pristine 2-drive store, a tiny teacher, and clean-run snapshots made on demand."""
    root = tmp_path_factory.mktemp("faults")
    store = str(root / "base.zarr")
    write_synthetic_store(store, drive_configs(2, DRIVE), AnnotationPolicy(mode="window", n=21))
    st = SequenceStore.open(store)
    teacher = Teacher.create("unet-tiny", st.classes.names, [list(c) for c in st.classes.palette])
    train_teacher(teacher, AnnotatedFrames([st]), TeacherTrainConfig(arch="unet-tiny", max_steps=3, batch_size=2,
                                                                      crop=64))
    teacher.save(root / "teacher.pt")
    return {"root": root, "store": store, "teacher": root / "teacher.pt", "clean": {}}


def fresh(base: dict[str, Any], tmp_path: Path, name: str = "s.zarr") -> str:
    return copy_store(base["store"], tmp_path / name)


def clean(base: dict[str, Any], methods: tuple[str, ...]) -> dict[str, Any]:
    """The snapshot after labelling a pristine copy with ``methods``, one run after the other."""
    key = tuple(sorted(methods))
    if key not in base["clean"]:
        store = copy_store(base["store"], base["root"] / f"clean-{'-'.join(key)}.zarr")
        for method in key:
            done = run_cli(*label_args(store, method, base["teacher"]))
            assert done.returncode == 0, done.stderr
        base["clean"][key] = snapshot(store)
    return base["clean"][key]


def assert_verified(store: str) -> None:
    done = run_cli("verify", store)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr


CONCURRENT = {  # two and four runs; same and different methods; flow missing and present
    "2 different methods, flow missing": ["motion-only", "warp-inpaint"],
    "2 same method, flow present": ["warp-inpaint", "warp-inpaint"],
    "4 mixed, flow missing": ["motion-only", "warp-inpaint", "motion-only", "warp-inpaint"],
}


def _concurrent_case(base: dict[str, Any], tmp_path: Path, case: str, loop: int, verify: bool = True) -> None:
    methods = CONCURRENT[case]
    store = fresh(base, tmp_path, f"run{loop}.zarr")
    if "flow present" in case:
        assert run_cli("flow", store, "--flow", "dis-fast").returncode == 0
    results = run_concurrently([label_args(store, m, base["teacher"]) for m in methods])
    for code, err in results:
        assert code == 0, err
        assert "Traceback" not in err
    assert snapshot(store) == clean(base, tuple(set(methods))), f"{case}, loop {loop}"
    if verify:
        assert_verified(store)


CONCURRENT_LOOPS = 3  # each loop races the runs anew (5 took 47 s per case on 2 cores; the budget is 15 min)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CONCURRENT))
def test_concurrent_label_runs_equal_a_clean_run_every_time(base: dict[str, Any], tmp_path: Path, case: str) -> None:
    for loop in range(CONCURRENT_LOOPS):
        _concurrent_case(base, tmp_path, case, loop, verify=loop == CONCURRENT_LOOPS - 1)


KILL_POINTS = {  # progress lines of each stage of `label --method warp-inpaint`
    "flow": r"synth-000\d: flow dis-fast:",
    "teacher": r"synth-000\d: teacher:",
    "propagate": r"synth-000\d: warp-inpaint:",
    "evaluate": r"synth-000\d: evaluate:",
}


def _kill_and_rerun(base: dict[str, Any], tmp_path: Path, stage: str, rng: random.Random, loop: int,
                    verify: bool = True) -> None:
    store = fresh(base, tmp_path, f"kill-{stage}-{loop}.zarr")
    args = label_args(store, "warp-inpaint", base["teacher"])
    kill_at_progress(args, KILL_POINTS[stage], rng.randrange(0, 6))
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert snapshot(store) == clean(base, ("warp-inpaint",)), f"killed in {stage}, loop {loop}"
    if verify:
        assert_verified(store)


@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_sigkill_in_each_stage_then_rerun_equals_a_clean_run(base: dict[str, Any], tmp_path: Path, stage: str) -> None:
    _kill_and_rerun(base, tmp_path, stage, random.Random(stage), 0)


@pytest.mark.parametrize(("sig", "code", "said"), [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                                   (signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                   (signal.SIGHUP, 129, "hung up (SIGHUP)")],
                         ids=["ctrl-c", "sigterm", "sighup"])
def test_ctrl_c_says_what_is_kept_and_the_same_command_goes_on(base: dict[str, Any], tmp_path: Path,
                                                               sig: signal.Signals, code: int, said: str) -> None:
    """Ctrl-C (SIGINT), SIGTERM (kill, systemd, a container stopping) or SIGHUP (the SSH session
    gone) in the teacher stage: a line saying what was kept; the stage cut short left no version
    behind; the same command then ends in the clean run's store. SIGTERM and SIGHUP used to end the
    process on the spot."""
    store = fresh(base, tmp_path, "ctrl-c.zarr")
    args = label_args(store, "warp-inpaint", base["teacher"])
    sent, exit_code, err = signal_at_progress(args, KILL_POINTS["teacher"], 0, sig)
    assert sent and exit_code == code, err
    assert f"{said}: stages (and segments of long drives) finished before are kept" in err.replace("\n", " ") and \
        "Traceback" not in err, err
    st = SequenceStore.open(store)
    for seq_id in st.sequence_ids():  # the teacher stage's unfinished version was discarded
        seq = st.sequence(seq_id)
        assert not seq.stage_done("teacher") and "teacher" not in seq.stages
        assert "teacher" not in seq.group or not list(seq.group["teacher"].group_keys()), seq_id
    assert_verified(store)
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert snapshot(store) == clean(base, ("warp-inpaint",))


def test_ctrl_c_in_ingest_keeps_the_sequences_before_and_the_same_command_ingests_the_rest(tmp_path: Path) -> None:
    inbox, store = tmp_path / "inbox", str(tmp_path / "s.zarr")
    write_apollo_layout(inbox, drive_configs(4, SyntheticConfig(width=320, height=240, frames=24, seed=2)))
    args = ["ingest", "apollo", str(inbox), "--store", store, "--window", "21"]
    sent, code, err = signal_at_progress(args, r"^ingest road\d+_Record001_Camera5: \d+/96", 2, signal.SIGINT)
    assert sent and code == 130, err  # at the 50 % line: the second sequence or the third
    assert "interrupted (Ctrl-C): sequences ingested before are kept and the one cut short is not in the " \
        "store; the same command ingests the rest" in err.replace("\n", " "), err
    st = SequenceStore.open(store)
    kept = st.sequence_ids()
    assert 1 <= len(kept) <= 3 and st.incomplete_ids() == [], kept
    assert_verified(store)
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert f"ingested {4 - len(kept)} sequence" in done.stdout and f"skipped {len(kept)}," in done.stdout, done.stdout
    assert len(SequenceStore.open(store).sequence_ids()) == 4


def test_ctrl_c_in_export_leaves_only_whole_files_and_the_same_command_writes_them_all(tmp_path: Path) -> None:
    store, out = str(tmp_path / "s.zarr"), tmp_path / "export"
    write_synthetic_store(store, drive_configs(2, SyntheticConfig(width=192, height=144, frames=48, seed=3)),
                          AnnotationPolicy(mode="all"))
    args = ["export", store, "--method", "gt", "--out", str(out), "--format", "folder"]
    sent, code, err = signal_at_progress(args, r"^export gt: \d+/96", 1, signal.SIGINT)
    assert sent and code == 130, err  # at the 25 % line
    assert "every file written so far is whole (a training set's manifest and a CVAT task's zip come last)" in \
        err.replace("\n", " "), err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if ".tmp" in p.name], files  # no temporary left behind
    assert not (out / "manifest.json").exists()  # the manifest never names files that are not there
    pngs = [p for p in files if p.suffix == ".png"]
    assert 0 < len(pngs) < 2 * 96, len(pngs)  # images and index PNGs of the frames before Ctrl-C
    for png in pngs:  # each one whole
        with Image.open(png) as im:
            im.load()
    done = run_cli(*args)
    assert done.returncode == 0 and "exported 96 frames" in done.stdout, done.stdout + done.stderr
    assert len(list(out.rglob("*.png"))) == 2 * 96 and (out / "manifest.json").is_file()


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_equals_a_clean_run(base: dict[str, Any], tmp_path: Path) -> None:
    rng = random.Random(2026)
    for loop in range(1, 3):  # loop 0 is the test above; loop 2 only at a random moment
        for stage in KILL_POINTS if loop == 1 else []:
            _kill_and_rerun(base, tmp_path, stage, rng, loop, verify=False)  # the quick test verifies
        store = fresh(base, tmp_path, f"timed{loop}.zarr")  # and at a random moment, wherever that falls
        args = label_args(store, "warp-inpaint", base["teacher"])
        kill_after(args, rng.uniform(2.5, 9.0))
        assert run_cli(*args).returncode == 0
        assert snapshot(store) == clean(base, ("warp-inpaint",))


def test_sigkill_in_train_teacher_then_the_same_command_goes_on_to_the_same_weights(base: dict[str, Any],
                                                                                  tmp_path: Path) -> None:
    """A killed training used to lose every step; its saved progress (--out's .train-state) now carries
    the same command on, to the weights an uninterrupted run ends with."""
    def args(out: Path) -> list[str]:
        return ["train-teacher", "--store", base["store"], "--out", str(out), "--arch", "unet-tiny", "--max-steps",
                "40", "--batch-size", "2", "--crop", "64", "--state-every", "0"]

    whole = run_cli(*args(tmp_path / "whole.pt"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "t.pt"
    # killed at the 25 % line (10/40), with 30 steps to go: the kill lands before the end
    sent, code, err = signal_at_progress(args(out), r"train loss .*: 10/40", 0, signal.SIGKILL)
    assert sent and code == -signal.SIGKILL, err
    state = tmp_path / "t.pt.train-state"
    assert state.is_file() and not out.exists()
    done = run_cli(*args(out))
    assert done.returncode == 0, done.stderr
    said = done.stdout.replace("\n", " ")
    assert f"going on from the progress a stopped run left in {state}" in said and "of a stopped run)" in said, said
    assert not state.exists()
    a, b = Teacher.load(tmp_path / "whole.pt").net.state_dict(), Teacher.load(out).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_in_run_stops_its_temporary_prefect_server(tmp_path: Path) -> None:
    """`autolabel run` starts a temporary Prefect server; SIGTERM used to end the CLI on the spot and
    leave that server running (a port held, CPU used) for good."""
    store = str(tmp_path / "s.zarr")
    write_synthetic_store(store, drive_configs(3, SyntheticConfig(width=128, height=96, frames=24, seed=5)),
                          AnnotationPolicy(mode="window", n=21))
    tag = f"run-sigterm-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-m", "autolabel.cli", "run", store, "--method", "motion-only",
                             "--flow", "exact", "--no-estimate"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=cli_env({"AUTOLABEL_TEST_TAG": tag}))
    assert proc.stdout is not None
    try:
        started = []
        for line in proc.stdout:  # a drive's run has begun: the server is up and the flows run
            if "Beginning subflow run" in line:
                started = tagged_processes(tag)
                proc.send_signal(signal.SIGTERM)
                break
        out = proc.stdout.read()
        assert proc.wait(timeout=120) == 143, out
        assert len(started) >= 2, started  # the CLI and its server
        assert "terminated (SIGTERM): stages (and segments of long drives) finished before are kept" in \
            out.replace("\n", " "), out
        deadline = time.monotonic() + 15
        while tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tagged_processes(tag) == [], "the temporary Prefect server outlived `autolabel run`"
    finally:
        for pid in tagged_processes(tag):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("pool", ["flow", "synth"])
def test_killed_worker_pool_leaves_no_process(tmp_path: Path, pool: str) -> None:
    """Flow estimation and rendering in worker processes: killing their parent ends them too."""
    tag = f"{pool}-kill-{time.time_ns()}"
    env = {"AUTOLABEL_TEST_TAG": tag, "AUTOLABEL_THREADS": "2"}  # synth: a process per thread
    if pool == "flow":
        store = str(tmp_path / "long.zarr")
        write_synthetic_store(store, drive_configs(1, SyntheticConfig(width=320, height=240, frames=80, seed=2)))
        proc = start_cli("flow", store, "--flow", "farneback", "--workers", "2", env=env)
    else:
        proc = start_cli("synth", str(tmp_path / "big.zarr"), "--sequences", "1", "--frames", "400", "--size",
                         "320x240", env=env)
    deadline = time.monotonic() + 120
    while len(tagged_processes(tag)) < 3 and time.monotonic() < deadline:  # parent + 2 workers
        time.sleep(0.2)
    assert len(tagged_processes(tag)) >= 3, f"the {pool} workers did not start"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    time.sleep(5)
    left = tagged_processes(tag)
    assert left == [], f"processes left after the parent was killed: {left}"


def test_a_corrupt_source_during_replacement_keeps_the_old_sequence_and_results(
        base: dict[str, Any], tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    assert run_cli("synth", str(inbox), "--format", "apollo", "--sequences", "2", "--frames", "12",
                   "--size", "64x48").returncode == 0
    store = str(tmp_path / "s.zarr")
    assert run_cli("ingest", "apollo", str(inbox), "--store", store).returncode == 0
    assert run_cli("label", store, "--method", "motion-only", "--flow", "dis-fast", "--no-estimate").returncode == 0
    before = snapshot(store)
    frame = sorted(p for p in inbox.rglob("*.jpg") if "ColorImage" in str(p))[5]
    frame.write_bytes(frame.read_bytes()[:200])  # truncated: the replacement must fail
    done = run_cli("ingest", "apollo", str(inbox), "--store", store, "--overwrite")
    assert done.returncode == 1 and str(frame.name) in done.stdout + done.stderr, done.stdout + done.stderr
    assert snapshot(store) == before  # the old frames, flow, results and evaluation are all still there
    assert_verified(store)
