"""Class sets: class names, display palette and ignore index, plus the built-in sets.

Label arrays everywhere hold class indices ``0..C-1`` and ``ignore_index`` (255 by default)
for void / unlabelled pixels.
"""

from __future__ import annotations

from typing import Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from autolabel.errors import ConfigError

IGNORE_INDEX = 255
RGB = tuple[int, int, int]


class ClassSet(BaseModel):
    """The classes of one store: ``names[i]`` is class ``i``, drawn in ``palette[i]``."""

    model_config = ConfigDict(frozen=True)

    names: list[str] = Field(min_length=1)
    palette: list[RGB]
    ignore_index: int = IGNORE_INDEX

    @model_validator(mode="after")
    def _check(self) -> Self:
        if len(self.palette) != len(self.names):
            raise ConfigError(
                f"class set has {len(self.names)} names but {len(self.palette)} palette colours"
            )
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"class names must be unique, got {self.names}")
        if not len(self.names) <= self.ignore_index <= 255:
            raise ConfigError(
                f"ignore_index {self.ignore_index} must lie in {len(self.names)}..255 so it never "
                "collides with a class index"
            )
        for colour in self.palette:
            if any(not 0 <= c <= 255 for c in colour):
                raise ConfigError(f"palette colour {colour} is not an 8-bit RGB triple")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def colour_lut(self, ignore_colour: RGB = (0, 0, 0)) -> np.ndarray:
        """A (256, 3) uint8 table mapping every label value to its display colour."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[:] = ignore_colour
        lut[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return lut


def _hex(colour: int) -> RGB:
    return ((colour >> 16) & 255, (colour >> 8) & 255, colour & 255)


CAMVID11 = ClassSet(
    names=["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
           "Pedestrian", "Bicyclist"],
    palette=[(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
             (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
             (0, 128, 192)],
)
"""CamVid's 11 classes (SegNet version); raw value 11 (Void) becomes the ignore index."""

DAVIS_BINARY = ClassSet(names=["background", "object"], palette=[(0, 0, 0), (220, 20, 60)])

CITYSCAPES19 = ClassSet(
    names=["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
           "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
           "bus", "train", "motorcycle", "bicycle"],
    palette=[(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
             (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
             (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
             (0, 80, 100), (0, 0, 230), (119, 11, 32)],
)

# Cityscapes labelIds (0..33) -> trainIds; ids not listed are void (ignore).
CITYSCAPES_ID_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# ApolloScape scene parsing, the official label list: (name, id, trainId, colour).
# "*_group" classes share their single-object class's train id; others/rover/bridge/tunnel/
# overpass/unlabeled are ignored in evaluation (train id 255).
APOLLO_LABELS: list[tuple[str, int, int, int]] = [
    ("others", 0, 255, 0x000000), ("rover", 1, 255, 0x000000), ("sky", 17, 0, 0x4682B4),
    ("car", 33, 1, 0x00008E), ("car_groups", 161, 1, 0x00008E),
    ("motorbicycle", 34, 2, 0x0000E6), ("motorbicycle_group", 162, 2, 0x0000E6),
    ("bicycle", 35, 3, 0x770B20), ("bicycle_group", 163, 3, 0x770B20),
    ("person", 36, 4, 0x0080C0), ("person_group", 164, 4, 0x0080C0),
    ("rider", 37, 5, 0x804080), ("rider_group", 165, 5, 0x804080),
    ("truck", 38, 6, 0x8000C0), ("truck_group", 166, 6, 0x8000C0),
    ("bus", 39, 7, 0xC00040), ("bus_group", 167, 7, 0xC00040),
    ("tricycle", 40, 8, 0x8080C0), ("tricycle_group", 168, 8, 0x8080C0),
    ("road", 49, 9, 0xC080C0), ("siderwalk", 50, 10, 0xC08040),
    ("traffic_cone", 65, 11, 0x000040), ("road_pile", 66, 12, 0x0000C0),
    ("fence", 67, 13, 0x404080), ("traffic_light", 81, 14, 0xC04080), ("pole", 82, 15, 0xC08080),
    ("traffic_sign", 83, 16, 0x004040), ("wall", 84, 17, 0xC0C080), ("dustbin", 85, 18, 0x4000C0),
    ("billboard", 86, 19, 0xC000C0), ("building", 97, 20, 0xC00080),
    ("bridge", 98, 255, 0x808000), ("tunnel", 99, 255, 0x800000), ("overpass", 100, 255, 0x408040),
    ("vegatation", 113, 21, 0x808040), ("unlabeled", 255, 255, 0xFFFFFF),
]


def _apollo_class_set() -> ClassSet:
    by_train: dict[int, tuple[str, RGB]] = {}
    for name, _id, train, colour in APOLLO_LABELS:
        if train != 255 and train not in by_train:
            by_train[train] = (name, _hex(colour))
    order = sorted(by_train)
    if order != list(range(len(order))):
        raise AssertionError("ApolloScape train ids must be contiguous")
    return ClassSet(names=[by_train[i][0] for i in order], palette=[by_train[i][1] for i in order])


APOLLO22 = _apollo_class_set()
APOLLO_ID_TO_TRAIN: dict[int, int] = {i: t for _, i, t, _ in APOLLO_LABELS}

BUILTIN_CLASS_SETS: dict[str, ClassSet] = {
    "camvid11": CAMVID11,
    "davis": DAVIS_BINARY,
    "cityscapes19": CITYSCAPES19,
    "apollo22": APOLLO22,
}


def lookup_table(mapping: dict[int, int], source_size: int = 256) -> np.ndarray:
    """A (source_size,) int16 table from raw label values to class ids; -1 marks invalid values."""
    lut = np.full(source_size, -1, dtype=np.int16)
    for raw, mapped in mapping.items():
        lut[raw] = mapped
    return lut
