"""Odd inputs and broken stores: each gets its exit code and a message that says what to do.

The cases of issue 10 ("silently wrong data", "tracebacks instead of errors"); the README's
"Store safety" matrix lists them.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.integrity import verify_store
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store

from tests.conftest import RecordingProgress, classes_file, good_sequence, run_cli
from tests.faults import cli_env

MOTION = ["--method", "motion-only", "--flow", "dis-fast", "--max-distance", "5"]


@pytest.fixture
def store(tmp_path: Path) -> str:
    url = str(tmp_path / "s.zarr")
    write_synthetic_store(url, drive_configs(2, SyntheticConfig(width=64, height=48, frames=8, seed=0)),
                          AnnotationPolicy(mode="keyframe-every", n=4))
    return url


def _array_dir(url: str, seq_id: str, name: str) -> Path:
    seq = SequenceStore.open(url).sequence(seq_id)
    return Path(url) / "sequences" / seq_id / seq.stages["ingest"]["at"] / name


def no_traceback(done: subprocess.CompletedProcess[str]) -> str:
    text = done.stdout + done.stderr
    assert "Traceback" not in text, text
    return " ".join(text.split())


class TestSilentlyWrongData:
    def test_a_16_bit_grey_frame_is_scaled_not_saturated(self, tmp_path: Path) -> None:
        root, labels = tmp_path / "drives", tmp_path / "labels"
        good_sequence(root, labels, "deep", frames=3)
        grey = np.linspace(0, 65535, 12 * 16, dtype=np.uint16).reshape(12, 16)
        cv2.imwrite(str(root / "deep" / "0001.png"), grey)
        url = str(tmp_path / "s.zarr")
        done = run_cli("ingest", "folder", str(root), "--store", url, "--labels", str(labels),
                       "--classes", str(classes_file(tmp_path)))
        assert done.returncode == 0, no_traceback(done)
        frame = SequenceStore.open(url).sequence("deep").frame(1)
        np.testing.assert_array_equal(frame[..., 0], (grey >> 8).astype(np.uint8))
        assert frame.min() == 0 and frame.max() == 255

    def test_labels_that_match_no_frame_are_an_error_unless_allowed(self, tmp_path: Path) -> None:
        root, labels = tmp_path / "drives", tmp_path / "labels"
        good_sequence(root, labels, "a", frames=3)
        (labels / "a" / "0000.png").rename(labels / "a" / "frame-x.png")
        args = ["ingest", "folder", str(root), "--store", str(tmp_path / "s.zarr"), "--labels", str(labels),
                "--classes", str(classes_file(tmp_path))]
        done = run_cli(*args)
        text = no_traceback(done)
        assert done.returncode == 1 and "no label in --labels matched a frame" in text and "frame-x" in text, text
        assert run_cli(*args, "--allow-unlabelled").returncode == 0

    def test_a_missing_chunk_fails_only_its_sequence_and_says_how_to_repair(self, store: str) -> None:
        shutil.rmtree(_array_dir(store, "synth-0000", "frames") / "c" / "3")
        done = run_cli("label", store, *MOTION)
        text = no_traceback(done)
        assert done.returncode == 1 and "synth-0000" in text and "missing chunks" in text, text
        assert "ingest it again" in text
        assert SequenceStore.open(store).sequence("synth-0001").stage_done("results/motion-only")
        verify = run_cli("verify", store)
        assert verify.returncode == 1 and "frames: 1 missing chunks (c/3/0/0/0" in no_traceback(verify)
        # --sequence: only the chosen ones (globs too); a pattern matching nothing is an error
        assert run_cli("verify", store, "--sequence", "synth-0001").returncode == 0
        verify = run_cli("verify", store, "--sequence", "synth-*", "--quick")
        assert verify.returncode == 1 and "2 sequences checked" in no_traceback(verify)
        verify = run_cli("verify", store, "--sequence", "nope")
        assert verify.returncode == 2 and "no sequence ['nope']" in no_traceback(verify)

    def test_a_truncated_chunk_fails_only_its_sequence(self, store: str) -> None:
        chunk = _array_dir(store, "synth-0001", "frames") / "c" / "2" / "0" / "0" / "0"
        chunk.write_bytes(chunk.read_bytes()[:7])
        done = run_cli("label", store, *MOTION)
        text = no_traceback(done)
        assert done.returncode == 1 and "failed synth-0001" in text and "autolabel verify" in text, text
        assert SequenceStore.open(store).sequence("synth-0000").stage_done("results/motion-only")
        verify = run_cli("verify", store)
        assert verify.returncode == 1 and "corrupt" in no_traceback(verify)
        for decode in (True, False):  # verify's progress reaches its total, the damaged read included
            progress = RecordingProgress()
            report = verify_store(store, decode=decode, progress=progress)
            assert [s[0] for s in progress.stages] == ["synth-0000", "synth-0001"]
            assert all(s[2] > 0 and s[3] == s[2] for s in progress.stages), progress.stages
            assert ("synth-0001" in report.problems) == decode

    def test_a_missing_result_chunk_is_recomputed(self, store: str) -> None:
        assert run_cli("label", store, *MOTION).returncode == 0
        seq = SequenceStore.open(store).sequence("synth-0000")
        labels = Path(store) / "sequences" / "synth-0000" / seq.stages["results/motion-only"]["at"] / "labels"
        before = np.asarray(seq.array("results/motion-only/labels")[:])
        shutil.rmtree(labels / "c" / "5")
        done = run_cli("label", store, *MOTION)
        assert done.returncode == 0, no_traceback(done)
        again = SequenceStore.open(store).sequence("synth-0000").array("results/motion-only/labels")[:]
        np.testing.assert_array_equal(again, before)
        assert run_cli("verify", store).returncode == 0


class TestErrorsNotTracebacks:
    @pytest.mark.parametrize(("args", "code", "message"), [
        (["label", "{store}", "--method", "motion-only", "--max-distance", "1000"], 2, "must be 1..127 frames"),
        (["flow", "{store}", "--flow", "bogus", "--workers", "2"], 2, "unknown flow backend 'bogus'"),
        (["label", "{store}", "--method", "motion-only", "--flow", "bogus"], 2, "unknown flow backend 'bogus'"),
    ])
    def test_bad_options_fail_before_work(self, store: str, args: list[str], code: int, message: str) -> None:
        done = run_cli(*[a.format(store=store) for a in args])
        assert done.returncode == code and message in no_traceback(done)
        assert not SequenceStore.open(store).sequence("synth-0000").stage_done("flow/dis-medium")

    def test_cuda_on_a_machine_without_it(self, store: str) -> None:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        for args in (["label", store, *MOTION, "--device", "cuda"],
                     ["train-teacher", "--store", store, "--out", "t.pt", "--device", "cuda"]):
            done = run_cli(*args)
            assert done.returncode == 2 and "CUDA is not available here" in no_traceback(done)

    def test_a_folder_as_the_checkpoint_fails_before_training(self, store: str, tmp_path: Path) -> None:
        """The rename onto the folder used to fail once the training was done, naming a temporary file."""
        for args, what in ((["train-teacher", "--store", store, "--max-steps", "400"], "teacher"),
                           (["train-refiner", "--store", store, "--teacher", "t.pt", "--steps", "400"], "refiner")):
            done = run_cli(*args, "--out", str(tmp_path))
            text = no_traceback(done)
            assert done.returncode == 2 and f"{tmp_path} is a folder: name the {what} checkpoint file to write, " \
                f"e.g. {tmp_path / what}.pt" in text and "train loss" not in text, text

    def test_a_corrupt_root_zarr_json(self, store: str) -> None:
        (Path(store) / "zarr.json").write_text("{not json")
        for command in (["info", store], ["label", store, *MOTION], ["evaluate", store, "--method", "motion-only"], ["verify", store]):
            done = run_cli(*command)
            assert done.returncode == 2 and "corrupt root zarr.json" in no_traceback(done), command

    def test_a_store_path_that_is_a_file(self, tmp_path: Path) -> None:
        path = tmp_path / "notes.txt"
        path.write_text("hello")
        for command in (["info", str(path)], ["label", str(path), *MOTION]):
            done = run_cli(*command)
            assert done.returncode == 2 and "is a file, not a store folder" in no_traceback(done)

    def test_a_bad_group_is_listed_and_skipped(self, store: str) -> None:
        (Path(store) / "sequences" / "synth-0001" / "zarr.json").write_text("{broken")
        stray = Path(store) / "sequences" / "stray group"
        stray.mkdir()
        (stray / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
        info = run_cli("info", store)
        text = no_traceback(info)
        assert info.returncode == 0 and "skipped group 'synth-0001'" in text and "'stray group'" in text, text
        label = run_cli("label", store, *MOTION)
        text = no_traceback(label)
        assert label.returncode == 0 and "labelled 1 sequence (" in text and "skipped group 'stray group'" in text, text
        evaluate = run_cli("evaluate", store, "--method", "motion-only")
        assert evaluate.returncode == 0, no_traceback(evaluate)
        assert run_cli("verify", store).returncode == 1
        assert run_cli("verify", store, "--sequence", "synth-0000").returncode == 0
        verify = run_cli("verify", store, "--sequence", "synth-0001")  # a bad group is chosen by its name too
        assert verify.returncode == 1 and "synth-0001" in no_traceback(verify)

    def test_a_read_only_store(self, store: str) -> None:
        dirs = [Path(root) for root, _, _ in os.walk(store)]
        immutable = os.geteuid() == 0 and shutil.which("chattr") is not None  # root ignores permission bits

        def read_only(on: bool) -> None:
            for d in dirs:
                if immutable:
                    subprocess.run(["chattr", "+i" if on else "-i", str(d)], check=True)
                else:
                    d.chmod(0o555 if on else 0o755)

        try:
            read_only(True)
        except subprocess.CalledProcessError:
            pytest.skip("cannot make a folder read-only here")
        try:
            done = run_cli("label", store, *MOTION)
            text = no_traceback(done)
            assert done.returncode == 1 and "cannot write to the store" in text, text
            assert run_cli("info", store).returncode == 0  # reading still works
        finally:
            read_only(False)

    def test_a_file_size_limit_during_label(self, store: str) -> None:
        text = no_traceback(done := run_cli_with_file_size_limit("label", store, *MOTION))
        assert done.returncode == 1 and "file size limit (ulimit -f)" in text, text
        assert run_cli("verify", store).returncode == 0  # nothing half-written became visible
        assert run_cli("label", store, *MOTION).returncode == 0  # and without the limit it finishes


    def test_a_file_size_limit_during_ingest_blames_the_store_not_the_source(self, tmp_path: Path) -> None:
        src, url = tmp_path / "inbox", str(tmp_path / "s.zarr")
        assert run_cli("synth", str(src), "--sequences", "1", "--frames", "6", "--size", "64x48",
                       "--format", "apollo").returncode == 0
        args = ["ingest", "apollo", str(src), "--store", url, "--window", "5"]
        text = no_traceback(done := run_cli_with_file_size_limit(*args))
        assert done.returncode == 1 and "cannot write to the store: File too large" in text, text
        assert "file size limit (ulimit -f)" in text and str(src) not in text.split("failed", 1)[1], text
        assert SequenceStore.open(url).sequence_ids() == []  # nothing half-ingested is visible
        assert run_cli(*args).returncode == 0 and len(SequenceStore.open(url).sequence_ids()) == 1

    def test_a_file_size_limit_during_export_names_the_file_and_what_is_kept(self, store: str,
                                                                             tmp_path: Path) -> None:
        out = tmp_path / "out"
        args = ["export", store, "--method", "gt", "--out", str(out), "--overlay"]
        text = no_traceback(done := run_cli_with_file_size_limit(*args, limit=1024))
        assert done.returncode == 1 and f"({out}{os.sep}" in text and ".png)" in text, text
        assert "file size limit (ulimit -f)" in text and "raise it. Every file written so far is whole" in text, text
        assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temporary file left behind
        assert run_cli(*args).returncode == 0 and len(list(out.rglob("*.png"))) == 3 * 16

    def test_a_file_size_limit_in_label_export_blames_the_export_not_the_store(self, store: str,
                                                                                tmp_path: Path) -> None:
        assert run_cli("label", store, *MOTION).returncode == 0
        out = tmp_path / "out"
        text = no_traceback(done := run_cli_with_file_size_limit("label", store, *MOTION, "--export", str(out),
                                                                 limit=1024))
        assert done.returncode == 1 and f"failed synth-0000: cannot write: File too large ({out}{os.sep}" in text, text
        assert "to the store" not in text, text
        assert run_cli("verify", store).returncode == 0

    def test_a_file_size_limit_when_a_checkpoint_is_saved(self, store: str, tmp_path: Path) -> None:
        """torch.save used to end this with ``RuntimeError: ... unexpected pos`` and a traceback."""
        out = tmp_path / "t.pt"
        text = no_traceback(done := run_cli_with_file_size_limit(
            "train-teacher", "--store", store, "--out", str(out), "--max-steps", "1", "--crop", "64", limit=65536))
        assert done.returncode == 1 and f"File too large ({out})" in text, text
        assert ". No checkpoint was written" in text and not list(tmp_path.glob("*.pt*")), text


def run_cli_with_file_size_limit(*args: str, limit: int = 4096) -> subprocess.CompletedProcess[str]:
    """``autolabel ARGS`` with files capped at ``limit`` bytes (``ulimit -f``): writes fail with EFBIG,
    as they would with a full disk, on any machine and without root."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "autolabel.cli", *args], capture_output=True, text=True,
                          env=cli_env(), preexec_fn=cap, timeout=300)


class TestIds:
    def test_colliding_ids_fail_both_and_name_them(self, tmp_path: Path) -> None:
        root, labels = tmp_path / "drives", tmp_path / "labels"
        for name in ("seq 1", "seq1", "other"):
            good_sequence(root, labels, name, frames=2)
        url = str(tmp_path / "s.zarr")
        done = run_cli("ingest", "folder", str(root), "--store", url, "--labels", str(labels),
                       "--classes", str(classes_file(tmp_path)))
        text = no_traceback(done)
        assert done.returncode == 1 and "both map to sequence id 'seq1'" in text and "seq 1" in text, text
        assert SequenceStore.open(url).sequence_ids() == ["other"]

    def test_unicode_names_become_printable_distinct_ids(self, tmp_path: Path) -> None:
        from autolabel.storage.ids import make_sequence_id

        assert make_sequence_id("日本") == "xn--wgv71a"
        assert make_sequence_id("x∕y") != make_sequence_id("xy")
        assert make_sequence_id("ｓｅｑ１") == "seq1"
        root, labels = tmp_path / "drives", tmp_path / "labels"
        good_sequence(root, labels, "日本", frames=2)
        url = str(tmp_path / "s.zarr")
        done = run_cli("ingest", "folder", str(root), "--store", url, "--labels", str(labels),
                       "--classes", str(classes_file(tmp_path)))
        assert done.returncode == 0, no_traceback(done)
        assert SequenceStore.open(url).sequence_ids() == ["xn--wgv71a"]

