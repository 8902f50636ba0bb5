"""Shared fixtures: stores of every kind, tiny synthetic drives, tiny dataset layouts on disk."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autolabel.settings import shared_data_dir
from storage.synthetic import SyntheticConfig


@pytest.fixture(params=["local", "memory"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store location: a local directory or an fsspec ``memory://`` URL."""
    if request.param == "local":
        return str(tmp_path / "store.zarr")
    return f"memory://autolabel-test-{uuid.uuid4().hex}.zarr"


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
