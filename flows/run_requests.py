"""The pydantic requests the flows take (also the deployments' parameters)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from autolabel.errors import ConfigError
from models.optical_flow import FlowConfig
from models.propagation import PropagationConfig, method_class
from storage.annotation import AnnotationPolicy
from storage.stages import results_stage
from storage.store import Sequence


class LabelSettings(BaseModel):
    """How to label one sequence: the method, its checkpoints and every stage's settings."""

    model_config = ConfigDict(frozen=True)

    method: str = Field("warp-refine", description="final method; warp-refine also stores warp-inpaint")
    teacher: str | None = Field(None, description="teacher checkpoint path (on every worker)")
    refiner: str | None = Field(None, description="refiner checkpoint path (warp-refine)")
    propagation: PropagationConfig = PropagationConfig()
    flow: FlowConfig = FlowConfig()
    adapt_steps: int = Field(0, ge=0, description="per-sequence teacher adaptation steps")
    export_dir: str | None = Field(None, description="write index / colour / overlay PNGs of the final method here")
    parallel_flow_pairs: int = Field(
        64, ge=2, description="sequences with at least this many frame pairs compute their flow in pieces on dask")
    dask_address: str | None = Field(None, description="existing Dask scheduler for the flow pieces "
                                                        "(default: $AUTOLABEL_DASK_ADDRESS, else a LocalCluster)")

    @model_validator(mode="after")
    def _checkpoints(self) -> Self:
        cls = method_class(self.method)
        if self.method not in ("warp-inpaint", "warp-refine"):
            raise ConfigError(f"the flows label with warp-inpaint or warp-refine, not {self.method!r}; "
                              "use `autolabel label --method ...` for the baselines")
        if cls.needs_teacher and not self.teacher:
            raise ConfigError(f"method {self.method!r} needs a teacher checkpoint (teacher=...); train one with "
                              "`autolabel train-teacher`")
        if cls.needs_refiner and not self.refiner:
            raise ConfigError(f"method {self.method!r} needs a refiner checkpoint (refiner=...); train one with "
                              "`autolabel train-refiner`")
        return self

    @property
    def methods(self) -> list[str]:
        """Methods stored for each sequence: warp-refine runs after (and is compared with) warp-inpaint."""
        return ["warp-inpaint", "warp-refine"] if self.method == "warp-refine" else [self.method]

    def digest(self) -> str:
        """A short hash of the settings (idempotency keys, change detection)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class DriveSource(BaseModel):
    """Where a label-sequence run ingests its drive from (the parent's inbox)."""

    model_config = ConfigDict(frozen=True)

    inbox: str
    layout: str = "apollo"
    annotation: AnnotationPolicy = AnnotationPolicy()


class AutolabelRequest(BaseModel):
    """One ``autolabel`` run: optional ingest of an inbox, then one label-sequence run per sequence."""

    model_config = ConfigDict(frozen=True)

    store: str = Field(description="the Zarr store (path or fsspec URL shared by all workers)")
    inbox: str | None = Field(None, description="folder of new drives to ingest first")
    layout: str = Field("apollo", description="the inbox's dataset layout (apollo, camvid, davis, cityscapes, folder)")
    annotation: AnnotationPolicy = Field(AnnotationPolicy(), description="which labelled frames are annotations")
    sequences: list[str] | None = Field(None, description="only these sequence ids or globs")
    label: LabelSettings = Field(description="method, checkpoints and stage settings")
    only_stale: bool = Field(False, description="label only drives that are new, changed, or labelled with "
                                                "other settings or checkpoints (nightly)")
    label_deployment: str | None = Field(
        None, description="fan out through this deployment (e.g. 'label-sequence/gpu') so workers of its pool "
                          "take the sequences; None runs them in this process")
    resubmit_crashed: int = Field(2, ge=0, description="re-submit a sequence whose run crashed (lost worker) this often")
    poll_seconds: float = Field(5.0, gt=0, description="how often the parent checks its sequence runs")
    watchdog_seconds: float | None = Field(
        None, gt=0, description="a running sequence run silent (no heartbeat) this long is marked Crashed and "
                                "re-submitted; default 2.5 x PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    max_distance: int = Field(10, ge=1, description="evaluation: score distances 1..K")


def stale_reason(seq: Sequence | None, settings: LabelSettings, source_fingerprint: str | None = None) -> str | None:
    """Why ``seq`` must be (re)labelled with ``settings``, or None when every stage is current.

    ``seq`` is None for a drive of the inbox not ingested yet; ``source_fingerprint`` is the inbox
    drive's current fingerprint (a change means its files were replaced). A drive labelled with
    other settings or another teacher / refiner checkpoint has stale results.
    """
    from models.teacher import file_sha256
    from tasks.flow_estimation import flow_is_current
    from tasks.propagate import results_are_current
    from tasks.teacher_inference import teacher_is_current

    if seq is None:
        return "new drive"
    if seq.source_fingerprint is not None and source_fingerprint is not None \
            and seq.source_fingerprint != source_fingerprint:
        return "drive content changed"
    if not any(seq.stage_done(results_stage(m)) for m in settings.methods):
        return "not labelled yet"
    needs_flow = any(m != "semantic-only" for m in settings.methods)
    if needs_flow and settings.flow.backend != "exact" and not flow_is_current(seq, settings.flow):
        return "flow settings changed"
    if settings.teacher and not teacher_is_current(seq, file_sha256(Path(settings.teacher)), settings.adapt_steps):
        return "teacher checkpoint or adaptation changed"
    for method in settings.methods:
        refiner_hash = file_sha256(Path(settings.refiner)) if method == "warp-refine" and settings.refiner else None
        config = settings.propagation.model_copy(update={"method": method})
        if not results_are_current(seq, config, settings.flow.stored_name if needs_flow else None, refiner_hash):
            return f"{method} results missing or made with other settings"
    return None
