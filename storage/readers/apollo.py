"""ApolloScape scene parsing: ``<road>/ColorImage/<Record>/<Camera N>/<stamp>_Camera_N.jpg``.

Labels are ``<road>/Label/<Record>/<Camera N>/<stamp>_Camera_N_bin.png`` holding ApolloScape
class ids (the official label list), mapped to its train ids (22 classes; groups merge with
their single-object class; others / rover / bridge / tunnel / overpass / unlabeled -> ignore).
One sequence per (road, record, camera). The source is either a folder of road folders or a
single road folder. Frame rate comes from the time stamps in the file names when they parse.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from autolabel.errors import UnknownLayoutError
from autolabel.storage.classes import APOLLO22, APOLLO_ID_TO_TRAIN, lookup_table
from autolabel.storage.ids import make_sequence_id
from autolabel.storage.readers import READERS
from autolabel.storage.readers.base import (
    DatasetSource,
    FrameFile,
    ImageFileSequence,
    LutLabelDecoder,
    ReaderOptions,
    list_images,
)

_LUT = lookup_table(APOLLO_ID_TO_TRAIN)
_STAMP = re.compile(r"^\d{6}_(?P<h>\d{2})(?P<m>\d{2})(?P<s>\d{2})(?P<ms>\d{3})_")


def _fps_from_names(names: list[str]) -> float | None:
    """Median frame rate from ``YYMMDD_HHMMSSmmm_...`` stamps, or None when they do not parse."""
    seconds = []
    for name in names:
        m = _STAMP.match(name)
        if m is None:
            return None
        seconds.append(int(m["h"]) * 3600 + int(m["m"]) * 60 + int(m["s"]) + int(m["ms"]) / 1000)
    steps = np.diff(seconds)
    steps = steps[steps > 0]
    return round(float(1.0 / np.median(steps)), 3) if steps.size else None


def _roads(root: Path) -> list[Path]:
    if (root / "ColorImage").is_dir():
        return [root]
    if not root.is_dir():
        raise UnknownLayoutError(f"{root}: not a directory")
    roads = sorted(p for p in root.iterdir() if (p / "ColorImage").is_dir())
    if not roads:
        raise UnknownLayoutError(
            f"{root}: no ApolloScape road found; expected <road>/ColorImage/<Record>/<Camera N>/*.jpg "
            "and <road>/Label/<Record>/<Camera N>/*_bin.png"
        )
    return roads


@READERS.register("apollo")
def read_apollo(root: Path, options: ReaderOptions) -> DatasetSource:
    decoder = LutLabelDecoder(_LUT)
    sequences = []
    for road in _roads(root):
        for record in sorted(p for p in (road / "ColorImage").iterdir() if p.is_dir()):
            for camera in sorted(p for p in record.iterdir() if p.is_dir()):
                label_dir = road / "Label" / record.name / camera.name
                files = []
                for image in list_images(camera):
                    label = label_dir / f"{image.stem}_bin.png"
                    files.append(FrameFile(image.stem, image, label if label.is_file() else None))
                sequences.append(ImageFileSequence(
                    id=make_sequence_id(road.name, record.name, camera.name), source=str(camera),
                    fps=options.fps or _fps_from_names([f.name for f in files]), frames=files,
                    decode_label=decoder,
                ))
    return DatasetSource("apollo", root, APOLLO22, sequences)
