"""Settings read from the environment (paths that differ between machines)."""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """Where the read-only real datasets live: ``$AUTOLABEL_SHARED_DATA`` or ``../shared/data``.

    The default is the ``shared/data`` folder beside the repository checkout. Nothing in it is
    ever copied into the repository.
    """
    env = os.environ.get("AUTOLABEL_SHARED_DATA")
    if env:
        return Path(env).expanduser()
    return _REPO_ROOT.parent / "shared" / "data"
