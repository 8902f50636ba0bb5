"""Checkpoint files shared by the teacher and the refiner: atomic writes, safe reads, content hashes.

A checkpoint is a plain dict of tensors, strings and numbers tagged with a ``format`` and a
``format_version``; it is read with ``torch.load(weights_only=True)``, so no code runs on load.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import torch

from autolabel.atomic import write_serialised_atomic
from autolabel.errors import CheckpointError


def portable_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s weights on the CPU in the standard (contiguous) layout, whatever layout the net runs
    in (channels_last): the same weights always make the same checkpoint bytes, and the same sha256."""
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in net.state_dict().items()}


def check_checkpoint_path(path: Path | str, what: str) -> None:
    """Fail before any training where ``path`` cannot become a checkpoint file: it is a folder (the
    rename onto it failed only when the training was done)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: name the {what} checkpoint file to write, e.g. "
                              f"{path / (what + '.pt')}")


def save_checkpoint(state: dict[str, Any], path: Path) -> str:
    """Write ``state`` to ``path`` atomically (temporary file + rename); returns the file's sha256."""
    path = Path(path)
    write_serialised_atomic(path, lambda fh: torch.save(state, fh))
    return file_sha256(path)


def load_checkpoint(path: Path, fmt: str, version: int, what: str, how_to_make: str) -> dict[str, Any]:
    """Read a checkpoint of format ``fmt`` / ``version``; CheckpointError names the file and the fix.

    Args:
        what: what the file should be, for messages ("teacher").
        how_to_make: the command that writes one ("autolabel train-teacher").
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} checkpoint not found; train one with `{how_to_make}`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and safety errors all mean 'unusable'
        reason = why_unreadable(path) or f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        raise CheckpointError(f"{path}: cannot read {what} checkpoint: {reason}; copy it again or write a new "
                              f"one with `{how_to_make}`") from exc
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise CheckpointError(f"{path}: not an autolabel {what} checkpoint")
    if state.get("format_version") != version:
        raise CheckpointError(f"{path}: {what} checkpoint version {state.get('format_version')} is not "
                              f"{version}; retrain it with this autolabel (`{how_to_make}`)")
    return state


def why_unreadable(path: Path, writer: str = "torch.save") -> str | None:
    """Why the zip archive at ``path`` (what ``writer`` writes) cannot be read, in words; None where
    its bytes look whole (then the loader's own error says more)."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == b"PK\x03\x04":
        return None if zipfile.is_zipfile(path) else f"the archive is cut short or damaged ({size} bytes)"
    if head.startswith(b"\x80") and writer == "torch.save":  # torch.save's legacy pickle format
        return None
    return f"not a file written by {writer}"


def load_weights(net: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Load ``state_dict`` into ``net``; CheckpointError when it does not fit the architecture."""
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit architecture {arch!r} ({exc})") from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
