"""A store in object storage (``s3://``), as several machines share it: a real S3-compatible server
(moto, started by the ``s3_server`` fixture on 127.0.0.1) reached through s3fs.

Ingest, label, two concurrent runs and a kill all go through ``s3://`` URLs; the result equals
the same drives labelled once in a local folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.faults import kill_at_progress, run_concurrently, snapshot, start_cli

MOTION = ["--method", "motion-only", "--flow", "dis-fast", "--max-distance", "5", "--no-estimate"]
SYNTH = ["--sequences", "2", "--frames", "16", "--size", "80x64", "--keyframe-every", "8"]


def _cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = start_cli(*args, env=env)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


@pytest.fixture(scope="module")
def local_clean(tmp_path_factory: pytest.TempPathFactory) -> dict:
    store = str(tmp_path_factory.mktemp("s3ref") / "s.zarr")
    assert run_cli("synth", store, *SYNTH).returncode == 0
    assert run_cli("label", store, *MOTION).returncode == 0
    return snapshot(store)


def test_ingest_label_concurrent_runs_and_a_kill_through_s3(s3_store_url: str, s3_server: dict[str, str],
                                                            local_clean: dict, tmp_path: Path) -> None:
    env = s3_server
    code, text = _cli(env, "synth", s3_store_url, *SYNTH)
    assert code == 0, text

    # a run killed in the middle of its flow stage, then two runs at once
    kill_at_progress(["label", s3_store_url, *MOTION], r"synth-0000: flow dis-fast:", 1, env=env)
    for code, err in run_concurrently([["label", s3_store_url, *MOTION]] * 2, env=env):
        assert code == 0 and "Traceback" not in err, err
    assert snapshot(s3_store_url) == local_clean

    code, text = _cli(env, "verify", s3_store_url)
    assert code == 0 and "2 sequences checked, ok" in text, text
    code, text = _cli(env, "label", s3_store_url, *MOTION)
    assert code == 0 and "labelled 0 sequences, skipped 2" in text, text


def test_ingest_of_a_folder_into_s3(s3_store_url: str, s3_server: dict[str, str], tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    assert run_cli("synth", str(inbox), "--format", "apollo", "--sequences", "2", "--frames", "6",
                   "--size", "64x48").returncode == 0
    code, text = _cli(s3_server, "ingest", "apollo", str(inbox), "--store", s3_store_url)
    assert code == 0, text
    code, text = _cli(s3_server, "ingest", "apollo", str(inbox), "--store", s3_store_url)
    assert code == 0 and "skipped" in text, text
    code, text = _cli(s3_server, "info", s3_store_url)
    assert code == 0 and "road01_Record001_Camera5" in text, text
