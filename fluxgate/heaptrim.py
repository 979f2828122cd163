"""Giving the C library's free heap back to the system after a burst.

A worker that held thousands of streams has grown its C heap (the buffers
and objects larger than Python's own small-object allocator takes). When
they close, the C library keeps what they freed for later: only the free
space at the very top of its heap goes back to the system by itself, and
what is free below a block still in use stays in the worker's resident
memory (BENCHMARKS.md, "Many long streams": the PSS kept after they closed).

`HeapTrim` asks the C library how much it holds free (`mallinfo2`) and,
when that has grown by more than `TRIM_FREE` since its lowest point, has it
return every whole free page (`malloc_trim`). The pages given back still
count as free, so the lowest point then starts again from there: a heap that
stays as it is is not trimmed again and again, and one that is used and
freed once more is. It runs from the worker's heartbeat at most once per
`CHECK_INTERVAL`, so a worker serving a steady load, whose free heap is soon
reused, is not made to give pages back and fault them in again.

Only glibc has both calls; elsewhere `HeapTrim.available` is False and it
does nothing. Python's own arenas are not the C library's to give back;
CPython frees an arena once nothing in it is used.
"""

from __future__ import annotations

import ctypes
import logging
import time
from typing import Final

log = logging.getLogger("fluxgate.gc")

CHECK_INTERVAL: Final = 60.0  # seconds between two looks at the free heap
TRIM_FREE: Final = 16 << 20  # bytes held free by the C library that are worth a trim


class _Mallinfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33 and later): all fields size_t."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


class HeapTrim:
    """`tick()` from the worker's heartbeat; `check_interval` and `trim_free`
    are for tests to shorten."""

    def __init__(self, check_interval: float = CHECK_INTERVAL, trim_free: int = TRIM_FREE) -> None:
        self.check_interval = check_interval
        self.trim_free = trim_free
        self.next_check = time.monotonic() + check_interval
        self.trims = 0
        self.low = 0  # the least free heap seen since the last trim
        try:
            libc = ctypes.CDLL(None)
            self._mallinfo2 = libc.mallinfo2
            self._malloc_trim = libc.malloc_trim
        except (OSError, AttributeError):
            self.available = False
            return
        self._mallinfo2.restype = _Mallinfo2
        self._mallinfo2.argtypes = []
        self._malloc_trim.restype = ctypes.c_int
        self._malloc_trim.argtypes = [ctypes.c_size_t]
        self.available = True
        # From the start: a first look taken after a burst would take its freed
        # heap for the lowest point, and never trim it.
        self.low = self.free_bytes()

    def free_bytes(self) -> int:
        """What the C library holds free in its heaps (0 where it cannot tell)."""
        return int(self._mallinfo2().fordblks) if self.available else 0

    def tick(self) -> None:
        now = time.monotonic()
        if now < self.next_check or not self.available:
            return
        self.next_check = now + self.check_interval
        free = self.free_bytes()
        if free < self.low:
            self.low = free
        elif free - self.low > self.trim_free:
            self.trim(free)

    def trim(self, free: int) -> None:
        started = time.perf_counter()
        self._malloc_trim(0)
        self.trims += 1
        self.low = free
        log.debug(
            "C heap trimmed: %d MiB were free, %.1f ms",
            free >> 20,
            (time.perf_counter() - started) * 1000,
        )
