"""Leases: one writer per (sequence, stage), on a local folder and on object storage.

A lease is a small JSON object ``<store>/_leases/<seq_id>~<stage>.json`` holding its owner (a
random token, host, pid and the process' start time) and an expiry time. It is taken with an
atomic *create-if-absent*, which every backend provides:

* local folders: the record is written to a private temporary file and hard-linked to the lease
  name (``link`` fails when the name exists, and the lease is never seen half-written);
* ``s3://``: ``PutObject`` with ``If-None-Match: *`` (S3 and S3-compatible servers refuse the
  put when the key exists);
* ``memory://`` (tests, one process): a process-wide lock around check-and-write.

A live owner renews the expiry from a background thread every ``ttl_s / 3`` seconds. A lease
whose expiry has passed, or whose owner is a process of this host that no longer runs (a killed
run: no need to wait for the expiry), is *taken over*: the taker first creates the marker
``<lease>.takeover-<old owner token>`` (create-if-absent again, so exactly one process takes over
each stale lease), then overwrites the lease with its own record. An owner that finds another
token in its lease when renewing, or before publishing (:meth:`Lease.check`), has lost it and
stops with :class:`~autolabel.errors.LeaseLostError` instead of publishing.

Expiry compares wall clocks of different machines: keep them in sync (NTP) and keep ``ttl_s``
well above the clock skew.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import fsspec
import fsspec.utils
from pydantic import BaseModel, Field

from autolabel.errors import LeaseHeldError, LeaseLostError, StoreError

log = logging.getLogger("autolabel.leases")

LEASES_DIR = "_leases"
FIRST_POLL_S = 0.02  # a waiting run's first look again; the waits double up to LeaseSettings.poll_s
WAIT_NOTICE_S = 1.0  # a run says it is waiting once it has waited this long (or half its wait_s)


class LeaseSettings(BaseModel):
    """How long leases live and how long a run waits for one held by another run."""

    ttl_s: float = Field(60.0, gt=0, description="a lease not renewed for this long is stale")
    wait_s: float = Field(3600.0, ge=0, description="how long to wait for a lease another run holds")
    poll_s: float = Field(0.5, gt=0, description="how often a waiting run looks again, at the most: it looks "
                          "after 20 ms first and doubles the wait up to this, so a short hold costs a short wait")
    keep_superseded_s: float = Field(
        600.0, ge=0, description="a replaced stage version (or one a killed run left) is deleted after this long")


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_is_dead(record: dict[str, Any]) -> bool:
    """True when the owner ran on this host and that process is gone (killed, crashed)."""
    if record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    started = record.get("started")
    return started is not None and _process_start(pid) not in (None, started)


# --- backends: create-if-absent, read, overwrite, delete ------------------------------------------


class _Backend:
    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.root = fs, root.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.root}/{LEASES_DIR}/{name}"

    def create(self, path: str, data: bytes) -> bool:
        raise NotImplementedError

    def read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def write(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)

    def delete(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass


class _LocalBackend(_Backend):
    def create(self, path: str, data: bytes) -> bool:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{secrets.token_hex(6)}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def write(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{secrets.token_hex(6)}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)


class _S3Backend(_Backend):
    def create(self, path: str, data: bytes) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except FileExistsError:  # s3fs maps 412 Precondition Failed to FileExistsError
            return False


class _MemoryBackend(_Backend):
    _lock = threading.Lock()

    def create(self, path: str, data: bytes) -> bool:
        with self._lock:
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True


def lease_backend(store_url: str) -> _Backend:
    """The create-if-absent backend for the store at ``store_url``."""
    protocol = fsspec.utils.get_protocol(str(store_url))
    backends = {"file": _LocalBackend, "local": _LocalBackend, "s3": _S3Backend, "s3a": _S3Backend,
                "memory": _MemoryBackend}
    if protocol not in backends:
        raise StoreError(
            f"store {store_url!r}: leases (one writer per sequence stage) need a local folder, s3:// or "
            f"memory:// store, not {protocol}://; put the store on one of those"
        )
    fs, root = fsspec.core.url_to_fs(str(store_url))
    return backends[protocol](fs, root)


# --- the lease ------------------------------------------------------------------------------------


def lease_name(seq_id: str, stage: str) -> str:
    """File name of the lease on ``stage`` of ``seq_id`` (ids never contain ``~`` or ``/``)."""
    return f"{seq_id}~{stage.replace('/', '~')}.json"


class Lease:
    """Exclusive right to write one stage of one sequence; use as a context manager.

    Example:
        >>> with Lease("runs/store", "drive-01", "flow/dis-fast"):
        ...     ...  # write the stage, lease.check(), publish
    """

    def __init__(self, store_url: str, seq_id: str, stage: str, settings: LeaseSettings | None = None,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.store_url, self.seq_id, self.stage = str(store_url), seq_id, stage
        self.settings = settings or LeaseSettings()
        self.backend = lease_backend(self.store_url)
        self.path = self.backend.path(lease_name(seq_id, stage))
        self.token = secrets.token_hex(12)
        self.on_wait = on_wait or log.warning
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({
            "token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
            "started": _process_start(os.getpid()), "sequence": self.seq_id, "stage": self.stage,
            "acquired": now, "expires": now + self.settings.ttl_s,
        }).encode()

    def _read(self) -> dict[str, Any] | None:
        raw = self.backend.read(self.path)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:  # cannot happen with atomic writes; treat as stale
            return {"token": "unreadable", "expires": 0}

    def _take_over(self, record: dict[str, Any]) -> bool:
        marker = f"{self.path}.takeover-{record.get('token', 'unknown')}"
        if not self.backend.create(marker, self.token.encode()):
            return False
        try:
            current = self._read()
            if current is None or current.get("token") != record.get("token"):
                return False  # released or taken meanwhile: start over
            self.backend.write(self.path, self._record())
            return True
        finally:
            self.backend.delete(marker)

    def describe(self, record: dict[str, Any]) -> str:
        left = record.get("expires", 0) - time.time()
        return (f"stage {self.stage!r} of sequence {self.seq_id!r} is being written by "
                f"{record.get('host', '?')} pid {record.get('pid', '?')} (lease renews; it expires "
                f"{max(left, 0):.0f} s after that run stops renewing it)")

    def try_acquire(self) -> dict[str, Any] | None:
        """Take the lease if free or stale; returns None on success, else the holder's record."""
        while True:
            if self.backend.create(self.path, self._record()):
                return None
            record = self._read()
            if record is None:
                continue  # released between the two calls
            if record.get("expires", 0) < time.time() or _owner_is_dead(record):
                if self._take_over(record):
                    log.info("took over the stale lease of %s", self.describe(record))
                    return None
                continue
            return record

    def acquire(self, wait: bool = True) -> Lease:
        """Take the lease, waiting up to ``settings.wait_s`` (when ``wait``); raises LeaseHeldError."""
        deadline = time.monotonic() + (self.settings.wait_s if wait else 0)
        told = False
        # most holds are short (a segment job creating the shared version's arrays, a metadata
        # write): look again soon, then less often
        pause = min(FIRST_POLL_S, self.settings.poll_s)
        # a hold of a moment is not news: say so only when the wait is one a user would notice
        notice = time.monotonic() + min(WAIT_NOTICE_S, self.settings.wait_s / 2)
        while (holder := self.try_acquire()) is not None:
            if time.monotonic() >= deadline:
                raise LeaseHeldError(
                    f"{self.describe(holder)}; gave up after {self.settings.wait_s:.0f} s. Run again when it "
                    f"has finished; if no run is alive, delete {self.path}")
            if not told and time.monotonic() >= notice:
                self.on_wait(f"waiting: {self.describe(holder)}")
                told = True
            time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
            pause = min(pause * 2, self.settings.poll_s)
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {self.stage}", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.settings.ttl_s / 3):
            try:
                record = self._read()
                if record is None or record.get("token") != self.token:
                    self._lost = f"another run took it over ({(record or {}).get('host', 'nobody')})"
                    return
                self.backend.write(self.path, self._record())
            except OSError as exc:  # storage unreachable for a moment: try again next round
                log.warning("could not renew the lease on %s: %s", self.path, exc)

    def check(self) -> None:
        """Raise LeaseLostError unless this run still owns the lease (call right before publishing)."""
        record = self._read()
        if self._lost is None and (record is None or record.get("token") != self.token):
            self._lost = "its record is gone or names another owner"
        if self._lost is not None:
            raise LeaseLostError(
                f"lost the lease on stage {self.stage!r} of sequence {self.seq_id!r}: {self._lost} "
                "(it was not renewed in time: a paused machine or a storage outage); nothing was "
                "published, run again")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        record = self._read()
        if record is not None and record.get("token") == self.token:
            self.backend.delete(self.path)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def held_leases(store_url: str) -> list[dict[str, Any]]:
    """Records of the leases present in a store (live or stale), for ``info`` and ``verify``."""
    backend = lease_backend(store_url)
    folder = f"{backend.root}/{LEASES_DIR}"
    try:
        names = [p for p in backend.fs.ls(folder, detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return []
    records = []
    for path in names:
        raw = backend.read(path)
        if raw:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            rec["stale"] = rec.get("expires", 0) < time.time() or _owner_is_dead(rec)
            records.append(rec)
    return records
