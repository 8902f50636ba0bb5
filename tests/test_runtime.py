"""Process set-up: glibc malloc arenas capped, thread counts from $AUTOLABEL_THREADS, sleeping OpenMP waits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from autolabel.errors import ConfigError
from autolabel.runtime import compute_threads, prefer_passive_waits

# counts glibc's heaps (one per arena) after 8 threads allocated, via malloc_info's XML
HEAPS_AFTER_THREADS = textwrap.dedent("""
    import ctypes, sys, threading
    if sys.argv[1] == "configured":
        from autolabel.runtime import limit_malloc_arenas
        assert limit_malloc_arenas()
    libc = ctypes.CDLL(None)
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    keep, ready = [], threading.Barrier(8)
    def work():
        ready.wait()  # all eight alive at once, each taking its first malloc
        keep.append([bytearray(2000) for _ in range(200)])
    threads = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in threads]; [t.join() for t in threads]
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(ctypes.string_at(buf, size.value).count(b"<heap nr="))
""")


def _gnu_libc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _gnu_libc(), reason="malloc arenas are glibc's; this C library has none to cap")
def test_arenas_are_capped_whatever_the_threads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}

    def heaps(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", HEAPS_AFTER_THREADS, mode], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    assert heaps("default") > 2  # glibc's default: an arena per thread
    assert heaps("configured") <= 2


def test_an_arena_limit_in_the_environment_is_left_to_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    from autolabel.runtime import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


class TestThreads:
    def test_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AUTOLABEL_THREADS", "3")
        assert compute_threads() == 3
        monkeypatch.setenv("AUTOLABEL_THREADS", "0")
        assert compute_threads() == (os.cpu_count() or 1)
        monkeypatch.delenv("AUTOLABEL_THREADS")
        assert compute_threads() == (os.cpu_count() or 1)

    def test_not_a_number(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AUTOLABEL_THREADS", "two")
        with pytest.raises(ConfigError, match="AUTOLABEL_THREADS must be a number of threads, not 'two'"):
            compute_threads()


# records $OMP_WAIT_POLICY at the moment torch is first imported (OpenMP reads it once, on loading)
POLICY_WHEN_TORCH_LOADS = textwrap.dedent("""
    import importlib, os, sys
    seen = []
    class Watch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and not seen:
                seen.append(os.environ.get("OMP_WAIT_POLICY"))
            return None
    sys.meta_path.insert(0, Watch())
    importlib.import_module(sys.argv[1])
    import torch  # where the entry point did not load it itself
    print(seen[0])
""")


class TestWaitPolicy:
    def test_set_where_the_environment_is_silent(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        assert prefer_passive_waits() is True
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"

    def test_the_environment_wins(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
        assert prefer_passive_waits() is False
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"

    @pytest.mark.parametrize("entry", ["autolabel.cli.app", "autolabel.flows.label_sequence",
                                       "autolabel.flows.label_segment", "autolabel.models.teacher"])
    @pytest.mark.parametrize("preset", [None, "ACTIVE"])
    def test_in_place_before_torch_loads(self, entry: str, preset: str | None) -> None:
        """Every entry point (the CLI, the flows a worker runs, the models alone) has the policy in the
        environment before torch loads OpenMP; a user's own setting is kept."""
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if preset:
            env["OMP_WAIT_POLICY"] = preset
        done = subprocess.run([sys.executable, "-c", POLICY_WHEN_TORCH_LOADS, entry], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (preset or "PASSIVE")


# RSS of a process holding 200 MB of freed small blocks (below glibc's mmap threshold) behind one
# block still in use, before and after release_free_memory
RSS_AFTER_RELEASE = textwrap.dedent("""
    import re
    from autolabel.runtime import release_free_memory
    def rss_mb():
        return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
    blocks = [bytearray(64 * 1024) for _ in range(3200)]  # 200 MB; over 512 bytes: malloc, not pymalloc
    kept = bytearray(64 * 1024)  # in use above them: free() cannot give the heap's top back
    del blocks
    before = rss_mb()
    assert release_free_memory()
    print(before, rss_mb())
""")


@pytest.mark.skipif(not _gnu_libc(), reason="malloc_trim is glibc's")
def test_freed_heap_memory_goes_back_to_the_system() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", RSS_AFTER_RELEASE], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    before, after = (float(v) for v in done.stdout.split())
    assert before - after > 150, (before, after)  # the freed 200 MB no longer resident
