"""Optical-flow backends: accuracy on a known translation, both directions, parallel = serial, errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from autolabel.errors import ConfigError, MissingDependencyError, RegistryError
from autolabel.models.optical_flow import FLOW_BACKENDS, FlowConfig, FlowEstimator, create_backend, endpoint_error, read_flo
from autolabel.storage.synthetic import value_noise


def _textured_pair(dx: float, dy: float, h: int = 96, w: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Frame b is frame a's smooth texture moved by (dx, dy) pixels."""
    jj, ii = np.meshgrid(np.arange(w, dtype=float), np.arange(h, dtype=float))

    def render(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        channels = [value_noise(x / s, y / s, seed) for s, seed in ((9, 1), (5, 2), (13, 3))]
        return (np.stack(channels, -1) * 255).astype(np.uint8)

    return render(jj, ii), render(jj - dx, ii - dy)


def test_registry() -> None:
    assert FLOW_BACKENDS.names() == ["dis-fast", "dis-medium", "dis-ultrafast", "farneback", "raft"]
    with pytest.raises(RegistryError, match="unknown flow backend 'pwc'"):
        create_backend(FlowConfig(backend="pwc"))


@pytest.mark.parametrize("backend", ["dis-ultrafast", "dis-fast", "dis-medium", "farneback"])
def test_translation_is_recovered_both_ways(backend: str) -> None:
    a, b = _textured_pair(3.0, -2.0)
    fw, bw = create_backend(FlowConfig(backend=backend)).pair(a, b)
    assert fw.shape == bw.shape == (2, 96, 128) and fw.dtype == np.float32
    core = (slice(16, -16), slice(16, -16))
    assert np.median(fw[0][core]) == pytest.approx(3.0, abs=0.35)
    assert np.median(fw[1][core]) == pytest.approx(-2.0, abs=0.35)
    assert np.median(bw[0][core]) == pytest.approx(-3.0, abs=0.35)
    assert np.median(bw[1][core]) == pytest.approx(2.0, abs=0.35)


def test_variational_refinement_runs_and_farneback_refuses_it() -> None:
    a, b = _textured_pair(1.5, 0.5)
    fw, _ = create_backend(FlowConfig(backend="dis-fast", variational_refinement=True)).pair(a, b)
    assert np.median(fw[0][16:-16, 16:-16]) == pytest.approx(1.5, abs=0.3)
    assert FlowConfig(backend="dis-fast", variational_refinement=True).stored_name == "dis-fast+vr"
    with pytest.raises(ConfigError, match="DIS backends only"):
        create_backend(FlowConfig(backend="farneback", variational_refinement=True))


def test_parallel_workers_match_in_process() -> None:
    frames = [_textured_pair(float(k), 0.0)[1] for k in range(4)]
    with FlowEstimator(FlowConfig(backend="dis-fast", workers=1)) as serial:
        expected = list(serial.pairs(frames))
    with FlowEstimator(FlowConfig(backend="dis-fast", workers=2)) as parallel:
        got = list(parallel.pairs(iter(frames)))
    assert len(got) == 3
    for (f1, b1), (f2, b2) in zip(expected, got):
        np.testing.assert_array_equal(f1, f2)
        np.testing.assert_array_equal(b1, b2)


def test_exact_is_read_not_computed() -> None:
    with pytest.raises(ConfigError, match="read from the store"):
        create_backend(FlowConfig(backend="exact"))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_raft_without_torchvision_says_so() -> None:
    with pytest.raises(MissingDependencyError, match="needs torchvision"):
        create_backend(FlowConfig(backend="raft", raft_weights=Path("raft.pth")))


def test_flo_reader_and_endpoint_error(tmp_path: Path) -> None:
    flow = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    flow[:, 0, 0] = 1e10  # unknown
    path = tmp_path / "x.flo"
    path.write_bytes(np.float32(202021.25).tobytes() + np.int32(4).tobytes() + np.int32(3).tobytes()
                     + flow.transpose(1, 2, 0).tobytes())
    read = read_flo(path)
    assert np.isnan(read[:, 0, 0]).all()
    np.testing.assert_array_equal(read[:, 1:], flow[:, 1:])
    assert endpoint_error(read + np.array([3.0, 4.0]).reshape(2, 1, 1), read) == pytest.approx(5.0)
    (tmp_path / "bad.flo").write_bytes(b"PIEH0000")
    with pytest.raises(ConfigError, match="not a .flo file"):
        read_flo(tmp_path / "bad.flo")


def test_auto_workers_keep_dis_in_process() -> None:
    assert FlowConfig(backend="dis-medium").resolved_workers() == 1
    assert FlowConfig(backend="farneback").resolved_workers() >= 1
    assert FlowConfig(backend="dis-fast", workers=3).resolved_workers() == 3
