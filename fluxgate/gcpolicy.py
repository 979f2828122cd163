"""Garbage collection for a worker that holds thousands of long-lived streams.

CPython's cyclic collector runs a full collection, which visits every
tracked object, whenever its oldest generation has grown by a quarter since
the last one. A worker holding open streams keeps about a hundred tracked
objects alive per stream, none of them garbage, so each full collection
stops every stream on the worker for a time that grows with the number open,
and collections come often while streams are opening (BENCHMARKS.md,
"Measurements behind the design").

Reference counting frees everything else the moment it is dropped; the
cyclic collector is only needed for reference cycles, and an exchange makes
none of its own (tests/test_gc_policy.py checks each kind). So here:

- what exists once the worker has started is frozen (never visited again);
- young collections run as CPython runs them: they visit young objects only;
- the oldest generation is never collected by CPython's own trigger;
- once a minute (`GcPolicy.tick`, from the worker's heartbeat) what has
  survived into the oldest generation is frozen too, and one full
  collection runs when the heap has grown more than the open connections
  explain: past twice what it was after the last full collection, plus
  `PER_CONNECTION` memory blocks for each connection opened since. Cycles a
  library leaves behind (aiohttp keeps the exception of a connection the
  upstream closed) are freed then.

The heap is measured as the memory blocks Python has allocated, which costs
a walk over its arenas, not over its objects: counting a million frozen
objects, scattered over memory, stopped the worker for tens of milliseconds.

Streams opening only add objects they explain, so a worker ramping up to
thousands of streams is not stopped to visit them all for nothing. Leaked
cycles are found at the latest when the connections go (the allowance shrinks
with them), which is when a full collection is cheap; while many stay open,
what a leak can hold stays within the live heap's own size.

A frozen object is still freed by reference counting when its last
reference goes: freezing only keeps the collector from visiting it.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger("fluxgate.gc")

CHECK_INTERVAL: Final = 60.0  # seconds between two looks at the oldest generation
GROWTH: Final = 2.0  # a full collection once the heap has doubled...
# ...beyond this many memory blocks per connection opened since: an open stream
# keeps fewer than that (tests/test_gc_policy.py measures it against this).
PER_CONNECTION: Final = 600
# CPython's default young thresholds; the oldest generation's own trigger is
# never reached (it counts young collections).
THRESHOLDS: Final = (700, 10, 1 << 30)


class GcPolicy:
    """The worker's garbage collection, as the module docstring describes.

    `start()` once the worker is ready to serve; `tick()` as often as
    convenient (it acts once per `check_interval`).
    """

    def __init__(
        self,
        connections: Callable[[], int] = lambda: 0,
        check_interval: float = CHECK_INTERVAL,
        growth: float = GROWTH,
        per_connection: int = PER_CONNECTION,
    ) -> None:
        self.connections = connections  # the worker's open client connections
        self.check_interval = check_interval
        self.growth = growth
        self.per_connection = per_connection
        self.baseline = 0  # heap blocks just after the last full collection (or start)
        self.baseline_connections = 0  # open connections then
        self.next_check = 0.0
        self.full_collections = 0

    def start(self) -> None:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*THRESHOLDS)
        self._set_baseline()
        self.next_check = time.monotonic() + self.check_interval

    def tick(self) -> None:
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + self.check_interval
        gc.freeze()
        if sys.getallocatedblocks() > self.allowance():
            self.collect()

    def allowance(self) -> float:
        """How large a heap (in blocks) the open connections explain."""
        opened = max(0, self.connections() - self.baseline_connections)
        return self.baseline * self.growth + opened * self.per_connection

    def _set_baseline(self) -> None:
        self.baseline = sys.getallocatedblocks()
        self.baseline_connections = self.connections()

    def collect(self) -> int:
        """One full collection of everything; returns the objects freed."""
        started = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        self._set_baseline()
        self.full_collections += 1
        log.debug(
            "full garbage collection: %d objects freed, heap %d blocks, %.1f ms",
            freed,
            self.baseline,
            (time.perf_counter() - started) * 1000,
        )
        return freed
