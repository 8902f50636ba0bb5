"""Strict decoding of frames and label images, and atomic PNG writing.

Decoding is strict: a truncated or corrupt file raises :class:`ImageReadError` naming the file,
rather than yielding a half-grey image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from autolabel.atomic import atomic_path
from autolabel.errors import ImageReadError, LabelValueError, SizeMismatchError

Image.MAX_IMAGE_PIXELS = 200_000_000  # ApolloScape frames are 3384x2710; refuse absurd sizes


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file into an RGB array.

    Returns:
        uint8 array of shape (H, W, 3).
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                return _gray16_to_rgb(np.asarray(img), path)
            if img.mode in ("F", "I;32", "I;32B"):
                raise ImageReadError(f"{path}: {img.mode} frames (float or 32-bit) are not supported; convert "
                                     "the frames to 8- or 16-bit PNG/JPEG")
            if img.mode != "RGB":  # 16-bit colour PNGs already decode to 8-bit RGB (high bytes)
                img = img.convert("RGB")
            return np.asarray(img)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: frame file not found") from None
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(
            f"{path}: cannot decode image ({exc}); the file is truncated or corrupt - "
            "replace it or leave its sequence out with --sequence"
        ) from exc


def _gray16_to_rgb(values: np.ndarray, path: Path) -> np.ndarray:
    """A 16-bit grey frame scaled to 8 bits (the high byte), as RGB (H, W, 3) uint8."""
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
        raise ImageReadError(f"{path}: frame values outside 0..65535; convert it to an 8- or 16-bit image")
    grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def read_label_raw(path: Path) -> np.ndarray:
    """Decode a label image without any mapping.

    Returns:
        uint8 (H, W) for class-index / palette-index PNGs (mode L or P), or
        uint8 (H, W, 3) for RGB colour labels.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("L", "P"):
                return np.asarray(img)
            if img.mode in ("I", "I;16", "I;16B"):
                arr = np.asarray(img)
                if arr.max(initial=0) > 255:
                    raise LabelValueError(
                        f"{path}: label holds values up to {int(arr.max())}; autolabel reads "
                        "8-bit class-index PNGs (mode L or P)"
                    )
                return arr.astype(np.uint8)
            if img.mode in ("RGB", "RGBA"):
                return np.asarray(img.convert("RGB"))
            raise ImageReadError(f"{path}: unsupported label image mode {img.mode!r}")
    except FileNotFoundError:
        raise ImageReadError(f"{path}: label file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, LabelValueError):
            raise
        raise ImageReadError(
            f"{path}: cannot decode label image ({exc}); the file is truncated or corrupt"
        ) from exc


def map_label(raw: np.ndarray, lut: np.ndarray, path: Path) -> np.ndarray:
    """Map raw 8-bit label values through ``lut`` (-1 = invalid value).

    Args:
        raw: uint8 (H, W) raw values.
        lut: int16 (256,) table, from :func:`storage.classes.lookup_table`.
        path: the file the label came from, for the error message.

    Returns:
        uint8 (H, W) class ids (ignore index where the table says so).
    """
    if raw.ndim != 2:
        raise LabelValueError(
            f"{path}: expected a class-index label (one channel), got shape {raw.shape}; "
            "colour labels need a palette (see `autolabel ingest folder --classes`)"
        )
    mapped = lut[raw]
    if (mapped < 0).any():
        bad = np.unique(raw[mapped < 0])
        raise LabelValueError(
            f"{path}: label values {bad[:10].tolist()} are outside the class set "
            f"(valid raw values: {np.flatnonzero(lut >= 0).tolist()[:40]})"
        )
    return mapped.astype(np.uint8)


def map_colour_label(raw: np.ndarray, palette: dict[tuple[int, int, int], int], path: Path) -> np.ndarray:
    """Map an RGB colour label (H, W, 3) to class ids (H, W) through ``palette`` (colour -> id)."""
    if raw.ndim != 3:
        raise LabelValueError(f"{path}: expected an RGB colour label, got shape {raw.shape}")
    packed = (raw[..., 0].astype(np.int32) << 16) | (raw[..., 1].astype(np.int32) << 8) | raw[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for (r, g, b) in palette], dtype=np.int32)
    values = np.array(list(palette.values()), dtype=np.int16)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    pos = np.clip(np.searchsorted(keys, packed), 0, len(keys) - 1)
    hit = keys[pos] == packed
    if not hit.all():
        bad = np.unique(packed[~hit])[:5]
        colours = [((int(c) >> 16) & 255, (int(c) >> 8) & 255, int(c) & 255) for c in bad]
        raise LabelValueError(f"{path}: colours {colours} are not in the palette")
    return values[pos].astype(np.uint8)


def check_same_size(frame: np.ndarray, label: np.ndarray, label_path: Path, frame_name: str) -> None:
    """Raise SizeMismatchError unless ``label`` (H, W) matches ``frame`` (H, W, 3)."""
    if label.shape[:2] != frame.shape[:2]:
        raise SizeMismatchError(
            f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but frame {frame_name!r} is "
            f"{frame.shape[1]}x{frame.shape[0]} (width x height); labels must match their frames"
        )


# zlib level for photographic PNGs (frames, overlays): measured on an 854x480 DAVIS overlay, level 6
# (PIL's default) takes 166 ms for 420 KB, level 1 42 ms for 471 KB; label PNGs (flat regions) keep 6,
# where the files stay a few KB and take under 15 ms
PHOTO_PNG_LEVEL = 1


def write_png_atomic(path: Path, array: np.ndarray, palette: np.ndarray | None = None, *,
                     compress_level: int = 6) -> None:
    """Write ``array`` as PNG via a temporary file and rename, so no half-written file remains.

    Args:
        array: uint8 (H, W) or (H, W, 3).
        palette: optional (256, 3) uint8 palette; writes a palette PNG (mode P) for (H, W) input.
        compress_level: zlib level 0-9; :data:`PHOTO_PNG_LEVEL` for frames and overlays.
    """
    img = Image.fromarray(array)
    if palette is not None and array.ndim == 2:
        # putpalette turns an L image into P and keeps the index values unchanged
        img.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=compress_level)
