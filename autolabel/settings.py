"""Settings read from the environment (paths that differ between machines, and where deployments may write)."""

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


ROOT_VARIABLES = {"store": "AUTOLABEL_STORE_ROOTS", "inbox": "AUTOLABEL_INBOX_ROOTS",
                  "export": "AUTOLABEL_EXPORT_ROOTS"}


def absolute_local(path: str | None) -> str | None:
    """A local path made absolute against this process's folder (``~`` expanded, symlinks kept);
    None and URLs (``s3://...``) as they are. For paths handed to workers, which run elsewhere."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def allowed_roots(kind: str) -> list[str] | None:
    """Roots a deployment's ``kind`` path (store, inbox, export) must lie under, or None when unset.

    ``$AUTOLABEL_STORE_ROOTS`` etc. hold ``:``-separated folders or URL prefixes
    (``/data/stores:s3://bucket/stores``); ``deploy/env.sh`` sets all three (default: ``runs/``).
    """
    value = os.environ.get(ROOT_VARIABLES[kind], "").strip()
    if not value:
        return None
    roots, pending = [], ""
    for part in value.split(":"):  # re-join URL schemes split at their ':'
        if pending:
            roots.append(pending + ":" + part)
            pending = ""
        elif part in ("s3", "gs", "gcs", "az", "abfs", "memory", "file", "http", "https"):
            pending = part
        elif part:
            roots.append(part)
    return roots


def _normal(path: str) -> str:
    if "://" in path:
        scheme, rest = path.split("://", 1)
        if any(seg == ".." for seg in rest.split("/")):
            raise ValueError(path)
        return f"{scheme}://{rest.rstrip('/')}"
    return os.path.realpath(os.path.expanduser(path))


def confine(path: str | None, kind: str) -> str | None:
    """``path`` if it lies under an allowed root of ``kind`` (or none are configured), else ConfigError."""
    from autolabel.errors import ConfigError

    roots = allowed_roots(kind)
    if path is None or roots is None:
        return path
    try:
        resolved = _normal(path)
    except ValueError:
        raise ConfigError(f"{kind} path {path!r} contains '..'; give it without") from None
    for root in roots:
        base = _normal(root)
        if resolved == base or resolved.startswith(base.rstrip("/") + "/"):
            return path
    raise ConfigError(f"{kind} path {path!r} is outside the allowed roots {roots} (${ROOT_VARIABLES[kind]}); "
                      "use a path under one of them, or have the operator add a root")
