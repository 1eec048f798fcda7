"""benchmarks/bench_memory.py's allocator switch (--malloc): names resolve to a library or fail
with a message naming the option, and each row's allocator is read from the child's maps."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_memory as B  # noqa: E402


def test_glibc_preloads_nothing_and_an_unknown_name_is_named():
    assert B.malloc_library("glibc") is None
    with pytest.raises(SystemExit, match="--malloc 'mimalloc'"):
        B.malloc_library("mimalloc")


def test_tcmalloc_falls_back_to_the_minimal_build(monkeypatch):
    libs = {"tcmalloc_minimal": "libtcmalloc_minimal.so.4"}
    monkeypatch.setattr(B.ctypes.util, "find_library", libs.get)
    assert B.malloc_library("tcmalloc") == "libtcmalloc_minimal.so.4"
    with pytest.raises(SystemExit, match="no libjemalloc on this machine.*libjemalloc2"):
        B.malloc_library("jemalloc")


def test_the_allocator_is_read_from_the_maps():
    line = "7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/{}\n"
    assert B.loaded_malloc(line.format("libc.so.6")) == "glibc"
    assert B.loaded_malloc(line.format("libc.so.6") + line.format("libjemalloc.so.2")) == "jemalloc"
    assert B.loaded_malloc(line.format("libtcmalloc_minimal.so.4")) == "tcmalloc"
