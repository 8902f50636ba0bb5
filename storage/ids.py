"""Sequence ids: what a store accepts as a group name, and how readers build them."""

from __future__ import annotations

import fnmatch
import re

from autolabel.errors import InvalidSequenceIdError, SelectionError

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


def make_sequence_id(*parts: str) -> str:
    """Join reader-specific parts (road, record, camera...) into an id.

    Characters a store key may not hold (spaces, slashes...) are dropped, e.g.
    ``make_sequence_id("road02", "Record001", "Camera 5") == "road02_Record001_Camera5"``.
    The result is not validated here: an id that is still unsafe (``..evil``) fails its own
    sequence at ingest, while the other sequences of the source go ahead.
    """
    cleaned = [_UNSAFE.sub("", p) for p in parts]
    return "_".join(c for c in cleaned if c)


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
        raise SelectionError(f"{where}: no sequence {unmatched}; found {len(available)} sequences, e.g. {some}")
    return chosen
