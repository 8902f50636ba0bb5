"""The pydantic request the parent flows take (also the deployments' parameters).

How each sequence is labelled (method, K, device, checkpoints, stage settings) is
:class:`~autolabel.tasks.pipeline.LabelSettings`, the same value ``autolabel label`` builds.
"""

from __future__ import annotations

from autolabel.flows.dashboard import DashboardSettings
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.tasks.pipeline import DriveSource, LabelSettings
from pydantic import BaseModel, ConfigDict, Field

from autolabel.settings import absolute_local, confine


class AutolabelRequest(BaseModel):
    """One ``autolabel`` run: optional ingest of an inbox, then one label-sequence run per sequence."""

    model_config = ConfigDict(frozen=True)

    store: str = Field(description="the Zarr store (path or fsspec URL shared by all workers)")
    inbox: str | None = Field(None, description="folder of new drives to ingest first")
    layout: str = Field("apollo", description="the inbox's dataset layout (apollo, camvid, davis, cityscapes, folder)")
    annotation: AnnotationPolicy = Field(AnnotationPolicy(), description="which labelled frames are annotations")
    sequences: list[str] | None = Field(None, description="only these sequence ids or globs")
    label: LabelSettings = Field(description="method, K, device, checkpoints and stage settings")
    only_stale: bool = Field(False, description="label only drives that are new, changed, or labelled with "
                                                "other settings or checkpoints (nightly)")
    label_deployment: str | None = Field(
        None, description="fan out through this deployment (e.g. 'label-sequence/gpu') so workers of its pool "
                          "take the sequences; None runs them in this process")
    segment_deployment: str | None = Field(
        "label-segment/gpu", description="with label_deployment: the deployment that runs the segment jobs of drives "
                                         "longer than label.segment_frames")
    resubmit_crashed: int = Field(2, ge=0, description="re-submit a sequence whose run crashed (lost worker) this often")
    poll_seconds: float = Field(2.0, gt=0, description="how often the parent checks its sequence and segment runs "
                                                        "(each phase of a long drive waits for its last job)")
    dashboard: DashboardSettings = Field(DashboardSettings(), description="what the dashboard flags and keeps")
    watchdog_seconds: float | None = Field(
        None, gt=0, description="a running sequence run silent (no heartbeat) this long is marked Crashed and "
                                "re-submitted; default 2.5 x PREFECT_FLOWS_HEARTBEAT_FREQUENCY")

    def check_paths(self) -> None:
        """Refuse a store, inbox or export path outside the roots the workers allow (``confine``)."""
        confine_paths(self.store, self.inbox, self.label.export_dir)

    def with_absolute_paths(self) -> AutolabelRequest:
        """This request with its local paths (store, inbox, checkpoints, class map, export folder) made
        absolute against this process's folder: the runs it submits execute on workers in other
        folders, where ``runs/a.zarr`` would name another store, or create one."""
        label = self.label.model_copy(update={name: absolute_local(getattr(self.label, name))
                                              for name in ("teacher", "teacher_map", "refiner", "export_dir")})
        return self.model_copy(update={"store": absolute_local(self.store), "inbox": absolute_local(self.inbox),
                                       "label": label})

    def source(self, seq_id: str, drives: set[str]) -> DriveSource | None:
        """Where the label-sequence run of ``seq_id`` ingests it from (None: already in the store)."""
        if self.inbox is None or seq_id not in drives:
            return None
        return DriveSource(inbox=self.inbox, layout=self.layout, annotation=self.annotation)


def confine_paths(store: str, inbox: str | None, export_dir: str | None) -> None:
    """Every path a run writes or reads data from must lie under its configured root
    (``$AUTOLABEL_STORE_ROOTS``, ``$AUTOLABEL_INBOX_ROOTS``, ``$AUTOLABEL_EXPORT_ROOTS``)."""
    confine(store, "store")
    confine(inbox, "inbox")
    confine(export_dir, "export")


__all__ = ["AutolabelRequest", "DriveSource", "LabelSettings"]
