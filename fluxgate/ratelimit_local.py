"""The local limits backend: counts in shared memory among the workers of one machine.

The master makes one `LocalTable` before it forks (supervisor.app), as it
does the connection table (fluxgate.limits); every worker inherits it and
counts through its own `LocalLimiter`. The table is a fixed-capacity
open-addressing hash table: a bucket's name is hashed to a 16-byte digest,
and its entry holds the minute window (start, requests, tokens) and the UTC
day (day number, tokens that day). Entries are never removed while the
service runs, so the table holds at most `CAPACITY` buckets per run; a
bucket that finds no room is admitted as if it had no limit, and the first
such bucket is logged as one WARNING. A restart empties the table (the day
budgets come back from the state file, below).

Concurrency is counted per worker slot: a worker only ever changes its own
slot's counts, and the bucket's in-flight requests are the sum over the
slots in use. A worker that dies takes its count with it: the master zeroes
its slot when it is reaped (`release_slot`) and again before the slot is
reused (`reset_slot`).

Every update of the table happens under one lock (fluxgate.ratelimit_local_lock),
which the kernel releases when its holder dies: a worker killed mid-update
cannot stall the others, and at worst that one bucket's counters are left
half updated. It is a robust pthread mutex in the table's own memory, taken
without a system call while nobody waits for it (else a POSIX record lock
on the file holding the memory). One process must not use the table from
two threads at once (workers are single-threaded event loops, and `admit`
never awaits).

A finished request gives its concurrency place back at once, without the
lock. Its tokens are charged later, with those of the other requests the
worker finished meanwhile, under one lock: at its next admission (tokens
`finish_now` was given) or within `TOKEN_DELAY` (tokens `finish_soon` was
given a way to count: the usage is parsed then, off the request's path).

The day's tokens survive a restart: `save` and `load` write and read them as
a JSON file, which the master keeps in the state directory
(fluxgate.ratelimit_budgets). The file holds bucket digests, never bucket
names (a name may be a JWT subject).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mmap
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, Final

from .limits import MAX_SLOTS
from .logs import log_fields
from .ratelimit import (
    BUDGET,
    CONCURRENT,
    REQUESTS,
    TOKENS,
    WINDOW_SECONDS,
    LimitBackendError,
    Limiter,
    Policy,
    Refusal,
    Tokens,
)
from .ratelimit_local_lock import MUTEX_SIZE, TableLock

log = logging.getLogger("fluxgate.limits")

CAPACITY: Final = 16_384  # buckets per service run; then admitted unlimited (one WARNING)
DAY_SECONDS: Final = 86_400
# Retry-After for a request refused at the concurrency limit: it has no window.
CONCURRENT_RETRY: Final = 1.0
TOKEN_DELAY: Final = 0.05  # seconds a finished request's tokens may wait to be charged
STATE_VERSION: Final = 1

# One entry: eight 8-byte fields (one cache line).
_STRIDE: Final = 8
_USED, _KEY_HI, _KEY_LO, _START, _REQUESTS, _TOKENS, _DAY, _DAY_TOKENS = range(_STRIDE)
# The header, in 8-byte fields before the entries: four counters, then the lock's mutex.
_H_USED, _H_SLOTS, _H_CHANGES, _H_FULL_WARNED = 0, 1, 2, 3
_MUTEX_OFFSET: Final = 64
_HEADER: Final = (_MUTEX_OFFSET + MUTEX_SIZE) // 8
_EMPTY: Final = -1  # a bucket with no room in the table (cached per worker)


def digest(bucket: str) -> bytes:
    return hashlib.blake2b(bucket.encode(), digest_size=16, person=b"fluxgate-limits").digest()


def _key_halves(key: bytes) -> tuple[int, int]:
    return int.from_bytes(key[:8], "little", signed=True), int.from_bytes(
        key[8:], "little", signed=True
    )


def utc_day(wall: float) -> int:
    return int(wall // DAY_SECONDS)


class LocalTable:
    """Shared memory for the counts: created by the master, inherited by forks.
    `robust=False`, for tests: the file lock even where there is a robust mutex."""

    def __init__(
        self, capacity: int = CAPACITY, slots: int = MAX_SLOTS, robust: bool = True
    ) -> None:
        self.capacity = capacity
        self.slots = slots
        entries = (_HEADER + capacity * _STRIDE) * 8
        size = entries + capacity * slots * 4
        # One file holds the memory and carries the lock; anonymous where possible.
        try:
            self.fd = os.memfd_create("fluxgate-limits", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            with tempfile.TemporaryFile() as f:  # unlinked at once; only the fd remains
                self.fd = os.dup(f.fileno())
        os.ftruncate(self.fd, size)
        self.memory = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        view = memoryview(self.memory)
        # Integer fields; the window start is a float in the same 8 bytes (`floats`).
        self.fields: Any = view[:entries].cast("q")
        self.floats: Any = view[:entries].cast("d")
        # In-flight requests: [entry][slot] int32, so that an admission reads one
        # cache line for them (the slots in use are the first few).
        self.concurrent: Any = view[entries:].cast("i")
        self.fields[_H_SLOTS] = 1
        self.saved_changes = 0  # `changes` when last saved or loaded (the master's)
        # Every update under it; `take`, `taken` and `give` are its hot path's.
        lock = TableLock(self.memory, _MUTEX_OFFSET, self.fd, robust)
        self.robust_lock = lock.robust  # False: the file lock
        self.take, self.taken, self.give = lock.take, lock.taken, lock.give
        self.lock, self.unlock = lock.lock, lock.unlock

    # Entries

    def find(self, key: bytes, insert: bool) -> int:
        """The entry index of `key` (under the lock), inserting it when asked;
        _EMPTY when it is absent (or the table is full)."""
        hi, lo = _key_halves(key)
        fields = self.fields
        capacity = self.capacity
        index = (lo & 0x7FFFFFFFFFFFFFFF) % capacity
        for _ in range(capacity):
            base = _HEADER + index * _STRIDE
            if not fields[base + _USED]:
                if not insert:
                    return _EMPTY
                fields[base + _KEY_HI] = hi
                fields[base + _KEY_LO] = lo
                fields[base + _USED] = 1  # last: a half-written entry stays free
                fields[_H_USED] += 1
                return index
            if fields[base + _KEY_HI] == hi and fields[base + _KEY_LO] == lo:
                return index
            index = index + 1 if index + 1 < capacity else 0
        return _EMPTY

    @property
    def used(self) -> int:
        return int(self.fields[_H_USED])

    @property
    def changes(self) -> int:
        """Counts changes of the day tokens: the master saves only when it moved."""
        return int(self.fields[_H_CHANGES])

    # Worker slots (the master, from gunicorn's pre_fork and child_exit hooks)

    def reset_slot(self, slot: int) -> None:
        """Zero a slot's in-flight counts before a new worker takes it."""
        self._zero(slot)
        if slot + 1 > self.fields[_H_SLOTS]:
            self.fields[_H_SLOTS] = slot + 1

    def release_slot(self, slot: int) -> None:
        """Forget the requests in flight of a worker that exited (crashed or retired)."""
        self._zero(slot)

    def _zero(self, slot: int) -> None:
        """Only the entries in use: a strided write over all would bring every page
        of the table into memory."""
        fields, concurrent, slots = self.fields, self.concurrent, self.slots
        for index in range(self.capacity):
            if fields[_HEADER + index * _STRIDE + _USED]:
                concurrent[index * slots + slot] = 0

    # The day budgets, across restarts

    def day_tokens(self, wall: float) -> dict[str, int]:
        """Today's tokens per bucket digest (hex), for the state file.

        Read without the lock, so that the master's scan never makes a request
        wait: each field is read whole, and `finish` orders its writes so that
        a count is never seen under the wrong day."""
        today = utc_day(wall)
        found: dict[str, int] = {}
        fields = self.fields
        for index in range(self.capacity):
            base = _HEADER + index * _STRIDE
            if fields[base + _USED] and fields[base + _DAY] == today and fields[base + _DAY_TOKENS]:
                key = int(fields[base + _KEY_HI]).to_bytes(8, "little", signed=True)
                key += int(fields[base + _KEY_LO]).to_bytes(8, "little", signed=True)
                found[key.hex()] = int(fields[base + _DAY_TOKENS])
        return found

    def save(self, path: str, wall: float | None = None) -> None:
        """Write today's tokens per bucket to `path` atomically (0600). Raises OSError."""
        wall = time.time() if wall is None else wall
        changes = self.changes
        state = {"version": STATE_VERSION, "day": utc_day(wall), "tokens": self.day_tokens(wall)}
        directory = os.path.dirname(path) or "."
        fd, temp = tempfile.mkstemp(prefix=".budgets-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:  # mkstemp: 0600
                json.dump(state, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self.saved_changes = changes

    def load(self, path: str, wall: float | None = None) -> int:
        """Take back today's tokens from `path` (a missing file is no budget spent);
        the number of buckets loaded. Raises OSError or ValueError on a bad file."""
        wall = time.time() if wall is None else wall
        try:
            with open(path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return 0
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError("not a budget file of this version")
        today = utc_day(wall)
        if state.get("day") != today:
            return 0  # an earlier day's spending: today starts afresh
        tokens = state.get("tokens")
        if not isinstance(tokens, dict):
            raise ValueError("no tokens")
        loaded = 0
        self.lock()
        try:
            for hex_key, spent in tokens.items():
                key = bytes.fromhex(hex_key)
                if len(key) != 16 or not isinstance(spent, int) or spent < 0:
                    raise ValueError("bad entry")
                index = self.find(key, insert=True)
                if index == _EMPTY:
                    break
                base = _HEADER + index * _STRIDE
                self.fields[base + _DAY] = today
                self.fields[base + _DAY_TOKENS] = spent
                loaded += 1
        finally:
            self.unlock()
        self.saved_changes = self.changes
        return loaded


class LocalLimiter(Limiter):
    """One worker's counts in the shared `LocalTable`, under its slot.

    `clock` (seconds, system-wide monotonic: CLOCK_MONOTONIC is one clock for
    every process of the machine) times the minute windows; `wall_clock`
    (seconds since the epoch) names the UTC day. Both are for tests to replace.
    """

    immediate = True  # the proxy calls `admit_now`: nothing here waits

    def __init__(
        self,
        table: LocalTable,
        slot: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.table = table
        self.slot = slot
        self.clock = clock
        self.wall_clock = wall_clock
        self._indices: dict[str, int] = {}  # bucket -> entry index, or _EMPTY (no room)
        self._pending: dict[int, int] = {}  # entry index -> tokens not charged yet
        self._uncounted: list[tuple[int, Callable[[], int]]] = []  # not even counted yet
        self._timer: asyncio.TimerHandle | None = None
        self._slot = slot

    def _index(self, bucket: str) -> int:
        """Under the lock."""
        index = self._indices.get(bucket)
        if index is None:
            index = self.table.find(digest(bucket), insert=True)
            if index == _EMPTY and not self.table.fields[_H_FULL_WARNED]:
                self.table.fields[_H_FULL_WARNED] = 1  # once for all the workers
                log_fields(
                    log,
                    logging.WARNING,
                    "limit table full: admitting new buckets without limits",
                    backend="local",
                    capacity=self.table.capacity,
                )
            if index != _EMPTY or len(self._indices) < self.table.capacity:
                self._indices[bucket] = index
        return index

    async def admit(self, bucket: str, policy: Policy) -> Refusal | None:
        return self.admit_now(bucket, policy)

    async def finish(self, bucket: str, policy: Policy, tokens: int) -> None:
        self.finish_now(bucket, tokens)

    def finish_soon(
        self,
        bucket: str,
        policy: Policy,
        tokens: Tokens,
        on_error: Callable[[LimitBackendError], None],
    ) -> None:
        """`finish`: it never fails. The place comes back at once; tokens to be
        counted are counted and charged within `TOKEN_DELAY`, with the others."""
        if tokens.__class__ is int:
            self.finish_now(bucket, tokens)
            return
        index = self._indices.get(bucket, _EMPTY)
        if index == _EMPTY:
            return
        place = index * self.table.slots + self._slot
        concurrent = self.table.concurrent
        if concurrent[place] > 0:
            concurrent[place] -= 1
        self._uncounted.append((index, tokens))  # type: ignore[arg-type]
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(TOKEN_DELAY, self.flush_tokens)

    async def close(self) -> None:
        """At the worker's shutdown: the tokens still waiting are charged."""
        self.flush_tokens()

    def admit_now(self, bucket: str, policy: Policy) -> Refusal | None:
        """`admit`, without a coroutine."""
        index = self._indices.get(bucket)
        table = self.table
        now = self.clock()
        if taken := table.take():
            table.taken(taken)
        try:
            if self._pending:
                self._charge_pending()
            if index is None:
                index = self._index(bucket)
            if index == _EMPTY:
                return None
            fields = table.fields
            base = _HEADER + index * _STRIDE
            limit = policy.concurrent_requests
            if limit is not None:
                start = index * table.slots
                if sum(table.concurrent[start : start + fields[_H_SLOTS]]) >= limit:
                    return Refusal(CONCURRENT, limit, 0, CONCURRENT_RETRY)
            requests = fields[base + _REQUESTS]
            tokens = fields[base + _TOKENS]
            ends = table.floats[base + _START] + WINDOW_SECONDS
            running = (requests or tokens) and now < ends
            if not running:  # this request starts a window
                requests = tokens = 0
                ends = now + WINDOW_SECONDS
            limit = policy.requests_per_minute
            if limit is not None and requests >= limit:
                return Refusal(REQUESTS, limit, 0, ends - now)
            limit = policy.tokens_per_minute
            if limit is not None and tokens >= limit:
                return Refusal(TOKENS, limit, 0, ends - now)
            limit = policy.tokens_per_day
            if limit is not None and fields[base + _DAY_TOKENS] >= limit:
                wall = self.wall_clock()
                if fields[base + _DAY] == wall // DAY_SECONDS:
                    return Refusal(BUDGET, limit, 0, DAY_SECONDS - wall % DAY_SECONDS)
            if running:
                fields[base + _REQUESTS] = requests + 1
            else:
                table.floats[base + _START] = now
                fields[base + _TOKENS] = 0
                fields[base + _REQUESTS] = 1
            table.concurrent[index * table.slots + self._slot] += 1
            return None
        finally:
            table.give()

    def finish_now(self, bucket: str, tokens: int) -> None:
        """`finish`, without a coroutine.

        The concurrency place is given back at once and without the lock: each
        worker is the only writer of its own slot, and a reader that sums the
        slots a moment early only sees one place too many (it refuses, never
        overshoots). The tokens wait for the next time this worker takes the
        lock (its next admission) or `TOKEN_DELAY` seconds, whichever comes
        first: one lock per request instead of two, which is what two workers
        contend for.
        """
        index = self._indices.get(bucket, _EMPTY)
        if index == _EMPTY:
            return
        self._give_back(index)
        if tokens > 0:
            self._pending[index] = self._pending.get(index, 0) + tokens
            if self._timer is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop (tests, tools): charge now
                    self.flush_tokens()
                else:
                    self._timer = loop.call_later(TOKEN_DELAY, self.flush_tokens)

    def _give_back(self, index: int) -> None:
        place = index * self.table.slots + self._slot
        concurrent = self.table.concurrent
        if concurrent[place] > 0:
            concurrent[place] -= 1

    def flush_tokens(self) -> None:
        """Count and charge the tokens of finished requests now (see `finish_now`)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        uncounted, self._uncounted = self._uncounted, []
        pending = self._pending
        for index, count in uncounted:  # outside the lock: parsing takes a while
            tokens = count()
            if tokens > 0:
                pending[index] = pending.get(index, 0) + tokens
        if not pending:
            return
        self.table.lock()
        try:
            self._charge_pending()
        finally:
            self.table.unlock()

    def _charge_pending(self) -> None:
        """Under the lock."""
        pending, self._pending = self._pending, {}
        table, fields = self.table, self.table.fields
        now, today = self.clock(), utc_day(self.wall_clock())
        for index, tokens in pending.items():
            base = _HEADER + index * _STRIDE
            if now >= table.floats[base + _START] + WINDOW_SECONDS:
                # The window ended while the request ran: its tokens open the next one.
                table.floats[base + _START] = now
                fields[base + _REQUESTS] = 0
                fields[base + _TOKENS] = tokens
            else:
                fields[base + _TOKENS] += tokens
            if fields[base + _DAY] == today:
                fields[base + _DAY_TOKENS] += tokens
            else:  # the count first: the master's unlocked save must not see it under today
                fields[base + _DAY_TOKENS] = tokens
                fields[base + _DAY] = today
        fields[_H_CHANGES] += 1
