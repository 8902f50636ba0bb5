"""Leases (one writer per sequence stage), parametrised over a local folder, memory:// and a real S3 server."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from autolabel.storage.leases import (
    Lease,
    LeaseSettings,
    held_leases,
    lease_backend,
    lease_name,
)

from autolabel.errors import LeaseHeldError, LeaseLostError, StoreError

FAST = LeaseSettings(ttl_s=5.0, wait_s=0.0, poll_s=0.05)  # long enough for S3 round trips on a busy machine


@pytest.fixture(params=["local", "memory", "s3"])
def lease_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store.zarr")
    if request.param == "memory":
        return f"memory://leases-{uuid.uuid4().hex}.zarr"
    return request.getfixturevalue("s3_store_url")


def _foreign_record(expires: float, **extra: object) -> bytes:
    return json.dumps({"token": "someone-else", "host": "another-host", "pid": 1, "expires": expires,
                       "sequence": "seq", "stage": "flow/dis-fast", **extra}).encode()


class TestLease:
    def test_second_taker_sees_the_holder_until_release(self, lease_store: str) -> None:
        first = Lease(lease_store, "seq", "flow/dis-fast", FAST).acquire()
        holder = Lease(lease_store, "seq", "flow/dis-fast", FAST).try_acquire()
        assert holder is not None and holder["token"] == first.token
        first.release()
        second = Lease(lease_store, "seq", "flow/dis-fast", FAST)
        assert second.try_acquire() is None
        second.release()

    def test_other_stages_and_sequences_are_independent(self, lease_store: str) -> None:
        with Lease(lease_store, "seq", "teacher", FAST):
            with Lease(lease_store, "seq", "results/motion-only", FAST), Lease(lease_store, "other", "teacher", FAST):
                pass

    def test_a_live_owner_renews_its_lease(self, lease_store: str) -> None:
        settings = FAST.model_copy(update={"ttl_s": 2.0})
        with Lease(lease_store, "seq", "teacher", settings):
            time.sleep(3 * settings.ttl_s)  # three lifetimes: only renewal keeps it
            assert Lease(lease_store, "seq", "teacher", settings).try_acquire() is not None

    def test_an_expired_lease_is_taken_over(self, lease_store: str) -> None:
        backend = lease_backend(lease_store)
        backend.write(backend.path(lease_name("seq", "teacher")), _foreign_record(time.time() - 1))
        lease = Lease(lease_store, "seq", "teacher", FAST)
        assert lease.try_acquire() is None
        assert json.loads(backend.read(lease.path))["token"] == lease.token
        lease.release()
        assert backend.read(lease.path) is None

    def test_a_live_foreign_lease_makes_the_wait_time_out_with_the_holder_named(self, lease_store: str) -> None:
        backend = lease_backend(lease_store)
        backend.write(backend.path(lease_name("seq", "teacher")), _foreign_record(time.time() + 60))
        settings = LeaseSettings(ttl_s=5, wait_s=0.3, poll_s=0.05)
        messages: list[str] = []
        with pytest.raises(LeaseHeldError, match="being written by another-host pid 1.*gave up after 0 s"):
            Lease(lease_store, "seq", "teacher", settings, on_wait=messages.append).acquire()
        assert len(messages) == 1 and "waiting" in messages[0]

    def test_a_short_hold_costs_a_short_wait(self, lease_store: str) -> None:
        """A waiter looks again after 20 ms, then ever less often up to ``poll_s``: a hold released
        after 0.1 s (a segment job creating the shared arrays) is not waited out for ``poll_s``, and
        such a moment's wait is not announced."""
        backend = lease_backend(lease_store)
        path = backend.path(lease_name("seq", "teacher"))
        backend.write(path, _foreign_record(time.time() + 60))
        releaser = threading.Timer(0.1, backend.delete, [path])
        releaser.start()
        start = time.monotonic()
        messages: list[str] = []
        lease = Lease(lease_store, "seq", "teacher", LeaseSettings(ttl_s=5, wait_s=30, poll_s=3.0),
                      on_wait=messages.append).acquire()
        waited = time.monotonic() - start
        lease.release()
        releaser.join()
        assert 0.1 <= waited < 1.5, f"waited {waited:.2f} s for a lease held 0.1 s (poll_s 3 s)"
        assert messages == [] or waited >= 1.0  # announced only once the wait is a noticeable one

    def test_a_lease_taken_from_its_owner_is_reported_lost(self, lease_store: str) -> None:
        lease = Lease(lease_store, "seq", "teacher", LeaseSettings(ttl_s=30)).acquire()
        lease.backend.write(lease.path, _foreign_record(time.time() + 60))
        with pytest.raises(LeaseLostError, match="nothing was published"):
            lease.check()
        lease.release()  # does not delete the new owner's record
        assert json.loads(lease.backend.read(lease.path))["token"] == "someone-else"

    def test_held_leases_lists_live_and_stale(self, lease_store: str) -> None:
        backend = lease_backend(lease_store)
        backend.write(backend.path(lease_name("old", "teacher")), _foreign_record(time.time() - 5, sequence="old"))
        with Lease(lease_store, "seq", "teacher", FAST):
            records = {(r["sequence"], r["stale"]) for r in held_leases(lease_store)}
        assert records == {("seq", False), ("old", True)}


def test_a_dead_local_owner_is_taken_over_at_once(tmp_path: Path) -> None:
    store = str(tmp_path / "store.zarr")
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    backend = lease_backend(store)
    backend.write(backend.path(lease_name("seq", "teacher")),
                  _foreign_record(time.time() + 3600, host=socket.gethostname(), pid=int(done.stdout)))
    lease = Lease(store, "seq", "teacher", FAST)
    assert lease.try_acquire() is None  # no waiting for an hour: the owner's process is gone
    lease.release()


def _race(store: str, start: float, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    while time.time() < start:
        time.sleep(0.001)
    lease = Lease(store, "seq", "teacher", LeaseSettings(ttl_s=30))
    results.put(lease.try_acquire() is None)
    time.sleep(1.0)  # hold it while the others try


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_exactly_one_of_many_processes_wins(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = str(tmp_path / "store.zarr") if kind == "local" else request.getfixturevalue("s3_store_url")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start = time.time() + 3.0
    procs = [ctx.Process(target=_race, args=(store, start, results)) for _ in range(6)]
    for p in procs:
        p.start()
    won = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(won) == 1, won


def test_exactly_one_of_many_threads_takes_over_a_stale_lease(tmp_path: Path) -> None:
    store = str(tmp_path / "store.zarr")
    backend = lease_backend(store)
    backend.write(backend.path(lease_name("seq", "teacher")), _foreign_record(time.time() - 1))
    barrier = threading.Barrier(8)
    won: list[bool] = []

    def take() -> None:
        barrier.wait()
        won.append(Lease(store, "seq", "teacher", LeaseSettings(ttl_s=30)).try_acquire() is None)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(won) == 1, won


def test_an_unsupported_filesystem_is_refused() -> None:
    with pytest.raises(StoreError, match="need a local folder, s3:// or memory://"):
        lease_backend("ftp://example.invalid/store.zarr")
