"""Optical-flow backends by name, computing forward and backward flow of frame pairs.

Backends (``FLOW_BACKENDS``):

* ``dis-ultrafast``, ``dis-fast``, ``dis-medium``: OpenCV DIS presets; ``variational_refinement``
  adds variational refinement iterations.
* ``farneback``: OpenCV Farneback.
* ``raft``: torchvision's RAFT, only when torchvision is installed *and* a local weights file is
  given (``raft_weights``); nothing is ever downloaded.
* ``exact``: not computed: the synthetic drives store their exact flow under this name.

For a pair (a, b) a backend returns ``fw`` (a -> b, on a's pixels) and ``bw`` (b -> a, on b's
pixels), each float32 (2, H, W), channel 0 = x. :class:`FlowEstimator` runs pairs in parallel
worker processes (one OpenCV thread each) and yields results in order. Measured on 2 cores
(benchmarks/flow.py): DIS is fastest in one process, since OpenCV already spreads it over the
cores, while Farneback gains from one process per core; ``workers=0`` (auto) picks accordingly.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from autolabel.errors import (
    CheckpointError,
    ConfigError,
    FlowError,
    MissingDependencyError,
)
from autolabel.registry import Registry
from autolabel.workers import HoldsWorkerPool, WorkerPool

EXACT = "exact"


class FlowConfig(BaseModel):
    """Which flow backend to run and how."""

    model_config = ConfigDict(frozen=True)

    backend: str = Field("dis-medium", description="dis-ultrafast, dis-fast, dis-medium, farneback, raft, or "
                                                   "'exact' (synthetic drives' stored flow)")
    variational_refinement: bool = Field(False, description="DIS only: add variational refinement")
    raft_weights: Path | None = Field(None, description="RAFT only: local state-dict file")
    raft_small: bool = Field(False, description="RAFT only: the small model")
    workers: int = Field(0, ge=0, description="flow processes; 0 = auto: one for DIS (OpenCV runs it on "
                         "every core), one per core for the other backends")
    device: str = "cpu"

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, backend: str) -> str:
        if backend != EXACT:
            FLOW_BACKENDS.get(backend)  # a RegistryError lists the known names
        return backend

    def settings_key(self) -> dict[str, Any]:
        """What determines the flow values (workers and device do not)."""
        return {"backend": self.backend, "variational_refinement": self.variational_refinement,
                "raft_weights": str(self.raft_weights) if self.raft_weights else None, "raft_small": self.raft_small}

    def resolved_workers(self) -> int:
        """Processes to use. Auto (0): one for DIS, which OpenCV already runs on all cores (a pool only
        adds the cost of shipping frames), and one per core for the other backends."""
        if self.workers:
            return self.workers
        return 1 if self.backend.startswith("dis-") else (os.cpu_count() or 1)

    @property
    def stored_name(self) -> str:
        """Name of the store group holding this configuration's flow."""
        return f"{self.backend}+vr" if self.variational_refinement else self.backend


class FlowBackend(ABC):
    """Computes the flow of frame pairs in both directions."""

    @abstractmethod
    def pair(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flow of the pair (a, b).

        Args:
            a, b: uint8 RGB frames (H, W, 3).

        Returns:
            fw (a -> b, on a's pixels) and bw (b -> a, on b's pixels), float32 (2, H, W).
        """


FLOW_BACKENDS: Registry[type[FlowBackend]] = Registry("flow backend")


def _gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def _chw(flow_hw2: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(flow_hw2.transpose(2, 0, 1), dtype=np.float32)


class _DISBackend(FlowBackend):
    preset_name = "MEDIUM"

    def __init__(self, config: FlowConfig) -> None:
        import cv2

        self._dis = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{self.preset_name}"))
        if config.variational_refinement:
            self._dis.setVariationalRefinementIterations(5)

    def pair(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ga, gb = _gray(a), _gray(b)
        return _chw(self._dis.calc(ga, gb, None)), _chw(self._dis.calc(gb, ga, None))


@FLOW_BACKENDS.register("dis-ultrafast")
class DISUltrafast(_DISBackend):
    preset_name = "ULTRAFAST"


@FLOW_BACKENDS.register("dis-fast")
class DISFast(_DISBackend):
    preset_name = "FAST"


@FLOW_BACKENDS.register("dis-medium")
class DISMedium(_DISBackend):
    preset_name = "MEDIUM"


@FLOW_BACKENDS.register("farneback")
class Farneback(FlowBackend):
    def __init__(self, config: FlowConfig) -> None:
        if config.variational_refinement:
            raise ConfigError("variational refinement applies to the DIS backends only")

    def pair(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        ga, gb = _gray(a), _gray(b)
        args = (None, 0.5, 4, 21, 3, 7, 1.5, 0)
        return _chw(cv2.calcOpticalFlowFarneback(ga, gb, *args)), _chw(cv2.calcOpticalFlowFarneback(gb, ga, *args))


@FLOW_BACKENDS.register("raft")
class RAFT(FlowBackend):
    """torchvision RAFT from a local weights file (large by default, ``raft_small`` for small)."""

    def __init__(self, config: FlowConfig) -> None:
        import torch

        try:
            from torchvision.models.optical_flow import raft_large, raft_small
        except ImportError as exc:
            raise MissingDependencyError(
                f"the raft flow backend needs torchvision, which cannot be imported here ({exc}); "
                "use a DIS backend or install a torchvision that matches this torch"
            ) from None
        if config.raft_weights is None:
            raise ConfigError("the raft backend needs a local weights file (raft_weights / --raft-weights); "
                              "weights are never downloaded")
        if not config.raft_weights.is_file():
            raise CheckpointError(f"{config.raft_weights}: RAFT weights file not found")
        self.device = torch.device(config.device)
        self.net = (raft_small if config.raft_small else raft_large)(weights=None, progress=False)
        try:
            state = torch.load(config.raft_weights, map_location="cpu", weights_only=True)
            self.net.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - any failure here means the file does not fit
            raise CheckpointError(f"{config.raft_weights}: not a RAFT state dict for this model ({exc})") from exc
        self.net.eval().to(self.device)

    def pair(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch
        import torch.nn.functional as F

        h, w = a.shape[:2]
        ph, pw = (-h) % 8, (-w) % 8
        batch = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        batch = F.pad(batch, (0, pw, 0, ph), mode="replicate").to(self.device)
        with torch.inference_mode():
            flows = self.net(batch, batch.flip(0))[-1][:, :, :h, :w].float().cpu().numpy()
        return flows[0], flows[1]


def create_backend(config: FlowConfig) -> FlowBackend:
    """The backend named in ``config`` (``exact`` cannot be computed, only read)."""
    if config.backend == EXACT:
        raise ConfigError("flow backend 'exact' is read from the store (synthetic drives), not computed")
    return FLOW_BACKENDS.get(config.backend)(config)


# --- parallel estimation --------------------------------------------------------------------------

_WORKER_BACKEND: FlowBackend | None = None


def _worker_init(config: FlowConfig) -> None:
    global _WORKER_BACKEND
    import cv2

    cv2.setNumThreads(1)
    _WORKER_BACKEND = create_backend(config)


def _worker_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_BACKEND is not None
    return _WORKER_BACKEND.pair(a, b)


def _consecutive(frames: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(frames[t], frames[t + 1])`` for each t, reading ``frames`` once."""
    it = iter(frames)
    prev = next(it, None)
    for cur in it:
        yield prev, cur  # type: ignore[misc]
        prev = cur


class FlowEstimator(HoldsWorkerPool):
    """Computes flows of many pairs in ``config.resolved_workers()`` processes (in-process when 1 or GPU).

    Use as a context manager so the worker pool is shut down; reuse one estimator for many
    sequences to start the workers only once.
    """

    def __init__(self, config: FlowConfig) -> None:
        self.config = config
        self._local: FlowBackend | None = None
        self.workers = config.resolved_workers()
        if self.workers > 1 and config.device == "cpu" and config.backend != "raft":
            self._pool = WorkerPool(self.workers, _worker_init, (config,))
        else:
            self._local = create_backend(config)

    def pairs(self, frames: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(fw, bw)`` for each consecutive pair of ``frames``, in order (T frames -> T-1 pairs)."""
        if self._pool is None:
            assert self._local is not None
            yield from (self._local.pair(a, b) for a, b in _consecutive(frames))
            return
        try:
            yield from self._pool.ordered(_worker_pair, _consecutive(frames))
        except BrokenProcessPool as exc:
            raise FlowError(
                f"a {self.config.backend} flow worker process died (killed, or out of memory with "
                f"{self.workers} workers); run again, with fewer --workers if memory is short") from exc


def read_flo(path: Path) -> np.ndarray:
    """Read a Middlebury ``.flo`` file as float32 (2, H, W); unknown flow (> 1e9) becomes NaN."""
    data = path.read_bytes()
    if len(data) < 12 or np.frombuffer(data[:4], np.float32)[0] != 202021.25:
        raise ConfigError(f"{path}: not a .flo file (bad magic number)")
    w, h = np.frombuffer(data[4:12], np.int32)
    flow = np.frombuffer(data[12:], np.float32, count=2 * w * h).reshape(h, w, 2).transpose(2, 0, 1).copy()
    flow[:, (np.abs(flow) > 1e9).any(0)] = np.nan
    return flow


def endpoint_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Average end-point error over pixels where ``truth`` (2, H, W) is known (not NaN)."""
    valid = ~np.isnan(truth).any(0)
    return float(np.sqrt(((estimate - truth) ** 2).sum(0))[valid].mean())
