"""Process set-up every entry point shares: OpenMP's wait policy, the C allocator's arenas and the
compute threads.

Labelling runs torch's threads, OpenCV's, zarr's event-loop thread and the prefetching reader;
glibc gives each thread its own malloc arena (up to 8 per core), and the freed space of many
arenas does not go back to the system: the high-water RSS of a 2000-frame drive at 320x240 grew
+9 % over a 100-frame one with the default, +2 % with two arenas (``benchmarks/scaling.py``,
README "Scale"). :func:`configure_process` caps the arenas (unless ``MALLOC_ARENA_MAX`` is set,
which glibc then applies itself) and sets the threads; the CLI, the Prefect flows and the local
worker processes call it first. Within the arenas, the holes that each propagation step's freed
tensors leave still drift over a long drive; :func:`release_free_memory` hands them back, and the
propagation calls it every 16 frames.

Several labelling processes on one machine are normal (two users' ``label`` runs, several pool
workers on one host, the local segment jobs): each starts torch with a thread per core, and
OpenMP's threads spin while they wait for work by default, taking the cores the other process
computes on. Two ``label`` runs at once on 2 cores (a fresh 105-frame 480x360 drive each,
warp-refine) took 71 s with spinning threads and 40 s with sleeping ones; one run alone costs
about 5 % more at 320x240 and no measurable time at 480x360 (README "Scale").
:func:`prefer_passive_waits`, called when the ``autolabel`` package is imported, so before torch
loads its OpenMP runtime (which reads the policy once), makes waiting threads sleep unless
``OMP_WAIT_POLICY`` is set.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from autolabel.errors import ConfigError

M_ARENA_MAX = -8  # glibc's mallopt parameter number
MALLOC_ARENAS = 2
OMP_WAIT_POLICY = "PASSIVE"


def prefer_passive_waits(policy: str = OMP_WAIT_POLICY) -> bool:
    """Set ``$OMP_WAIT_POLICY`` to ``policy`` unless the environment sets it; True where it did.

    Takes effect only where the OpenMP runtime is not loaded yet (``import torch`` loads it) and in
    every child process; the ``autolabel`` package calls it on import.
    """
    if os.environ.get("OMP_WAIT_POLICY"):
        return False
    os.environ["OMP_WAIT_POLICY"] = policy
    return True


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``arenas``; False where it does not apply (set by the environment,
    not Linux, a C library without ``mallopt``)."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_ARENA_MAX, arenas) == 1


def release_free_memory() -> bool:
    """Hand the C allocator's free pages back to the system (glibc's ``malloc_trim(0)``); False where
    there is no such call (not glibc).

    Freed blocks in the middle of a heap stay resident until something reuses them, and the tensors
    of each propagation step leave such holes in a pattern that drifts over a long drive; the
    propagation calls this after every group of frames, so the high-water RSS does not creep up with
    the drive's length (README "Scale"). Costs a heap walk and the page faults of reusing the pages.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def compute_threads() -> int:
    """Threads for torch and OpenCV: ``$AUTOLABEL_THREADS`` (several processes sharing a machine),
    else every core."""
    value = os.environ.get("AUTOLABEL_THREADS", "")
    if value and not value.isdigit():
        raise ConfigError(f"AUTOLABEL_THREADS must be a number of threads, not {value!r}")
    return int(value) if value and int(value) > 0 else os.cpu_count() or 1


def set_threads(threads: int | None = None) -> int:
    """torch's and OpenCV's threads: ``threads``, else :func:`compute_threads`. Returns the number."""
    import cv2
    import torch

    threads = threads or compute_threads()
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return threads


def configure_process(threads: int | None = None) -> int:
    """:func:`limit_malloc_arenas` then :func:`set_threads`; returns the threads."""
    limit_malloc_arenas()
    return set_threads(threads)


def die_with_parent(parent_pid: int) -> None:
    """Make this pool worker (flow estimation, rendering) exit when the process that started it dies,
    even by SIGKILL: no orphan keeps computing for a run that is gone.

    Linux: the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``). Everywhere: a
    daemon thread also checks every second that the parent is still the same process.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)

    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
