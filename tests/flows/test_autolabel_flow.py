"""The flows in-process (Prefect's temporary server): labelling, caching, staleness, failures, artifacts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from autolabel.storage.annotation import AnnotationPolicy
from autolabel.storage.store import SequenceStore
from autolabel.storage.synthetic import SyntheticConfig, drive_configs
from autolabel.storage.synthetic_io import write_apollo_layout

DRIVE = SyntheticConfig(width=64, height=48, frames=23, seed=0)
WINDOW = AnnotationPolicy(mode="window", n=21)


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny teacher and refiner for the ApolloScape class set, trained on two other drives."""
    from autolabel.models.optical_flow import FlowConfig
    from autolabel.models.refiner_training import RefinerTrainConfig
    from autolabel.models.teacher import Teacher
    from autolabel.models.teacher_training import TeacherTrainConfig, train_teacher
    from autolabel.storage.ingest import IngestOptions, ingest
    from autolabel.storage.readers import read_dataset
    from autolabel.storage.training_data import AnnotatedFrames
    from autolabel.tasks.refiner_training import (
        RefinerRequest,
        train_refiner_from_stores,
    )

    tmp = tmp_path_factory.mktemp("ckpt")
    write_apollo_layout(tmp / "inbox", drive_configs(2, DRIVE.model_copy(update={"seed": 50})))
    ingest(read_dataset("apollo", tmp / "inbox"), str(tmp / "train.zarr"), IngestOptions(annotation=WINDOW))
    store = SequenceStore.open(str(tmp / "train.zarr"))
    teacher = Teacher.create("unet-tiny", store.classes.names, [list(c) for c in store.classes.palette])
    train_teacher(teacher, AnnotatedFrames([store]), TeacherTrainConfig(arch="unet-tiny", max_steps=3, crop=64))
    teacher.save(tmp / "teacher.pt")
    train_refiner_from_stores(RefinerRequest(
        stores=[str(tmp / "train.zarr")], teacher=tmp / "teacher.pt", out=tmp / "refiner.pt",
        flow=FlowConfig(backend="dis-fast"),
        train=RefinerTrainConfig(arch="refine-tiny", steps=2, batch_size=2, crop=32, max_cycle=2)))
    return tmp / "teacher.pt", tmp / "refiner.pt"


def _request(tmp: Path, checkpoints: tuple[Path, Path], **kw):  # noqa: ANN003, ANN202
    from autolabel.flows.run_requests import AutolabelRequest, LabelSettings
    from autolabel.models.optical_flow import FlowConfig

    teacher, refiner = checkpoints
    return AutolabelRequest(store=str(tmp / "apollo.zarr"), inbox=str(tmp / "inbox"), annotation=WINDOW,
                            label=LabelSettings(teacher=str(teacher), refiner=str(refiner),
                                                flow=FlowConfig(backend="dis-fast"), export_dir=str(tmp / "export")),
                            **kw)


def _artifact(key: str):  # noqa: ANN202 - a prefect Artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key!r}"
    return max(found, key=lambda a: a.created)


def test_label_rerun_nightly_and_a_corrupt_drive(harness: None, checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    from autolabel.flows.autolabel_flow import autolabel_flow, relabel_new_drives_flow
    from autolabel.flows.label_sequence import label_sequence_flow
    from autolabel.flows.run_requests import DriveSource

    write_apollo_layout(tmp_path / "inbox", drive_configs(2, DRIVE))
    request = _request(tmp_path, checkpoints)
    first = autolabel_flow(request)
    ids = ["road01_Record001_Camera5", "road02_Record001_Camera5"]
    assert first["labelled"] == ids and first["failed"] == {}
    rows = first["report"].methods["warp-refine"].sequences
    assert [r.sequence for r in rows] == ids and all(r.has_gt and r.miou is not None and r.miou > 0 for r in rows)
    assert sorted({p.parent.parent.name for p in (tmp_path / "export").glob("*/overlay/*.png")}) == ids
    drives = json.loads(_artifact("apollo-drives").data)
    assert sorted(r["drive"] for r in drives) == ids
    values = [r["mIoU"] for r in drives]
    assert all(isinstance(v, float) for v in values) and values == sorted(values)  # numbers, worst first
    assert {r["basis"] for r in drives} == {"ground truth"} and all(r["worker"] != "-" for r in drives)
    store = SequenceStore.open(request.store)
    for r in drives:  # refine gain is a number; the row links to the drive's label-sequence run
        assert isinstance(r["refine gain"], float)
        assert r["run"].endswith(store.sequence(r["drive"]).stages["labelled"]["flow_run"]), r["run"]
    for key in ("apollo-miou-by-distance", "apollo-per-class-iou", "apollo-summary", "apollo-history",
                "apollo-figure-miou-by-distance", "apollo-figure-per-class-iou", "apollo-figure-worst-frame"):
        _artifact(key)
    assert _artifact("apollo-figure-worst-frame").data.startswith("data:image/png;base64,")
    assert first["headline"].startswith("warp-refine: 2 drives, true mIoU")

    # the same sequence again: every stage is served from the cache, nothing is computed
    again = label_sequence_flow(request.store, ids[0], request.label,
                                DriveSource(inbox=request.inbox, annotation=WINDOW))
    assert [s["cached"] or not s["computed"] for s in again["stages"]] == [True] * 9
    assert [s["stage"] for s in again["stages"] if s["cached"]] == [
        "flow/dis-fast", "teacher", "results/warp-refine", "estimate/warp-refine", "results/warp-inpaint",
        "estimate/warp-inpaint", "evaluation", "export"]

    # nightly: only the new drive; a drive with a corrupt frame fails alone and the summary lists it
    write_apollo_layout(tmp_path / "inbox", drive_configs(1, DRIVE.model_copy(update={"seed": 2})))
    bad = write_apollo_layout(tmp_path / "inbox", drive_configs(1, DRIVE.model_copy(update={"seed": 3})))[0]
    broken = sorted(bad.glob("*.jpg"))[5]
    broken.write_bytes(b"\xff\xd8 truncated")
    nightly = relabel_new_drives_flow(request)
    assert nightly["labelled"] == ["road03_Record001_Camera5"] and nightly["up_to_date"] == ids
    assert list(nightly["failed"]) == ["road04_Record001_Camera5"] and broken.name in nightly["failed"]["road04_Record001_Camera5"]
    summary = str(_artifact("apollo-summary").data)
    assert summary.split("\n")[2] == "## 1 drive failed" and "road04_Record001_Camera5" in summary
    history = json.loads(_artifact("apollo-history").data)
    assert [r["labelled"] for r in history] == [1, 2] and history[0]["failed"] == 1  # newest first
    drives = json.loads(_artifact("apollo-drives").data)
    assert {r["drive"]: r["change"] for r in drives}[ids[0]] == 0.0  # unchanged since the first run
    assert SequenceStore.open(request.store).sequence_ids() == ids + ["road03_Record001_Camera5"]


def test_a_baseline_through_the_flows_scores_its_own_k(harness: None, tmp_path: Path) -> None:
    """motion-only with the exact flow and K = 5: no teacher, and evaluation scores distances 1..5 only."""
    from autolabel.flows.autolabel_flow import autolabel_flow
    from autolabel.flows.run_requests import AutolabelRequest, LabelSettings
    from autolabel.models.optical_flow import FlowConfig
    from autolabel.models.propagation import PropagationConfig
    from autolabel.storage.synthetic_io import write_synthetic_store

    store = str(tmp_path / "synth.zarr")
    write_synthetic_store(store, drive_configs(2, DRIVE), WINDOW)
    settings = LabelSettings(propagation=PropagationConfig(method="motion-only", max_distance=5),
                             flow=FlowConfig(backend="exact"))
    result = autolabel_flow(AutolabelRequest(store=store, label=settings))
    assert result["failed"] == {} and result["labelled"] == ["synth-0000", "synth-0001"]
    report = result["report"]
    assert report.max_distance == 5 and list(report.methods) == ["motion-only"]
    assert list(report.methods["motion-only"].miou_by_distance) == ["1", "2", "3", "4", "5"]
    assert report.methods["motion-only"].frames_scored == 2 * 10
    seq = SequenceStore.open(store).sequence("synth-0000")
    assert "teacher" not in seq.stages and seq.stages["results/motion-only"]["settings"]["max_distance"] == 5


def test_settings_need_their_checkpoints_and_one_device() -> None:
    from autolabel.flows.run_requests import LabelSettings

    from autolabel.errors import ConfigError, RegistryError

    with pytest.raises(ConfigError, match="needs a refiner"):
        LabelSettings(propagation={"method": "warp-refine"}, teacher="t.pt")
    with pytest.raises(ConfigError, match="needs a teacher"):
        LabelSettings(propagation={"method": "warp-inpaint"})
    with pytest.raises(ConfigError, match="set the device once"):
        LabelSettings(propagation={"method": "motion-only", "device": "cuda"})
    settings = LabelSettings(propagation={"method": "motion-only"}, device="cuda")
    assert settings.propagation.device == settings.flow.device == "cuda"
    with pytest.raises(RegistryError, match="unknown flow backend 'dis-mediun'; known: dis-fast"):
        LabelSettings(propagation={"method": "motion-only"}, flow={"backend": "dis-mediun"})
    with pytest.raises(RegistryError, match="unknown propagation method 'warp-refin'"):
        LabelSettings(propagation={"method": "warp-refin"})


def test_a_fan_out_hands_the_workers_absolute_paths(harness: None, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`autolabel run runs/a.zarr --deployment ...` from the user's folder: the workers run in the
    repository, where a relative store path names another store (or, with an inbox, creates one)."""
    import autolabel.flows.autolabel_flow as parent
    from autolabel.flows.run_requests import AutolabelRequest, LabelSettings
    from autolabel.storage.synthetic_io import write_synthetic_store

    write_synthetic_store(str(tmp_path / "runs" / "a.zarr"), drive_configs(1, DRIVE.model_copy(update={"frames": 3})))
    sent: list[AutolabelRequest] = []

    def fan_out(request: AutolabelRequest, ids: list[str], *rest: object) -> tuple[dict, dict]:
        sent.append(request)
        return {}, dict.fromkeys(ids, "not submitted (test)")

    monkeypatch.setattr(parent, "_fan_out", fan_out)
    monkeypatch.chdir(tmp_path)
    result = parent.autolabel_flow(AutolabelRequest(
        store="runs/a.zarr", label_deployment="label-sequence/gpu",
        label=LabelSettings(propagation={"method": "motion-only"}, export_dir="~/export")))
    assert result["failed"] == {"synth-0000": "not submitted (test)"}
    assert sent[0].store == str(tmp_path / "runs" / "a.zarr")
    assert sent[0].label.export_dir == str(Path.home() / "export")


def test_a_drive_that_fails_on_a_full_disk_says_so_in_words() -> None:
    """The summary and dashboard listed `OSError: [Errno 28] No space left on device`."""
    import errno

    from autolabel.errors import StoreError
    from autolabel.flows.autolabel_flow import _state_error
    from prefect.states import Failed

    full = OSError(errno.ENOSPC, "No space left on device", "/data/s.zarr/sequences/a/zarr.json")
    assert _state_error(Failed(data=full)) == ("No space left on device (/data/s.zarr/sequences/a/zarr.json): "
                                               "the disk is full; free some space and run again")
    assert _state_error(Failed(data=StoreError("store 's' is locked"))) == "StoreError: store 's' is locked"


class TestAbsolutePaths:
    def test_local_paths_become_absolute_urls_and_none_stay(self, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        from autolabel.flows.run_requests import AutolabelRequest, LabelSettings

        monkeypatch.chdir(tmp_path)
        request = AutolabelRequest(store="s3://bucket/a.zarr", inbox="inbox", label=LabelSettings(
            propagation={"method": "warp-refine"}, teacher="ckpt/t.pt", teacher_map="ckpt/map.json",
            refiner=str(tmp_path / "r.pt"))).with_absolute_paths()
        assert (request.store, request.inbox) == ("s3://bucket/a.zarr", str(tmp_path / "inbox"))
        assert request.label.teacher == str(tmp_path / "ckpt" / "t.pt")
        assert request.label.teacher_map == str(tmp_path / "ckpt" / "map.json")
        assert request.label.refiner == str(tmp_path / "r.pt") and request.label.export_dir is None


class TestPathRoots:
    """Deployments read and write only under the configured roots (``$AUTOLABEL_*_ROOTS``)."""

    def _request(self, store: str, inbox: str | None = None, export: str | None = None):  # noqa: ANN202
        from autolabel.flows.run_requests import AutolabelRequest, LabelSettings

        return AutolabelRequest(store=store, inbox=inbox,
                                label=LabelSettings(propagation={"method": "motion-only"}, export_dir=export))

    def test_paths_under_the_roots_pass(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AUTOLABEL_STORE_ROOTS", f"{tmp_path / 'stores'}:s3://bucket/stores")
        monkeypatch.setenv("AUTOLABEL_INBOX_ROOTS", str(tmp_path / "inbox"))
        monkeypatch.setenv("AUTOLABEL_EXPORT_ROOTS", str(tmp_path / "export"))
        self._request(str(tmp_path / "stores" / "a.zarr"), str(tmp_path / "inbox" / "new"),
                      str(tmp_path / "export" / "x")).check_paths()
        self._request("s3://bucket/stores/a.zarr").check_paths()

    @pytest.mark.parametrize("store", ["{tmp}/elsewhere.zarr", "{tmp}/stores/../elsewhere.zarr",
                                       "s3://bucket/other/a.zarr", "s3://bucket/stores/../x.zarr",
                                       "{tmp}/stores-evil/a.zarr"])
    def test_paths_outside_are_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str) -> None:
        from autolabel.errors import ConfigError

        monkeypatch.setenv("AUTOLABEL_STORE_ROOTS", f"{tmp_path / 'stores'}:s3://bucket/stores")
        with pytest.raises(ConfigError, match="store path .* (outside the allowed roots|contains '..')"):
            self._request(store.format(tmp=tmp_path)).check_paths()

    def test_a_symlink_out_of_a_root_is_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from autolabel.errors import ConfigError

        (tmp_path / "stores").mkdir()
        (tmp_path / "stores" / "link").symlink_to(tmp_path / "secret", target_is_directory=True)
        monkeypatch.setenv("AUTOLABEL_STORE_ROOTS", str(tmp_path / "stores"))
        monkeypatch.setenv("AUTOLABEL_EXPORT_ROOTS", str(tmp_path / "export"))
        with pytest.raises(ConfigError, match="outside the allowed roots"):
            self._request(str(tmp_path / "stores" / "link" / "a.zarr")).check_paths()
        with pytest.raises(ConfigError, match="export path"):
            self._request(str(tmp_path / "stores" / "a.zarr"), export="/etc/cron.d").check_paths()
