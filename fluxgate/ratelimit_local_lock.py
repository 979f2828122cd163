"""The lock of the local limits table (fluxgate.ratelimit_local), shared by the
workers of one machine.

Either kind is released by the kernel when its holder dies, so a worker
killed while it holds the lock cannot stall the others:

- a robust, process-shared pthread mutex (the C library's, through ctypes)
  in the table's own shared memory: taken and given back without a system
  call while nobody waits for it, which is every admission's case but a
  few; the next to take it after its holder died is told so (EOWNERDEAD)
  and makes it usable again. A worker that finds it held tries again a few
  times before it sleeps in the kernel (a futex): its holder, running on
  the other CPU, gives it back within microseconds, while a sleeper is only
  woken by a system call and then waits for the scheduler, behind every
  other runnable process of a busy machine;
- where the C library has no robust mutex, a POSIX record lock
  (`fcntl.lockf`) on the file holding the memory: two system calls a round.

Both belong to a process (the robust mutex, to its thread): one process
must not use the table from two threads at once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
from collections.abc import Callable

from .ratelimit import LimitBackendError

MUTEX_SIZE = 128  # bytes kept for a pthread_mutex_t (40 or 48 in glibc)
# Tries (of about 0.2 µs each) before sleeping: longer than the table's
# critical section when its holder runs, far shorter than a scheduler's slice.
SPINS = 64


class TableLock:
    """Made by the master before it forks, in `memory` at `offset` (`MUTEX_SIZE`
    bytes) or on the file `fd`; `robust=False` (for tests) takes the file lock
    where there is a robust mutex too.

    `lock()` and `unlock()`; on the hot path, `take()`, then `taken(result)`
    when it returned neither 0 nor None (held by another worker, or an
    error), and `give()`: calls straight into the C library, no Python frame."""

    def __init__(self, memory: mmap.mmap, offset: int, fd: int, robust: bool = True) -> None:
        self.take: Callable[[], int | None]
        self.give: Callable[[], int | None]
        self.robust = False
        if robust:
            try:
                self._mutex(memory, offset)
                self.robust = True
            except OSError:
                pass
        if not self.robust:
            self.take = functools.partial(fcntl.lockf, fd, fcntl.LOCK_EX)
            self.give = functools.partial(fcntl.lockf, fd, fcntl.LOCK_UN)

    def _mutex(self, memory: mmap.mmap, offset: int) -> None:
        """Set up the robust mutex; OSError where the C library has none."""
        try:
            # The calls that never block keep the GIL (PyDLL): letting it go and
            # taking it back would cost more than they do. The one that may sleep
            # lets it go (CDLL). They answer with error codes, never errno.
            libc, keeping = ctypes.CDLL(None), ctypes.PyDLL(None)
            attr_init, set_pshared, set_robust, init, trylock, unlock, consistent = (
                getattr(keeping, f"pthread_{name}")
                for name in (
                    "mutexattr_init",
                    "mutexattr_setpshared",
                    "mutexattr_setrobust",
                    "mutex_init",
                    "mutex_trylock",
                    "mutex_unlock",
                    "mutex_consistent",
                )
            )
            lock = libc.pthread_mutex_lock
        except (OSError, AttributeError) as exc:
            raise OSError(f"no robust pthread mutex: {exc}") from None
        for function in (trylock, lock, unlock, consistent):
            function.argtypes = [ctypes.c_void_p]
            function.restype = ctypes.c_int
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory, offset))
        attr = ctypes.create_string_buffer(64)  # a pthread_mutexattr_t: 4 bytes in glibc
        results = (
            attr_init(attr),
            set_pshared(attr, 1),  # PTHREAD_PROCESS_SHARED
            set_robust(attr, 1),  # PTHREAD_MUTEX_ROBUST
            init(ctypes.c_void_p(address), attr),
        )
        if any(results):
            raise OSError(f"pthread mutex attributes refused: {results}")
        self.take = functools.partial(trylock, address)  # EBUSY when held: see `taken`
        self.give = functools.partial(unlock, address)
        self._wait = functools.partial(lock, address)
        self._consistent = functools.partial(consistent, address)

    def taken(self, result: int) -> None:
        """What `take` returned, when not 0: EBUSY (another worker holds it: wait
        for it here), EOWNERDEAD (its holder died holding it, and it is ours
        now), or an error: LimitBackendError, so that `on_backend_error`
        decides rather than every request failing."""
        if result == errno.EBUSY:
            result = self._contended()
        if result == errno.EOWNERDEAD:
            result = self._consistent()
            if result:  # ours, but not usable again: give it back, never keep it
                self.give()
        if result:
            raise LimitBackendError(f"the limits table's lock: {os.strerror(result)}")

    def _contended(self) -> int:
        """Take the mutex another worker holds: a few more tries while it most
        likely runs its few microseconds under it, then sleep until it is given back."""
        take = self.take
        for _ in range(SPINS):
            result = take()
            if result != errno.EBUSY:
                return result  # type: ignore[return-value]
        return self._wait()  # type: ignore[no-any-return]

    def lock(self) -> None:
        result = self.take()
        if result:
            self.taken(result)

    def unlock(self) -> None:
        self.give()
