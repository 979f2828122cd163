"""Many deadlines on few loop timers: the whole-exchange deadline of every open exchange.

Every exchange has a deadline (`request_timeout_ms`, ten minutes by default)
that almost never passes: it is cancelled when the exchange ends. A loop
timer of its own was one of the largest things an open stream kept, for as
long as it lasted (bench/design.md). Here the deadlines that fall in the
same `SLOT` share one timer, which fires at the end of that slot: a deadline
passes at its time or up to one slot later, never earlier.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Final

SLOT: Final = 0.01  # seconds


class Deadlines:
    """One worker's deadlines, on its loop."""

    __slots__ = ("_loop", "_slots")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Slot number -> its timer, and the callbacks due then (a dict: ordered, and
        # one removed without a search).
        self._slots: dict[int, tuple[asyncio.TimerHandle, dict[Callable[[], None], None]]] = {}

    def __len__(self) -> int:
        """The deadlines pending."""
        return sum(len(callbacks) for _, callbacks in self._slots.values())

    def add(self, delay: float, callback: Callable[[], None]) -> int:
        """Call `callback` once `delay` seconds have passed, unless `cancel` with
        the slot returned here and the same callback comes first."""
        slot = math.ceil((self._loop.time() + delay) / SLOT)
        entry = self._slots.get(slot)
        if entry is None:
            entry = self._slots[slot] = (self._loop.call_at(slot * SLOT, self._due, slot), {})
        entry[1][callback] = None
        return slot

    def cancel(self, slot: int, callback: Callable[[], None]) -> None:
        entry = self._slots.get(slot)
        if entry is None:
            return
        timer, callbacks = entry
        callbacks.pop(callback, None)
        if not callbacks:
            timer.cancel()
            del self._slots[slot]

    def _due(self, slot: int) -> None:
        entry = self._slots.pop(slot, None)
        if entry is not None:
            for callback in entry[1]:
                # Each in a handle of its own: one that raises is reported by the
                # loop and stops none of the others.
                self._loop.call_soon(callback)
