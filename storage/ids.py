"""Sequence ids: what a store accepts as a group name, and how readers build them."""

from __future__ import annotations

import fnmatch
import re
import unicodedata

from autolabel.errors import InvalidSequenceIdError, SelectionError
from autolabel.wording import count

_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def validate_sequence_id(seq_id: str) -> str:
    """Return ``seq_id`` if it is a safe store key, else raise InvalidSequenceIdError.

    Safe ids are 1-200 characters of letters, digits, ``.``, ``_``, ``+`` and ``-``, start with a
    letter or digit and contain no ``..``: they can never name a path outside the store root.
    """
    if not isinstance(seq_id, str) or not _VALID.match(seq_id) or ".." in seq_id:
        raise InvalidSequenceIdError(
            f"sequence id {seq_id!r} is not allowed: use 1-200 letters, digits, '.', '_', '+' or "
            "'-', starting with a letter or digit and without '..' (ids may not contain path "
            "separators, so they never escape the store root)"
        )
    return seq_id


def _id_part(part: str) -> str:
    """One source name as printable ASCII: NFKC-normalised, non-ASCII text punycoded (``xn--``)."""
    part = unicodedata.normalize("NFKC", part)
    if not part.isascii():
        part = "xn--" + part.encode("punycode").decode("ascii")
    return _UNSAFE.sub("", part)


def make_sequence_id(*parts: str) -> str:
    """Join reader-specific parts (road, record, camera...) into an id; stable and printable.

    The mapping, documented in the README ("Sequence ids"):

    * each part is NFKC-normalised (full-width ``ｓｅｑ１`` is ``seq1``);
    * a part with non-ASCII characters is written as ``xn--`` + its punycode, so ``日本`` becomes
      ``xn--wgv71a`` and ``x∕y`` (a unicode slash) ``xn--xy-6bv``, never an empty or silently
      shortened id;
    * characters a store key may not hold (spaces, ``/``, ``:``...) are dropped, e.g.
      ``make_sequence_id("road02", "Record001", "Camera 5") == "road02_Record001_Camera5"``;
    * the parts are joined with ``_``.

    Dropping characters can map two sources to one id (``seq 1`` and ``seq1``): ingest refuses
    both with an error naming them (:func:`check_unique_ids`) instead of letting one overwrite
    the other. An id that is still unsafe (``..evil``) fails its own sequence at ingest.
    """
    cleaned = [_id_part(p) for p in parts]
    return "_".join(c for c in cleaned if c)


def check_unique_ids(sources: list[tuple[str, str]]) -> dict[str, str]:
    """Ids that more than one source maps to: ``{id: error message}`` for each such id.

    ``sources`` are ``(id, source path)`` pairs; the message names every source of the id.
    """
    by_id: dict[str, list[str]] = {}
    for seq_id, source in sources:
        by_id.setdefault(seq_id, []).append(source)
    return {
        seq_id: (f"sources {' and '.join(repr(s) for s in paths)} both map to sequence id {seq_id!r} "
                 "(ids drop spaces and characters a store key may not hold); rename one of them")
        for seq_id, paths in by_id.items() if len(paths) > 1
    }


def select_ids(available: list[str], patterns: list[str] | None, where: str, must_match: bool = True) -> list[str]:
    """Ids in ``available`` matching any of ``patterns`` (exact ids or globs like ``train_*``).

    The one way every command and flow selects sequences. All of ``available`` when ``patterns``
    is empty; a pattern that matches nothing is an error naming ``where`` and some of the ids that
    exist (unless ``must_match`` is False, for one of several stores).
    """
    if not patterns:
        return list(available)
    chosen = [i for i in available if any(fnmatch.fnmatchcase(i, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(i, p) for i in available)]
    if unmatched and must_match:
        some = ", ".join(sorted(available)[:15])
        raise SelectionError(f"{where}: no sequence {unmatched}; found {count(len(available), 'sequence')}, "
                             f"e.g. {some}")
    return chosen
