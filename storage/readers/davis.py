"""DAVIS: ``JPEGImages/<seq>/*.jpg`` with masks ``Annotations/<seq>/*.png`` (0 / 255).

Mask value 255 becomes class 1 (object), 0 stays background. The official release's extra
``480p/`` level (``JPEGImages/480p/<seq>``) is accepted too.
"""

from __future__ import annotations

from pathlib import Path

from autolabel.storage.classes import DAVIS_BINARY, lookup_table
from autolabel.storage.ids import make_sequence_id
from autolabel.storage.readers import READERS
from autolabel.storage.readers.base import (
    DatasetSource,
    FrameFile,
    ImageFileSequence,
    LutLabelDecoder,
    ReaderOptions,
    list_images,
    require_dir,
)

DAVIS_FPS = 24.0
_LUT = lookup_table({0: 0, 255: 1})


@READERS.register("davis")
def read_davis(root: Path, options: ReaderOptions) -> DatasetSource:
    images = require_dir(root / "JPEGImages", "davis", "JPEGImages/<sequence>/*.jpg and Annotations/")
    annotations = root / "Annotations"
    if (images / "480p").is_dir():
        images, annotations = images / "480p", annotations / "480p"
    decoder = LutLabelDecoder(_LUT)
    sequences = []
    for seq_dir in sorted(p for p in images.iterdir() if p.is_dir()):
        files = []
        for image in list_images(seq_dir):
            label = annotations / seq_dir.name / f"{image.stem}.png"
            files.append(FrameFile(image.stem, image, label if label.is_file() else None))
        sequences.append(ImageFileSequence(
            id=make_sequence_id(seq_dir.name), source=str(seq_dir), fps=options.fps or DAVIS_FPS,
            frames=files, decode_label=decoder,
        ))
    return DatasetSource("davis", root, DAVIS_BINARY, sequences)
