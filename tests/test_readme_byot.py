"""The README's 'Bring your own teacher' section, run as written (python and shell blocks in order)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from autolabel.models.refiner import Refiner
from autolabel.storage.store import SequenceStore

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text[text.index("<!-- byot-begin -->"):text.index("<!-- byot-end -->")]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def test_readme_bring_your_own_teacher_runs_as_written(tmp_path: Path) -> None:
    blocks = _blocks()
    assert [kind for kind, _ in blocks] == ["python", "json", "bash", "bash"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "COLUMNS": "100"}
    shown_sidecar = None
    for i, (kind, code) in enumerate(blocks):
        if kind == "json":
            shown_sidecar = json.loads(code)
            continue
        if kind == "python":
            script = tmp_path / f"block{i}.py"
            script.write_text(code)
            cmd = [sys.executable, str(script)]
        else:
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, f"README block {i} ({kind}) failed:\n{result.stdout}\n{result.stderr}"

    byot = tmp_path / "byot"
    written = json.loads((byot / "segmenter.onnx.json").read_text())
    assert shown_sidecar is not None
    for key in ("format", "version", "input", "outputs"):
        assert shown_sidecar[key] == written[key], f"the README's sidecar differs from the written one in {key!r}"
    assert len(written["classes"]) == 19 and written["classes"][-1] == shown_sidecar["classes"][-1]

    store = SequenceStore.open(str(byot / "drives.zarr"))
    seq = store.sequence(store.sequence_ids()[0])
    for method in ("warp-inpaint", "warp-refine"):
        distance = np.asarray(seq.array(f"results/{method}/distance")[:])
        assert (distance >= 0).sum() == 21  # window 21, K = 10
    refiner = Refiner.load(byot / "refiner.pt")
    assert refiner.teacher_input == "probabilities" and refiner.net.feature_channels == 12  # 11 classes + unknown
    manifest = (byot / "train-set" / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 21 and sum(",True," in row for row in manifest) == 1  # one keyframe, marked
    assert list((byot / "train-set" / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"))
