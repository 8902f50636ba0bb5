"""Files written whole or not at all: exports, reports, checkpoints, models.

Every file autolabel writes outside a store (PNGs, JSON reports, the CVAT zip, checkpoints, exported
teachers, plots) is written to a temporary file beside its target and renamed onto it: a killed or
interrupted command leaves either the old file or the new one, never half of one. The file gets the
permissions a plain ``open()`` would give it (``0o666`` less the umask), not ``mkstemp``'s
owner-only ``0o600``: exports and checkpoints are read by other people and services (a CVAT server,
a training job).
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@functools.cache
def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, which would race with
    threads creating files); where ``/proc`` is missing, set and restored once, on first use."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends,
    removed when it raises (Ctrl-C included). It keeps ``path``'s suffix, so writers that choose the
    format by extension (PIL, matplotlib, ``torch.export.save``) work unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and (not exc.filename or exc.filename == tmp):
            # PIL and zipfile name no file; the rename names the temporary one: name the file to write
            exc.filename, exc.filename2 = str(path), None
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_serialised(path: Path | str, serialise: Callable[[io.BytesIO], object]) -> None:
    """Write what ``serialise(file)`` writes to ``path``, serialising into memory first.

    torch's zip writer (``torch.save``, ``torch.export.save``) reports a failed write (a full disk) as
    ``RuntimeError: ... unexpected pos`` with a traceback; a plain write of the finished bytes raises
    the OSError that says what happened (ENOSPC, EFBIG). Through a file object, the archive's inner
    name is not the (temporary) file's name either, so the same content gives the same bytes.
    """
    buffer = io.BytesIO()
    serialise(buffer)
    with open(path, "wb") as fh:
        fh.write(buffer.getbuffer())


def write_serialised_atomic(path: Path | str, serialise: Callable[[io.BytesIO], object]) -> None:
    """:func:`write_serialised` to ``path``, whole or not at all."""
    with atomic_path(path) as tmp:
        write_serialised(tmp, serialise)
