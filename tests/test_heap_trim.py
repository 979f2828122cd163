"""Giving the C library's free heap back to the system (fluxgate/heaptrim.py).

Run in this process, on its own C heap: a burst of allocations the size of a
stream's buffers, then most of them freed with a few kept in between, which
is what keeps glibc from giving the pages back by itself.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator

import pytest

from fluxgate.heaptrim import HeapTrim

MiB = 1 << 20


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def trim() -> Iterator[HeapTrim]:
    heap = HeapTrim(check_interval=0.0, trim_free=8 * MiB)
    if platform.libc_ver()[0] == "glibc":
        assert heap.available  # mallinfo2 and malloc_trim: glibc 2.33 and later
    elif not heap.available:
        pytest.skip("the C library has no mallinfo2 and malloc_trim")
    yield heap  # it has seen the free heap before the burst


def burst_then_freed(size: int = 64 * MiB, keep_every: int = 64) -> list[bytes]:
    """Allocate `size` bytes in C-heap blocks (above Python's small-object size,
    below glibc's mmap threshold), free all but every `keep_every`-th."""
    blocks = [bytes(4000) for _ in range(size // 4000)]
    return blocks[::keep_every]


def test_a_burst_freed_in_the_c_heap_goes_back_to_the_system(trim: HeapTrim) -> None:
    """At the first look after it: the lowest point is the heap when `HeapTrim` was
    made (a worker's start), so a burst that came and went before is still seen."""
    kept = burst_then_freed()
    before = resident()
    trim.tick()
    assert trim.trims == 1
    assert before - resident() > 32 * MiB
    del kept


def test_a_free_heap_that_stays_as_it_is_is_not_trimmed_again(trim: HeapTrim) -> None:
    kept = burst_then_freed()
    trim.tick()
    trim.tick()
    assert trim.trims == 1
    del kept


def test_a_heap_used_and_freed_again_is_trimmed_again(trim: HeapTrim) -> None:
    kept = burst_then_freed()
    trim.tick()
    again = [bytes(4000) for _ in range(48 * MiB // 4000)]  # reuses the free heap
    trim.tick()
    del again
    trim.tick()
    assert trim.trims == 2
    del kept


def test_a_heap_that_has_not_grown_is_not_trimmed(trim: HeapTrim) -> None:
    trim.tick()
    assert trim.trims == 0


def test_it_looks_at_most_once_per_interval() -> None:
    heap = HeapTrim(check_interval=3600.0, trim_free=0)
    heap.low = 0  # any free heap at all would be worth a trim...
    kept = burst_then_freed()
    heap.tick()  # ...but the first look is an interval away
    assert heap.trims == 0
    del kept
