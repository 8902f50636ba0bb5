"""CamVid, SegNet layout: ``<split>/*.png`` frames beside ``<split>annot/*.png`` labels.

File names are ``<drive>_<number>.png`` (``0016E5_07959.png``, ``Seq05VD_f00000.png``).
Frames of one drive whose numbers are at most ``MAX_GAP`` apart form one sequence (the 15 Hz
``dense`` split steps by 2 in the 30 Hz numbering); isolated 1 Hz keyframes (``train``) become
one-frame sequences. Labels hold classes 0..10; 11 (Void) becomes the ignore index.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from autolabel.errors import UnknownLayoutError
from autolabel.storage.classes import CAMVID11, lookup_table
from autolabel.storage.ids import make_sequence_id
from autolabel.storage.readers import READERS
from autolabel.storage.readers.base import (
    DatasetSource,
    FrameFile,
    ImageFileSequence,
    LutLabelDecoder,
    ReaderOptions,
    consecutive_runs,
    list_images,
)

MAX_GAP = 2
SOURCE_FPS = 30.0
_NAME = re.compile(r"^(?P<drive>.+)_(?P<prefix>[A-Za-z]*)(?P<num>\d+)$")
_LUT = lookup_table({**{i: i for i in range(11)}, 11: CAMVID11.ignore_index})


def _splits(root: Path) -> list[str]:
    if not root.is_dir():
        raise UnknownLayoutError(f"{root}: not a directory (camvid expects <split>/ and <split>annot/)")
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.endswith("annot") and (root / f"{p.name}annot").is_dir())


@READERS.register("camvid")
def read_camvid(root: Path, options: ReaderOptions) -> DatasetSource:
    splits = _splits(root)
    if not splits:
        raise UnknownLayoutError(
            f"{root}: no CamVid split found; expected folders like train/ + trainannot/ "
            "(SegNet layout) directly under the source"
        )
    sequences = []
    decoder = LutLabelDecoder(_LUT)
    for split in splits:
        groups: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for image in list_images(root / split):
            m = _NAME.match(image.stem)
            if m is None:
                raise UnknownLayoutError(f"{image}: CamVid frame names look like <drive>_<number>.png")
            groups[m["drive"]].append((int(m["num"]), image))
        for _drive, frames in sorted(groups.items()):
            for run in consecutive_runs(frames, MAX_GAP):
                files = []
                for _, image in run:
                    label = root / f"{split}annot" / image.name
                    files.append(FrameFile(image.stem, image, label if label.is_file() else None))
                gap = run[1][0] - run[0][0] if len(run) > 1 else None
                sequences.append(ImageFileSequence(
                    id=make_sequence_id(split, run[0][1].stem), source=str(root / split),
                    fps=SOURCE_FPS / gap if gap else None, frames=files, decode_label=decoder,
                ))
    return DatasetSource("camvid", root, CAMVID11, sequences)
