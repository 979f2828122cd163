"""The local limits backend (fluxgate/ratelimit_local.py) keeps the semantics of
fluxgate/ratelimit.py's `Limiter` across worker processes.

Unit level: a `LocalTable` made here as the master makes it, under either kind
of lock, and forked processes standing in for workers where sharing matters
(exact counts under contention, a dead worker's concurrency places; a worker
killed holding the lock: test_limits_local_lock.py). Clocks are injected for
the minute window and the UTC day.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fluxgate import ratelimit_local
from fluxgate.ratelimit import (
    BUDGET,
    CONCURRENT,
    REQUESTS,
    TOKENS,
    Policy,
    Refusal,
)
from fluxgate.ratelimit_budgets import STATE_FILE, BudgetStore, state_directory
from fluxgate.ratelimit_local import DAY_SECONDS, TOKEN_DELAY, LocalLimiter, LocalTable

CHILD_TIMEOUT = 30.0
# 2026-11-30 12:00:00 UTC: twelve hours before a UTC midnight.
NOON = 1_796_040_000.0
assert NOON % DAY_SECONDS == 43_200


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=[True, False], ids=["robust-mutex", "file-lock"])
def table(request: pytest.FixtureRequest) -> Iterator[LocalTable]:
    """Small (every test makes its own, and a forked child inherits it), under
    either kind of lock (fluxgate/ratelimit_local_lock.py)."""
    t = LocalTable(capacity=64, slots=8, robust=request.param)
    for slot in range(3):
        t.reset_slot(slot)
    yield t
    os.close(t.fd)


def limiter(
    table: LocalTable, slot: int = 0, now: float = 1000.0, wall: float = NOON
) -> LocalLimiter:
    return LocalLimiter(table, slot, clock=Clock(now), wall_clock=Clock(wall))


def clock_of(lim: LocalLimiter) -> Clock:
    assert isinstance(lim.clock, Clock)
    return lim.clock


def wall_of(lim: LocalLimiter) -> Clock:
    assert isinstance(lim.wall_clock, Clock)
    return lim.wall_clock


def in_children(count: int, work: Callable[[int], int]) -> list[int]:
    """Run work(i) in `count` forked processes released together; their results."""
    go_r, go_w = os.pipe()
    children = []
    for i in range(count):
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            status = 0
            try:
                os.close(out_r)
                os.read(go_r, 1)
                os.write(out_w, str(work(i)).encode())
            except BaseException:
                status = 1
            os._exit(status)
        os.close(out_w)
        children.append((pid, out_r))
    os.write(go_w, b"x" * count)
    results = []
    deadline = time.monotonic() + CHILD_TIMEOUT
    for pid, out_r in children:
        with os.fdopen(out_r, "rb") as f:
            data = f.read()
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "child did not finish"
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
        results.append(int(data))
    os.close(go_r)
    os.close(go_w)
    return results


# Exact across processes


@pytest.mark.parametrize("robust", [True, False], ids=["robust-mutex", "file-lock"])
def test_two_processes_admit_exactly_the_requests_per_minute(robust: bool) -> None:
    table = LocalTable(capacity=1024, slots=4, robust=robust)
    for slot in range(3):
        table.reset_slot(slot)
    policy = Policy("p", requests_per_minute=100)
    # Many buckets, so that the two processes contend long enough for a missing
    # lock to show (without one this fails nearly every run).
    buckets = [f"key-{i}" for i in range(400)]

    def hammer(slot: int) -> int:
        lim = LocalLimiter(table, slot)
        admitted = 0
        for bucket in buckets:
            for _ in range(150):
                if lim.admit_now(bucket, policy) is None:
                    admitted += 1
                    lim.finish_now(bucket, 0)
        return admitted

    results = in_children(2, hammer)
    # Both children start together on 400 buckets (without the lock this fails
    # nearly every run); how the 40,000 places split between them is the scheduler's.
    assert sum(results) == 100 * len(buckets)
    # The parent, a third process, sees the same bucket spent.
    refusal = limiter(table, 2, now=time.monotonic()).admit_now("key-0", policy)
    assert refusal is not None and refusal.limit == REQUESTS
    os.close(table.fd)


def test_two_processes_hold_exactly_the_concurrent_requests(table: LocalTable) -> None:
    policy = Policy("p", concurrent_requests=7)

    def hold(slot: int) -> int:
        lim = LocalLimiter(table, slot)
        return sum(lim.admit_now("key-c", policy) is None for _ in range(500))

    assert sum(in_children(2, hold)) == 7


# Concurrency places


def test_finish_gives_the_concurrency_place_back(table: LocalTable) -> None:
    policy = Policy("p", concurrent_requests=2)
    lim = limiter(table)
    assert lim.admit_now("k", policy) is None
    assert lim.admit_now("k", policy) is None
    refusal = lim.admit_now("k", policy)
    assert refusal == Refusal(CONCURRENT, 2, 0, ratelimit_local.CONCURRENT_RETRY)
    lim.finish_now("k", 0)
    assert lim.admit_now("k", policy) is None


def test_places_are_counted_across_slots(table: LocalTable) -> None:
    policy = Policy("p", concurrent_requests=2)
    first, second = limiter(table, 0), limiter(table, 1)
    assert first.admit_now("k", policy) is None
    assert second.admit_now("k", policy) is None
    assert first.admit_now("k", policy) is not None
    second.finish_now("k", 0)
    assert first.admit_now("k", policy) is None


def test_a_dead_workers_places_come_back_when_the_master_releases_its_slot(
    table: LocalTable,
) -> None:
    policy = Policy("p", concurrent_requests=3)

    def admit_and_die(slot: int) -> int:
        lim = LocalLimiter(table, 1)
        return sum(lim.admit_now("k", policy) is None for _ in range(3))  # never finished

    assert in_children(1, admit_and_die) == [3]
    lim = limiter(table, 0)
    assert lim.admit_now("k", policy) is not None
    table.release_slot(1)  # the master's child_exit hook
    assert lim.admit_now("k", policy) is None


def test_reset_slot_zeroes_the_places_before_reuse(table: LocalTable) -> None:
    policy = Policy("p", concurrent_requests=1)
    assert limiter(table, 5).admit_now("k", policy) is None  # slot 5: not yet in use
    assert limiter(table, 0).admit_now("k", policy) is None  # slots past the highest are unseen
    table.reset_slot(5)  # the master's pre_fork hook
    assert limiter(table, 5).admit_now("k", policy) is not None  # slot 0's place counts


# Windows


def test_requests_window_starts_with_the_first_request_and_lasts_60_s(table: LocalTable) -> None:
    policy = Policy("p", requests_per_minute=2)
    lim = limiter(table, now=1000.0)
    clock = clock_of(lim)
    assert lim.admit_now("k", policy) is None
    clock.now = 1030.0
    assert lim.admit_now("k", policy) is None
    clock.now = 1045.0
    assert lim.admit_now("k", policy) == Refusal(REQUESTS, 2, 0, 15.0)
    clock.now = 1059.9
    assert lim.admit_now("k", policy) is not None
    clock.now = 1060.0  # the window that began at 1000 is over
    assert lim.admit_now("k", policy) is None
    clock.now = 1061.0
    assert lim.admit_now("k", policy) is None
    clock.now = 1062.0
    refusal = lim.admit_now("k", policy)
    assert refusal is not None and refusal.reset == pytest.approx(58.0)


def test_a_refusal_counts_nothing(table: LocalTable) -> None:
    lim = limiter(table)
    strict = Policy("p", requests_per_minute=1, concurrent_requests=1)
    assert lim.admit_now("k", strict) is None
    for _ in range(5):
        assert lim.admit_now("k", strict) is not None
    lim.finish_now("k", 0)
    # One request counted in the window, none in flight: a looser policy admits.
    loose = Policy("p", requests_per_minute=2, concurrent_requests=1)
    assert lim.admit_now("k", loose) is None
    assert lim.admit_now("k", loose) is not None


def test_checks_run_in_order_concurrent_requests_tokens_budget(table: LocalTable) -> None:
    lim = limiter(table)
    everything = Policy(
        "p", requests_per_minute=1, tokens_per_minute=10, concurrent_requests=1, tokens_per_day=10
    )
    assert lim.admit_now("k", everything) is None
    # Held, one request, no tokens yet: concurrency comes first.
    refusal = lim.admit_now("k", everything)
    assert refusal is not None and refusal.limit == CONCURRENT
    lim.finish_now("k", 10)
    refusal = lim.admit_now("k", everything)
    assert refusal is not None and refusal.limit == REQUESTS
    refusal = lim.admit_now("k", Policy("p", tokens_per_minute=10, tokens_per_day=10))
    assert refusal is not None and refusal.limit == TOKENS
    refusal = lim.admit_now("k", Policy("p", tokens_per_day=10))
    assert refusal is not None and refusal.limit == BUDGET


def test_tokens_are_charged_at_finish_and_refuse_only_once_spent(table: LocalTable) -> None:
    policy = Policy("p", tokens_per_minute=100)
    lim = limiter(table, now=1000.0)
    clock = clock_of(lim)
    assert lim.admit_now("k", policy) is None
    assert lim.admit_now("k", policy) is None  # nothing charged yet
    lim.finish_now("k", 60)
    clock.now = 1010.0
    assert lim.admit_now("k", policy) is None  # 60 of 100
    lim.finish_now("k", 39)
    assert lim.admit_now("k", policy) is None  # 99 of 100
    lim.finish_now("k", 150)  # one request may overshoot by its own size
    clock.now = 1020.0
    assert lim.admit_now("k", policy) == Refusal(TOKENS, 100, 0, 40.0)
    clock.now = 1060.0
    assert lim.admit_now("k", policy) is None


def test_tokens_of_a_request_outliving_its_window_open_the_next(table: LocalTable) -> None:
    policy = Policy("p", tokens_per_minute=100)
    lim = limiter(table, now=1000.0)
    clock = clock_of(lim)
    assert lim.admit_now("k", policy) is None
    clock.now = 1090.0  # a long stream ends after its window
    lim.finish_now("k", 500)
    clock.now = 1100.0
    assert lim.admit_now("k", policy) == Refusal(TOKENS, 100, 0, 50.0)


def test_the_day_budget_ends_at_utc_midnight(table: LocalTable) -> None:
    policy = Policy("p", tokens_per_day=1000)
    lim = limiter(table, wall=NOON)
    wall = wall_of(lim)
    clock = clock_of(lim)
    assert lim.admit_now("k", policy) is None
    lim.finish_now("k", 1000)
    clock.now += 3600  # minute windows long over: only the day counts
    wall.now = NOON + 3600
    assert lim.admit_now("k", policy) == Refusal(BUDGET, 1000, 0, 11 * 3600.0)
    wall.now = NOON + 12 * 3600 - 1
    refusal = lim.admit_now("k", policy)
    assert refusal is not None and refusal.reset == pytest.approx(1.0)
    wall.now = NOON + 12 * 3600  # 00:00 UTC
    assert lim.admit_now("k", policy) is None
    lim.finish_now("k", 999)
    assert lim.admit_now("k", policy) is None  # 999 of the new day's 1000


def test_buckets_are_counted_apart(table: LocalTable) -> None:
    policy = Policy("p", requests_per_minute=1)
    lim = limiter(table)
    assert lim.admit_now("a", policy) is None
    assert lim.admit_now("b", policy) is None
    assert lim.admit_now("a", policy) is not None


def test_the_coroutine_interface(table: LocalTable) -> None:
    policy = Policy("p", requests_per_minute=1, concurrent_requests=1)
    lim = limiter(table)

    async def go() -> tuple[Refusal | None, Refusal | None]:
        first = await lim.admit("k", policy)
        second = await lim.admit("k", policy)
        await lim.finish("k", policy, 5)
        await lim.close()
        return first, second

    first, second = asyncio.run(go())
    assert first is None
    assert second is not None and second.limit == CONCURRENT


# A full table


def test_a_full_table_admits_unlimited_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    small = LocalTable(capacity=4, slots=2)
    small.reset_slot(0)
    small.reset_slot(1)
    lim = LocalLimiter(small, 0)
    policy = Policy("p", requests_per_minute=1)
    for i in range(4):
        assert lim.admit_now(f"k{i}", policy) is None
        assert lim.admit_now(f"k{i}", policy) is not None
    with caplog.at_level(logging.WARNING, logger="fluxgate.limits"):
        for bucket in ("extra1", "extra2"):
            for _ in range(3):
                assert lim.admit_now(bucket, policy) is None
                lim.finish_now(bucket, 10)
        other = LocalLimiter(small, 1)  # another worker: the warning was given for all
        assert other.admit_now("extra3", policy) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "full" in warnings[0].getMessage()
    assert small.used == 4
    assert lim.admit_now("k0", policy) is not None  # the buckets with room still count
    os.close(small.fd)


# Day budgets across a restart


def spend(table: LocalTable, bucket: str, tokens: int, wall: float = NOON) -> None:
    lim = limiter(table, wall=wall)
    assert lim.admit_now(bucket, Policy("p")) is None
    lim.finish_now(bucket, tokens)


def test_save_and_load_round_trip(table: LocalTable, tmp_path: Path) -> None:
    spend(table, "a", 700)
    spend(table, "b", 5)
    path = str(tmp_path / STATE_FILE)
    table.save(path, wall=NOON)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == [STATE_FILE]  # no temporary file left
    text = Path(path).read_text()
    assert '"a"' not in text and '"b"' not in text  # digests, never names

    restarted = LocalTable(capacity=64, slots=8)
    assert restarted.load(path, wall=NOON + 60) == 2
    lim = limiter(restarted, wall=NOON + 60)
    assert lim.admit_now("a", Policy("p", tokens_per_day=700)) is not None
    assert lim.admit_now("a", Policy("p", tokens_per_day=701)) is None
    assert lim.admit_now("b", Policy("p", tokens_per_day=6)) is None
    # The next day the file is worth nothing.
    tomorrow = LocalTable(capacity=64, slots=8)
    assert tomorrow.load(path, wall=NOON + DAY_SECONDS) == 0
    for t in (restarted, tomorrow):
        os.close(t.fd)


def test_save_replaces_the_file_whole_or_not_at_all(
    table: LocalTable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / STATE_FILE)
    spend(table, "a", 100)
    table.save(path, wall=NOON)
    before = Path(path).read_text()
    spend(table, "a", 100)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ratelimit_local.json, "dump", broken)
    with pytest.raises(OSError):
        table.save(path, wall=NOON)
    assert Path(path).read_text() == before
    assert os.listdir(tmp_path) == [STATE_FILE]
    monkeypatch.undo()
    table.save(path, wall=NOON)
    assert json.loads(Path(path).read_text())["tokens"] != json.loads(before)["tokens"]


def test_load_refuses_a_malformed_file(table: LocalTable, tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    for text in ("{", "[]", '{"version": 99}', '{"version": 1, "day": 0, "tokens": []}'):
        path.write_text(text.replace('"day": 0', f'"day": {int(NOON // DAY_SECONDS)}'))
        with pytest.raises(ValueError):
            table.load(str(path), wall=NOON)
    assert table.load(str(tmp_path / "missing.json")) == 0


def test_budget_store_saves_when_changed_and_due(table: LocalTable, tmp_path: Path) -> None:
    clock = Clock(0.0)
    store = BudgetStore(table, str(tmp_path / "state"), clock=clock)
    store.load()  # no file yet: nothing spent, no warning
    store.tick()
    assert not os.path.exists(store.path)
    spend(table, "a", 10, wall=time.time())
    clock.now = 4.9
    store.tick()
    assert not os.path.exists(store.path)  # not due
    clock.now = 5.0
    store.tick()
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    mtime = os.stat(store.path).st_mtime_ns
    clock.now = 20.0
    store.tick()  # nothing changed: not written again
    assert os.stat(store.path).st_mtime_ns == mtime
    spend(table, "a", 10, wall=time.time())
    store.save()  # at shutdown, due or not
    assert json.loads(Path(store.path).read_text())["tokens"] != {}


def test_budget_store_that_cannot_write_warns_once(
    table: LocalTable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = BudgetStore(table, str(blocker / "state"))  # under a file: cannot exist
    with caplog.at_level(logging.WARNING, logger="fluxgate.limits"):
        store.load()
        for _ in range(3):
            spend(table, "a", 10, wall=time.time())
            store.save()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/fluxgate:/var/lib/other")
    assert state_directory("/etc/fluxgate/fluxgate.yaml") == "/var/lib/fluxgate"
    monkeypatch.delenv("STATE_DIRECTORY")
    assert state_directory("/etc/fluxgate/fluxgate.yaml") == "/etc/fluxgate/fluxgate-state"


def test_tokens_of_finished_requests_are_charged_at_the_next_admission_or_after_the_delay() -> None:
    table = LocalTable(capacity=64, slots=2)
    table.reset_slot(0)
    policy = Policy("p", tokens_per_minute=10)

    async def run() -> tuple[object, object, object]:
        lim = LocalLimiter(table, 0)
        assert lim.admit_now("b", policy) is None
        lim.finish_now("b", 30)  # waits for the lock's next use
        pending = lim.admit_now("b", policy)  # charged first, under this admission's lock
        assert lim.admit_now("c", policy) is None
        lim.finish_now("c", 30)
        await asyncio.sleep(TOKEN_DELAY * 3)  # or charged by the timer
        later = lim.admit_now("c", policy)
        await lim.close()
        return pending, later, lim._pending

    first, second, left = asyncio.run(run())
    assert isinstance(first, Refusal) and first.limit == TOKENS
    assert isinstance(second, Refusal) and second.limit == TOKENS
    assert left == {}
    os.close(table.fd)
