"""Command-line options shared by several commands, and the helpers that read config defaults.

``default(Model, "field")`` and ``describe(Model, "field")`` read a config field's default and
description, so a default changed in a config changes the CLI with it (the configs are the one
source). This module imports no config and no torch: the data commands (``ingest``, ``info``,
``verify``, ``export``, ...) use it and start without loading torch. The options of labelling
(method, K, flow, teacher, device) are in :mod:`autolabel.cli.label_options`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from autolabel.errors import ConfigError
from autolabel.runtime import set_threads as set_process_threads


def default(model: type[BaseModel], name: str) -> Any:
    """The default of config field ``name`` of ``model``."""
    return model.model_fields[name].get_default(call_default_factory=True)


def describe(model: type[BaseModel], name: str, extra: str = "") -> str:
    """The description of config field ``name`` (plus ``extra``), for an option's help."""
    text = model.model_fields[name].description or name.replace("_", " ")
    return f"{text} {extra}".strip()


def set_threads() -> None:
    """torch and OpenCV threads: ``$AUTOLABEL_THREADS`` (several processes sharing a machine), else every core."""
    set_process_threads()


def check_outside_store(out: Path | str | None, store: str, option: str = "--out") -> None:
    """ConfigError where the output folder ``out`` lies in the local store folder ``store``: the files
    would sit among the store's sequence groups, grow its size and travel with every copy of it."""
    if out is None or "://" in store:
        return
    root, target = Path(store).resolve(), Path(out).resolve()
    if target == root or root in target.parents:
        raise ConfigError(f"{option} {out} is inside the store {store}; write it to a folder outside the store "
                          f"(e.g. {root.parent / 'export'})")


def check_methods(methods: list[str], also: str = "") -> None:
    """RegistryError for a ``--method`` that names no propagation method (a typo, or ``gt`` where only
    methods are scored), listing the known ones; ``also`` adds the names a command takes besides.
    Imports torch (the methods are defined with it)."""
    from autolabel.errors import RegistryError
    from autolabel.models.propagation import METHODS

    for method in methods:
        try:
            METHODS.get(method)
        except RegistryError as exc:
            raise RegistryError(f"--method: {exc}{also}") from None


def parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like 480x360 (width x height), got {size!r}") from None
    if w < 16 or h < 16:
        raise ConfigError(f"--size {size} is too small (at least 16x16)")
    return w, h


Sequences = Annotated[list[str] | None, typer.Option("--sequence", help="only these sequences: ids or globs like "
                                                                        "'train_*' (repeatable)")]
Window = Annotated[int | None, typer.Option(help="annotate the centre frame of each N-frame window; other labels "
                                                 "are kept as evaluation ground truth")]
KeyframeEvery = Annotated[int | None, typer.Option(help="annotate frames 0, N, 2N, ...")]
