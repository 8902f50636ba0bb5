"""Which labelled frames count as manual annotations (propagation sources).

Three policies, chosen at ingest:

* ``all`` (default): every frame that has a label is an annotation.
* ``window N`` (the paper's protocol, App. C.2): the sequence is cut into consecutive windows of
  N frames (N odd); the centre frame of each *full* window is the annotation and every other
  label is kept only as evaluation ground truth. Trailing frames that do not fill a window get no
  annotation. A sequence shorter than one window is a single window: its centre frame,
  ``(T - 1) // 2``, is the annotation (so one-frame keyframe sequences stay annotated).
* ``keyframe-every N``: frames ``0, N, 2N, ...`` that have a label are annotations.

A chosen frame without a label is not annotated (there is nothing to propagate from it).
"""

from __future__ import annotations

from typing import Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from autolabel.errors import ConfigError


class AnnotationPolicy(BaseModel):
    """How ingest picks annotated frames among the labelled ones."""

    model_config = ConfigDict(frozen=True)

    mode: Literal["all", "window", "keyframe-every"] = "all"
    n: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.mode == "all" and self.n is not None:
            raise ConfigError("annotation mode 'all' takes no N")
        if self.mode != "all" and self.n is None:
            raise ConfigError(f"annotation mode {self.mode!r} needs N")
        if self.mode == "window" and (self.n is None or self.n < 3 or self.n % 2 == 0):
            raise ConfigError(f"--window needs an odd size >= 3 so each window has a centre, got {self.n}")
        return self

    @classmethod
    def from_options(cls, window: int | None = None, keyframe_every: int | None = None) -> AnnotationPolicy:
        if window is not None and keyframe_every is not None:
            raise ConfigError("use either --window or --keyframe-every, not both")
        if window is not None:
            return cls(mode="window", n=window)
        if keyframe_every is not None:
            return cls(mode="keyframe-every", n=keyframe_every)
        return cls()

    def candidates(self, num_frames: int) -> np.ndarray:
        """bool (T,): frames this policy would annotate if they had a label."""
        chosen = np.zeros(num_frames, dtype=bool)
        if self.mode == "all":
            chosen[:] = True
        elif self.mode == "window":
            assert self.n is not None
            full = num_frames // self.n
            if full == 0:
                chosen[(num_frames - 1) // 2] = num_frames > 0
            else:
                chosen[np.arange(full) * self.n + self.n // 2] = True
        else:
            assert self.n is not None
            chosen[:: self.n] = True
        return chosen

    def select(self, labelled: np.ndarray) -> np.ndarray:
        """bool (T,) annotated frames, given bool (T,) ``labelled`` frames."""
        labelled = np.asarray(labelled, dtype=bool)
        return self.candidates(labelled.shape[0]) & labelled

    def describe(self) -> str:
        return "all labelled frames" if self.mode == "all" else f"{self.mode} {self.n}"
