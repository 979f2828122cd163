"""The lock of the local limits table (fluxgate/ratelimit_local_lock.py), of either kind:
the kernel hands it on when a worker dies holding it, and a robust mutex left unusable is a
backend error rather than a stall.
"""

from __future__ import annotations

import errno
import os
import platform
import signal
import time
from collections.abc import Iterator

import pytest

from fluxgate.ratelimit import LimitBackendError, Policy
from fluxgate.ratelimit_local import LocalTable
from tests.test_limits_local import limiter


@pytest.fixture(params=[True, False], ids=["robust-mutex", "file-lock"])
def table(request: pytest.FixtureRequest) -> Iterator[LocalTable]:
    t = LocalTable(capacity=64, slots=8, robust=request.param)
    for slot in range(3):
        t.reset_slot(slot)
    yield t
    os.close(t.fd)


def test_a_worker_killed_holding_the_lock_does_not_stall_the_others(table: LocalTable) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        table.lock()
        os.write(w, b"x")
        time.sleep(60)
        os._exit(0)
    os.read(r, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(r)
    os.close(w)
    lim = limiter(table)
    assert lim.admit_now("k", Policy("p", requests_per_minute=1)) is None
    assert lim.admit_now("k", Policy("p", requests_per_minute=1)) is not None  # and again


def test_a_lock_left_unusable_is_a_backend_error_not_a_stall() -> None:
    """Its holder died, and the next one gave it back without making it usable
    again: every admission is then a LimitBackendError (on_backend_error decides)."""
    table = LocalTable(capacity=8, slots=2)
    if not table.robust_lock:
        pytest.skip("only a robust mutex can be left unusable")
    table.reset_slot(0)
    pid = os.fork()
    if pid == 0:
        table.take()
        os._exit(0)
    os.waitpid(pid, 0)
    assert table.take() == errno.EOWNERDEAD
    table.give()  # without pthread_mutex_consistent
    with pytest.raises(LimitBackendError):
        limiter(table).admit_now("k", Policy("p", requests_per_minute=1))
    os.close(table.fd)


def test_the_lock_is_a_robust_mutex_where_the_c_library_has_one() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the robust mutex is looked for in glibc")
    table = LocalTable(capacity=8, slots=2)
    assert table.robust_lock
    os.close(table.fd)


def test_a_lock_another_worker_holds_is_waited_for_then_taken(table: LocalTable) -> None:
    """`take` does not wait (a robust mutex answers EBUSY at once); `taken` then
    tries again and sleeps until the holder gives it back, and returns holding it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        table.lock()
        os.write(w, b"x")
        time.sleep(0.3)  # past every try `taken` makes before it sleeps
        table.unlock()
        os._exit(0)
    os.read(r, 1)
    asked = time.monotonic()
    result = table.take()  # the file lock waits here
    if table.robust_lock:
        assert result == errno.EBUSY
        table.taken(result)
    assert time.monotonic() - asked >= 0.25  # not before the holder gave it back
    table.give()
    os.waitpid(pid, 0)
    os.close(r)
    os.close(w)
