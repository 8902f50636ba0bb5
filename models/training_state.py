"""A training run's progress on disk, so a killed or interrupted run goes on where it stopped.

Teacher and refiner training save, every ``every_s`` seconds at a step boundary, what the next step
depends on: the weights, the optimiser and its schedule, torch's and the sampler's random state
(the epoch's order and the position in it) and the losses so far, to ``<out>.train-state`` beside
the checkpoint they will write. The same command finds it and goes on from that step; on CPU in fp32
the resumed run ends with the very weights an uninterrupted one ends with (a test checks it). The
file is removed once the checkpoint is written; one from other settings is refused, never mixed in.

Pure torch / numpy: no store, no Prefect.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from autolabel.errors import CheckpointError
from autolabel.models.checkpoints import save_checkpoint, why_unreadable

STATE_FORMAT = "autolabel-train-state"
STATE_VERSION = 1
STATE_SUFFIX = ".train-state"


def state_path_for(out: Path | str) -> Path:
    """Where the training that writes checkpoint ``out`` keeps its progress: ``<out>.train-state``."""
    out = Path(out)
    return out.with_name(out.name + STATE_SUFFIX)


def run_settings(config: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """What makes two training runs the same run: ``config`` without where it runs or how often it
    saves (``device``, ``state_every_s``), and ``data``, what it trains on."""
    return {**config.model_dump(mode="json", exclude={"device", "state_every_s"}), "data": data}


class EpochSampler:
    """Batches of sample indices: a fresh random order each epoch, resumable in the middle of one.

    Draws from ``rng`` exactly as ``for start in range(0, n, b): order[start:start + b]`` over
    ``rng.permutation(n)`` per epoch does, so the augmentation that shares ``rng`` sees the same
    numbers whether or not the run was resumed.
    """

    def __init__(self, num_samples: int, batch_size: int, rng: np.random.Generator) -> None:
        self.num_samples, self.batch_size, self.rng = num_samples, batch_size, rng
        self.order: np.ndarray | None = None
        self.position = 0

    def next_batch(self) -> np.ndarray:
        """The next batch's sample indices (int64 (b,), ``b <= batch_size``; shorter at an epoch's end)."""
        if self.order is None or self.position >= self.num_samples:
            self.order, self.position = self.rng.permutation(self.num_samples), 0
        batch = self.order[self.position:self.position + self.batch_size]
        self.position += len(batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"rng": json.dumps(self.rng.bit_generator.state), "position": self.position,
                "order": None if self.order is None else torch.from_numpy(self.order.astype(np.int64))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.order = None if state["order"] is None else state["order"].numpy()
        self.position = int(state["position"])


class TrainingState:
    """``<out>.train-state``: save a run's progress now and then, load it when the same run starts again.

    Args:
        path: the state file (:func:`state_path_for` the checkpoint).
        settings: what makes two runs the same run (the training config without the device, the
            data's size and source); a state saved under other settings is refused with the keys that
            differ, so a changed command never continues a different training.
        every_s: seconds between saves (0: after every step).
    """

    def __init__(self, path: Path | str, settings: dict[str, Any], every_s: float = 60.0) -> None:
        self.path, self.every_s = Path(path), every_s
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        self._last_save = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, or None where there is none; CheckpointError for one that is
        unreadable or from other settings (the message says to delete it to start afresh)."""
        if not self.path.exists():
            return None
        fix = f"delete {self.path} to start the training afresh"
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickle, zip and safety errors all mean 'unusable'
            reason = why_unreadable(self.path) or f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
            raise CheckpointError(f"{self.path}: cannot read the training state: {reason}; {fix}") from exc
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or \
                state.get("format_version") != STATE_VERSION:
            raise CheckpointError(f"{self.path}: not a training state of this autolabel; {fix}")
        saved = json.loads(state["settings"])
        if saved != self.settings:
            differ = sorted(k for k in {*saved, *self.settings} if saved.get(k) != self.settings.get(k))
            raise CheckpointError(
                f"{self.path}: holds a training stopped at step {state['step']} with other settings "
                f"({', '.join(differ)} differ); run the command that started it to go on, or {fix}")
        self._last_save = time.monotonic()
        return state

    def due(self) -> bool:
        """Whether ``every_s`` has passed since the last save (or load)."""
        return time.monotonic() - self._last_save >= self.every_s

    def save(self, step: int, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LRScheduler, sampler: EpochSampler, losses: list[float],
             seconds: float) -> None:
        """Write the progress after ``step`` steps, whole or not at all (atomic)."""
        state = {
            "format": STATE_FORMAT, "format_version": STATE_VERSION, "settings": json.dumps(self.settings),
            "step": step, "net": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "torch_rng": torch.get_rng_state(), "sampler": sampler.state_dict(),
            "losses": torch.tensor(losses, dtype=torch.float64), "seconds": seconds,
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        save_checkpoint(state, self.path)
        self._last_save = time.monotonic()

    def remove(self) -> None:
        """Forget the progress (the checkpoint is written)."""
        self.path.unlink(missing_ok=True)


class TrainingLoop:
    """What teacher and refiner training share around their step: the sampler, going on from a
    saved state, saving it when due, the losses, the time spent, the summary.

    ``while loop.running(): ...; loop.record(loss, progress)`` steps ``total`` times in all, counting
    the steps a stopped run made before.
    """

    def __init__(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, sampler: EpochSampler, total: int,
                 state: TrainingState | None = None) -> None:
        self.net, self.optimizer, self.schedule, self.sampler = net, optimizer, schedule, sampler
        self.total, self.state = total, state
        self.step, self.losses, self._before = 0, [], 0.0
        saved = state.load() if state is not None else None
        if saved is not None:
            self.step, self.losses, self._before = restore(saved, net, optimizer, schedule, sampler)
        self.resumed_from = self.step
        self._start = time.perf_counter()

    def running(self) -> bool:
        return self.step < self.total

    def record(self, loss: float, progress: Callable[[int, int, float], None] | None = None) -> None:
        """One step done with ``loss``: saves the state when due, then reports ``(step, total, loss)``."""
        self.losses.append(loss)
        self.step += 1
        if self.state is not None and self.step < self.total and self.state.due():
            self.state.save(self.step, self.net, self.optimizer, self.schedule, self.sampler, self.losses,
                            self.seconds())
        if progress is not None:
            progress(self.step, self.total, loss)

    def seconds(self) -> float:
        """Seconds of training, a stopped run's included."""
        return self._before + time.perf_counter() - self._start

    def summary(self, last: int) -> dict[str, Any]:
        """Steps, the mean loss of the ``last`` steps, seconds (and ``resumed_from_step`` if it went on)."""
        info: dict[str, Any] = {"steps": self.step, "final_loss": float(np.mean(self.losses[-last:])),
                                "final_loss_steps": len(self.losses[-last:]), "seconds": round(self.seconds(), 1)}
        if self.resumed_from:
            info["resumed_from_step"] = self.resumed_from
        return info


def restore(state: dict[str, Any], net: torch.nn.Module, optimizer: torch.optim.Optimizer,
            schedule: torch.optim.lr_scheduler.LRScheduler, sampler: EpochSampler) -> tuple[int, list[float], float]:
    """Put a loaded state back into the run's objects; returns (step, losses, seconds spent before)."""
    net.load_state_dict(state["net"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    sampler.load_state_dict(state["sampler"])
    return int(state["step"]), [float(x) for x in state["losses"].tolist()], float(state["seconds"])
