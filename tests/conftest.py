"""Shared fixtures: stores of every kind, tiny synthetic drives, tiny dataset layouts on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from autolabel.models.teacher import Teacher
from autolabel.models.teacher_training import TeacherTrainConfig, train_teacher
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, SyntheticDrive, drive_configs
from autolabel.storage.synthetic_io import write_synthetic_store
from autolabel.storage.training_data import AnnotatedFrames
from PIL import Image

from autolabel.settings import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
TINY = SyntheticConfig(width=64, height=48, frames=25, seed=0)


@pytest.fixture(params=["local", "memory"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store location: a local directory or an fsspec ``memory://`` URL."""
    if request.param == "local":
        return str(tmp_path / "store.zarr")
    return f"memory://autolabel-test-{uuid.uuid4().hex}.zarr"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3-compatible server (moto in server mode) on 127.0.0.1, stopped at the end.

    Yields the environment a process needs to reach it through ``s3://`` URLs (s3fs). Skips when
    moto or s3fs is not installed (``pip install -e '.[dev]'`` installs both).
    """
    import time
    import urllib.request

    for module in ("moto", "s3fs", "flask"):
        pytest.importorskip(module, reason=f"{module} is needed for the S3 tests (pip install -e '.[dev]')")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the moto S3 server did not start")
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_store_url(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<fresh bucket>/store.zarr`` on the test server; this process' environment points at it."""
    import boto3

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    bucket = f"autolabel-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/store.zarr"


@pytest.fixture
def local_store_url(tmp_path: Path) -> str:
    return str(tmp_path / "store.zarr")


@pytest.fixture
def tiny_config() -> SyntheticConfig:
    """A synthetic drive small enough to render in well under a second."""
    return SyntheticConfig(width=64, height=48, frames=6, seed=1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets (``$AUTOLABEL_SHARED_DATA`` or ../shared/data); skips when absent."""
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}; set AUTOLABEL_SHARED_DATA to run realdata tests")
    return root


def save_rgb(path: Path, rgb: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format=fmt, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def save_label(path: Path, label: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)
    return path


def random_rgb(rng: np.random.Generator, h: int = 12, w: int = 16) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def random_label(rng: np.random.Generator, values: list[int], h: int = 12, w: int = 16) -> np.ndarray:
    return rng.choice(np.asarray(values, dtype=np.uint8), size=(h, w))


def classes_file(tmp_path: Path) -> Path:
    """A three-class JSON class file for the folder layout."""
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"names": ["road", "car", "sky"], "palette": [[1, 1, 1], [2, 2, 2], [3, 3, 3]]}))
    return path


def good_sequence(root: Path, labels: Path, name: str, frames: int = 3, seed: int = 3) -> None:
    """A folder-layout sequence of random frames with a label on frame 0."""
    rng = np.random.default_rng(seed)
    for i in range(frames):
        save_rgb(root / name / f"{i:04d}.png", random_rgb(rng))
    save_label(labels / name / "0000.png", random_label(rng, [0, 1, 2]))


def run_cli(*args: str, cwd: Path | None = None, columns: int = 250) -> subprocess.CompletedProcess[str]:
    """``autolabel ARGS`` in a subprocess, as a user runs it (no colour, ``columns`` wide)."""
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "autolabel.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


class DriveInputs:
    """SequenceInputs over a rendered drive; the 'teacher' is the truth with chosen confidence."""

    def __init__(self, cfg: SyntheticConfig, annotated: list[int], teacher_conf: float = 0.95,
                 teacher_noise: float = 0.0) -> None:
        drive = SyntheticDrive(cfg)
        self.frames = [drive.render(t) for t in range(cfg.frames)]
        self.num_frames, self.height, self.width = cfg.frames, cfg.height, cfg.width
        self.annotated = np.zeros(cfg.frames, bool)
        self.annotated[annotated] = True
        self.num_classes, self.ignore_index = len(cfg.classes), 255
        rng = np.random.default_rng(0)
        self._teacher = []
        for f in self.frames:
            labels = f.label.copy()
            flip = rng.random(labels.shape) < teacher_noise
            labels[flip] = (labels[flip] + 1) % self.num_classes
            self._teacher.append((labels, np.full(labels.shape, teacher_conf, np.float32)))

    def annotation(self, t: int) -> np.ndarray:
        assert self.annotated[t], "propagation read a non-annotated frame's label"
        return self.frames[t].label

    def frame(self, t: int) -> np.ndarray:
        return self.frames[t].rgb

    def flow_to_next(self, t: int) -> np.ndarray:
        return self.frames[t].flow_next

    def flow_to_prev(self, t: int) -> np.ndarray:
        return self.frames[t].flow_prev

    def teacher(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        return self._teacher[t]


@pytest.fixture
def synth_store(store_url: str) -> str:
    write_synthetic_store(store_url, drive_configs(2, TINY), AnnotationPolicy(mode="window", n=21))
    return store_url


def train_tiny_teacher(store_url: str, path: Path, steps: int = 4) -> Teacher:
    """A ``unet-tiny`` teacher trained a few steps on the store's annotations, saved to ``path``."""
    import torch

    store = SequenceStore.open(store_url)
    torch.manual_seed(0)
    teacher = Teacher.create("unet-tiny", store.classes.names, [list(c) for c in store.classes.palette])
    train_teacher(teacher, AnnotatedFrames([store]), TeacherTrainConfig(arch="unet-tiny", max_steps=steps,
                                                                       batch_size=2, crop=64))
    teacher.save(path)
    return teacher


def tiny_checkpoints(store_url: str, root: Path) -> dict[str, Path]:
    """A tiny trained teacher and an untrained ``refine-tiny`` refiner for it, saved under ``root``."""
    from autolabel.models.refiner import Refiner
    from autolabel.tasks.checkpoints import checkpoint_sha256

    teacher = train_tiny_teacher(store_url, root / "teacher.pt")
    Refiner.create("refine-tiny", teacher.classes, teacher.feature_channels,
                   checkpoint_sha256(root / "teacher.pt")).save(root / "refiner.pt")
    return {"store": Path(store_url), "teacher": root / "teacher.pt", "refiner": root / "refiner.pt"}


def drives_with_checkpoints(root: Path, configs: list[SyntheticConfig], every: int) -> dict[str, Path]:
    """A store of synthetic drives with a keyframe every ``every`` frames under ``root``, and
    :func:`tiny_checkpoints` for it."""
    store = str(root / "store.zarr")
    write_synthetic_store(store, configs, AnnotationPolicy(mode="window", n=every))
    return tiny_checkpoints(store, root)


@pytest.fixture
def teacher_path(synth_store: str, tmp_path: Path) -> Path:
    train_tiny_teacher(synth_store, tmp_path / "teacher.pt")
    return tmp_path / "teacher.pt"


# the longest files first: pytest-xdist (--dist loadfile --no-loadscope-reorder, as `make test` runs it)
# hands out whole files in collection order, so the deployment test (about 6 minutes) runs beside the
# rest instead of after it; without --no-loadscope-reorder xdist sorts files by their number of tests,
# which put the two-test deployment file near the end
LONGEST_FIRST = ("test_deployment_e2e.py", "test_faults.py", "test_s3_store.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each file is kept


def pytest_configure(config: pytest.Config) -> None:
    """Share the cores among the pytest-xdist workers: each worker, and every process it starts
    (``autolabel`` CLI runs, servers, workers), gets cores / workers threads unless
    ``$AUTOLABEL_THREADS`` / ``$OMP_NUM_THREADS`` say otherwise. Two workers with two torch
    threads each (and their subprocesses with two more) oversubscribed two cores: the same files
    ran 15-18 % slower (220 / 232 s against 180 / 200 s, run alternately)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers <= 1:
        return
    from autolabel.runtime import set_threads

    threads = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ.setdefault("AUTOLABEL_THREADS", threads)
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    set_threads()  # $AUTOLABEL_THREADS, checked


class RecordingProgress:
    """Progress (``autolabel.progress.Progress``) that records each start's total and how many times
    it advanced: a bar that stops short (a log whose last line says 75 %) looks like work that hung."""

    def __init__(self) -> None:
        self.stages: list[list] = []  # [sequence, title, total, advanced]

    def start(self, seq_id: str, title: str, total: int) -> None:
        self.stages.append([seq_id, title, total, 0])

    def advance(self) -> None:
        self.stages[-1][3] += 1
