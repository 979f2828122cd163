"""The server-wide connection limit (README "Request handling", step 4), shared by all workers.

The master allocates one shared array of counters before it forks; each
worker owns one slot and is its only writer, so no lock is needed and a
worker that dies leaves a slot the master zeroes before reusing it. Admission
sums the slots in use. Two workers admitting at the very same instant can
overshoot the limit by at most (workers - 1) connections; it never drifts.
"""

from __future__ import annotations

import ctypes
from multiprocessing.sharedctypes import RawArray, RawValue
from typing import Any

MAX_SLOTS = 512


class ConnectionTable:
    """Shared memory for the counters: created by the master, inherited by forks."""

    def __init__(self, size: int = MAX_SLOTS) -> None:
        self.counts: Any = RawArray(ctypes.c_long, size)
        self.slots_in_use: Any = RawValue(ctypes.c_int, 1)  # highest slot index + 1
        self.size = size

    def reset_slot(self, slot: int) -> None:
        """Zero a slot before a new worker takes it."""
        self.counts[slot] = 0
        if slot + 1 > self.slots_in_use.value:
            self.slots_in_use.value = slot + 1

    def release_slot(self, slot: int) -> None:
        """Forget the connections of a worker that exited (crashed or retired)."""
        self.counts[slot] = 0

    def total(self) -> int:
        return sum(self.counts[: self.slots_in_use.value])


class ConnectionGate:
    """One worker's view: admit a connection if the whole server is below the limit."""

    def __init__(self, table: ConnectionTable, slot: int, limit: int) -> None:
        self.table = table
        self.slot = slot
        self.limit = limit  # replaced on reload; read on every admission

    def acquire(self) -> bool:
        if self.table.total() >= self.limit:
            return False
        self.table.counts[self.slot] += 1
        return True

    def release(self) -> None:
        self.table.counts[self.slot] -= 1

    @property
    def active(self) -> int:
        return int(self.table.counts[self.slot])
