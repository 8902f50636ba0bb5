"""Dataset readers, registered by layout name (``autolabel ingest FORMAT ...`` picks one).

A reader is a function ``(root: Path, options: ReaderOptions) -> DatasetSource``. It only
lists files; frames are decoded later, one at a time, while ingest writes them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from autolabel.registry import Registry
from autolabel.storage.readers.base import DatasetSource, ReaderOptions

Reader = Callable[[Path, ReaderOptions], DatasetSource]
READERS: Registry[Reader] = Registry("dataset layout")

# importing the modules registers them
from autolabel.storage.readers import apollo, camvid, cityscapes, davis, folder  # noqa: E402,F401


def read_dataset(layout: str, root: Path | str, options: ReaderOptions | None = None) -> DatasetSource:
    """Run the reader registered as ``layout`` on ``root``."""
    return READERS.get(layout)(Path(root), options or ReaderOptions())


__all__ = ["READERS", "DatasetSource", "ReaderOptions", "read_dataset"]
