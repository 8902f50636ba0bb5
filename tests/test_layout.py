"""The package layout: one namespace in site-packages, and imports that point one way.

Layers, top to bottom: cli -> flows -> tasks -> models, storage -> core (autolabel.errors,
registry, settings). A module may import its own layer and the layers below it; models imports
neither Prefect, zarr nor dask, and nothing below flows imports Prefect except the task wrappers.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYERS = {"core": 0, "models": 1, "storage": 1, "tasks": 2, "flows": 3, "cli": 4}
PREFECT_ALLOWED = {"tasks/stage_tasks.py"}


def _layer(path: Path) -> str:
    rel = path.relative_to(REPO)
    top = rel.parts[0]
    if top == "autolabel":
        return "cli" if rel.parts[1] == "cli" else "core"
    return top


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _target(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "autolabel":
        return None
    if len(parts) == 1 or parts[1] in ("errors", "registry", "settings"):
        return "core"
    return parts[1] if parts[1] in LAYERS else "core"


SOURCES = sorted(p for d in ("autolabel", "models", "storage", "tasks", "flows") for p in (REPO / d).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path: Path) -> None:
    layer = _layer(path)
    rel = str(path.relative_to(REPO))
    for module in _imports(path):
        top = module.split(".")[0]
        assert top not in ("models", "storage", "tasks", "flows"), f"{rel}: bare import {module!r}"
        target = _target(module)
        if target is not None and target != layer:
            assert LAYERS[target] < LAYERS[layer], f"{rel} ({layer}) imports {module} ({target}): upward"
            assert not (layer == "models" and target == "storage") and not (layer == "storage" and target == "models")
        if layer == "models":
            assert top not in ("prefect", "prefect_dask", "zarr", "dask"), f"{rel} imports {module}"
        if LAYERS[layer] <= LAYERS["tasks"] and rel not in PREFECT_ALLOWED:
            assert top not in ("prefect", "prefect_dask"), f"{rel} imports {module}: Prefect belongs in flows/"


def test_the_wheel_installs_only_the_autolabel_namespace(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name if src.exists() else (src.mkdir() or src / name))
    for package in ("autolabel", "models", "storage", "tasks", "flows"):
        shutil.copytree(REPO / package, src / package, ignore=ignore)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("autolabel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"autolabel", wheel.name.split("-py")[0] + ".dist-info"}
    for module in ("autolabel/models/propagation.py", "autolabel/storage/readers/davis.py",
                   "autolabel/tasks/pipeline.py", "autolabel/flows/label_sequence.py", "autolabel/cli/app.py"):
        assert module in names
