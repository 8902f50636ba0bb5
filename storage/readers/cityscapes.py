"""Cityscapes sequences: ``leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png``.

Each 30-frame snippet (consecutive frame numbers of one ``<city>_<seq>``) is a sequence. Its
20th frame carries the gtFine label ``gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png``
(or ``..._labelIds.png``, mapped to the 19 train ids; void ids become the ignore index).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autolabel.storage.classes import CITYSCAPES19, CITYSCAPES_ID_TO_TRAIN, lookup_table
from autolabel.storage.ids import make_sequence_id
from autolabel.storage.images import map_label, read_label_raw
from autolabel.storage.readers import READERS
from autolabel.storage.readers.base import (
    DatasetSource,
    FrameFile,
    ImageFileSequence,
    LabelDecoder,
    ReaderOptions,
    consecutive_runs,
    require_dir,
)

CITYSCAPES_FPS = 17.0
_NAME = re.compile(r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})_leftImg8bit$")
_TRAIN_LUT = lookup_table({**{i: i for i in range(19)}, 255: 255})
_ID_LUT = lookup_table({i: CITYSCAPES_ID_TO_TRAIN.get(i, 255) for i in range(34)})


@dataclass(frozen=True)
class CityscapesLabelDecoder(LabelDecoder):
    """Reads ``*_labelTrainIds.png`` as is and maps ``*_labelIds.png`` to train ids."""

    def __call__(self, path: Path) -> np.ndarray:
        lut = _TRAIN_LUT if path.name.endswith("_labelTrainIds.png") else _ID_LUT
        return map_label(read_label_raw(path), lut, path)


def _label_for(gt_dir: Path, stem: str) -> Path | None:
    base = stem.removesuffix("_leftImg8bit")
    for suffix in ("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png"):
        candidate = gt_dir / f"{base}{suffix}"
        if candidate.is_file():
            return candidate
    return None


@READERS.register("cityscapes")
def read_cityscapes(root: Path, options: ReaderOptions) -> DatasetSource:
    seq_root = require_dir(root / "leftImg8bit_sequence", "cityscapes",
                           "leftImg8bit_sequence/<split>/<city>/*_leftImg8bit.png and gtFine/")
    decoder = CityscapesLabelDecoder()
    sequences = []
    for split_dir in sorted(p for p in seq_root.iterdir() if p.is_dir()):
        for city_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            snippets: dict[str, list[tuple[int, Path]]] = defaultdict(list)
            for image in sorted(city_dir.glob("*_leftImg8bit.png")):
                m = _NAME.match(image.stem)
                if m:
                    snippets[m["seq"]].append((int(m["frame"]), image))
            gt_dir = root / "gtFine" / split_dir.name / city_dir.name
            for seq, frames in sorted(snippets.items()):
                for run in consecutive_runs(frames, max_gap=1):
                    files = [FrameFile(img.stem.removesuffix("_leftImg8bit"), img, _label_for(gt_dir, img.stem))
                             for _, img in run]
                    sequences.append(ImageFileSequence(
                        id=make_sequence_id(split_dir.name, city_dir.name, seq, f"{run[0][0]:06d}"),
                        source=str(city_dir), fps=options.fps or CITYSCAPES_FPS, frames=files,
                        decode_label=decoder,
                    ))
    return DatasetSource("cityscapes", root, CITYSCAPES19, sequences)
