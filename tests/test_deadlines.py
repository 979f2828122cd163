"""The exchanges' whole deadlines on shared loop timers (fluxgate.deadlines), on a real loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fluxgate.deadlines import SLOT, Deadlines


class TimerCountingLoop(asyncio.SelectorEventLoop):
    """A real loop that keeps the timers asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.timers: list[asyncio.TimerHandle] = []

    def call_at(  # type: ignore[override]
        self, when: float, callback: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any:
        timer = super().call_at(when, callback, *args, **kw)
        self.timers.append(timer)
        return timer


@pytest.fixture
def loop() -> Iterator[TimerCountingLoop]:
    loop = TimerCountingLoop()
    yield loop
    loop.close()


def test_a_deadline_passes_at_its_time_never_before(loop: TimerCountingLoop) -> None:
    deadlines = Deadlines(loop)
    passed: list[float] = []
    done = asyncio.Event()

    def deadline() -> None:
        passed.append(loop.time())
        done.set()

    start = loop.time()
    deadlines.add(0.05, deadline)
    loop.run_until_complete(asyncio.wait_for(done.wait(), 5))
    assert passed[0] >= start + 0.05
    assert passed[0] < start + 0.05 + SLOT + 1.0  # a slot late at most, and a busy loop's slack
    assert len(deadlines) == 0


def test_deadlines_due_together_share_one_timer(loop: TimerCountingLoop) -> None:
    deadlines = Deadlines(loop)
    passed: list[int] = []
    for i in range(100):
        deadlines.add(0.02, lambda i=i: passed.append(i))  # type: ignore[misc]
    assert len(loop.timers) <= 2  # the 100 fall in one slot, or across one boundary
    loop.run_until_complete(asyncio.sleep(0.1))
    assert sorted(passed) == list(range(100))


def test_a_cancelled_deadline_never_passes_and_its_neighbours_still_do(
    loop: TimerCountingLoop,
) -> None:
    deadlines = Deadlines(loop)
    passed: list[str] = []
    cancelled = lambda: passed.append("cancelled")  # noqa: E731
    slot = deadlines.add(0.02, cancelled)
    deadlines.add(0.02, lambda: passed.append("kept"))
    deadlines.cancel(slot, cancelled)
    deadlines.cancel(slot, cancelled)  # twice: nothing more
    loop.run_until_complete(asyncio.sleep(0.1))
    assert passed == ["kept"]


def test_the_last_deadline_cancelled_in_a_slot_cancels_its_timer(
    loop: TimerCountingLoop,
) -> None:
    # Exchanges that end long before their deadline leave nothing behind.
    deadlines = Deadlines(loop)
    callbacks = [lambda: None for _ in range(3)]
    slots = [deadlines.add(600.0, callback) for callback in callbacks]
    for slot, callback in zip(slots, callbacks, strict=True):
        deadlines.cancel(slot, callback)
    assert len(deadlines) == 0
    assert loop.timers and all(timer.cancelled() for timer in loop.timers)


def test_a_callback_that_raises_stops_none_of_the_others(loop: TimerCountingLoop) -> None:
    deadlines = Deadlines(loop)
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    passed: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug in one deadline's callback")

    deadlines.add(0.02, broken)
    deadlines.add(0.02, lambda: passed.append("other"))
    loop.run_until_complete(asyncio.sleep(0.1))
    assert passed == ["other"]
    assert [type(c.get("exception")) for c in reported] == [RuntimeError]
