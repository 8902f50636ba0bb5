"""Files written whole or not at all, with the permissions a plain open() gives (autolabel.atomic)."""

from __future__ import annotations

import errno
import os
import resource
import stat
from pathlib import Path

import numpy as np
import pytest
from autolabel.atomic import _umask, atomic_path, write_serialised_atomic, write_text_atomic

from tests.conftest import run_cli


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _expected_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class TestAtomicPath:
    def test_smoke_writes_the_file_with_open_permissions(self, tmp_path: Path) -> None:
        target = tmp_path / "deep" / "report.json"
        write_text_atomic(target, "{}")
        assert target.read_text() == "{}"
        assert _mode(target) == _expected_mode() == 0o666 & ~_umask()  # not mkstemp's 0o600
        assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]

    def test_a_failure_keeps_the_old_file_and_leaves_no_temporary(self, tmp_path: Path) -> None:
        target = tmp_path / "queue.json"
        target.write_text("old")
        for error in (RuntimeError("disk"), KeyboardInterrupt()):
            with pytest.raises(type(error)), atomic_path(target) as tmp:
                tmp.write_text("half")
                raise error
        assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["queue.json"]

    def test_the_temporary_keeps_the_suffix(self, tmp_path: Path) -> None:
        """Writers that pick the format by extension (matplotlib, torch.export.save) see it."""
        with atomic_path(tmp_path / "miou_by_distance.png") as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name.startswith(".")
            tmp.write_bytes(b"x")
        assert (tmp_path / "miou_by_distance.png").read_bytes() == b"x"


    def test_an_os_error_without_a_file_name_gets_the_target_s(self, tmp_path: Path) -> None:
        """PIL and zipfile raise ENOSPC without a file name; the message should say which file."""
        with pytest.raises(OSError) as caught, atomic_path(tmp_path / "a.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        assert caught.value.filename == str(tmp_path / "a.png")


    def test_a_folder_at_the_target_is_named_not_the_temporary(self, tmp_path: Path) -> None:
        """The rename onto a folder failed naming the temporary file (``.out.x1y2.tmp``)."""
        (tmp_path / "out").mkdir()
        with pytest.raises(OSError) as caught, atomic_path(tmp_path / "out") as tmp:
            tmp.write_text("x")
        assert caught.value.filename == str(tmp_path / "out") and caught.value.filename2 is None
        assert [p.name for p in tmp_path.iterdir()] == ["out"]


class TestWriteSerialisedAtomic:
    def test_smoke_torch_save_round_trips(self, tmp_path: Path) -> None:
        torch = pytest.importorskip("torch")
        write_serialised_atomic(tmp_path / "c.pt", lambda fh: torch.save({"w": torch.arange(3)}, fh))
        assert torch.load(tmp_path / "c.pt", weights_only=True)["w"].tolist() == [0, 1, 2]

    def test_a_failed_write_is_the_os_error_not_torch_s_runtime_error(self, tmp_path: Path) -> None:
        """torch.save straight to a file that cannot grow (a full disk; here ``ulimit -f``) raised
        ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos`` and a traceback."""
        torch = pytest.importorskip("torch")
        target = tmp_path / "c.pt"
        target.write_bytes(b"old")
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # Python ignores SIGXFSZ: writes fail
        try:
            with pytest.raises(OSError) as caught:
                write_serialised_atomic(target, lambda fh: torch.save({"w": torch.zeros(10_000)}, fh))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert caught.value.errno == errno.EFBIG and caught.value.filename == str(target)
        assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_exports_and_checkpoints_are_readable_by_others(tmp_path: Path) -> None:
    """Exported PNGs and checkpoints used to be owner-only (0o600): a CVAT server or a training job
    running as another user could not read them."""
    store = str(tmp_path / "s.zarr")
    assert run_cli("synth", store, "--sequences", "1", "--frames", "3", "--size", "64x48").returncode == 0
    done = run_cli("export", store, "--method", "gt", "--out", str(tmp_path / "png"), "--overlay")
    assert done.returncode == 0, done.stderr
    done = run_cli("train-teacher", "--store", store, "--out", str(tmp_path / "t.pt"), "--arch", "unet-tiny",
                   "--max-steps", "1", "--batch-size", "1", "--crop", "64")
    assert done.returncode == 0, done.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "s.zarr" not in p.parts]
    assert len(written) >= 10 and any(p.suffix == ".pt" for p in written)
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(_expected_mode()) for p in written}
    assert not [p for p in written if ".tmp" in p.name]
    assert np.all([p.stat().st_size > 0 for p in written])
