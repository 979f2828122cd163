"""Watch the YAML config file and wake the supervisor when it may have changed.

The watcher only says "look again": the master re-reads the file, compares a
sha256 of its bytes with the last one it saw, and validates it. A spurious call
therefore costs one read and one hash, while a missed change would leave the
workers on stale keys; every design choice below errs on the side of calling.

inotify is armed on directories, never on the file itself: editors that save by
write-and-rename, atomic ``os.replace``, the Kubernetes ConfigMap ``..data``
symlink swap and delete-then-recreate all replace the file's inode, and a watch
on the old inode would go silent. Two directories are watched: the one that
holds the configured path (where symlink swaps happen) and the one that holds
the fully resolved file (where an edit behind a symlink happens). A directory
that does not exist yet is replaced by a watch on its deepest existing ancestor
until it appears. A periodic call (``poll_interval``) is the safety net for the
cases inotify cannot see (a symlink swapped in some ancestor directory, network
file systems, an exhausted inotify watch limit).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from inotify_simple import INotify, flags

__all__ = ["ConfigWatcher"]

logger = logging.getLogger("fluxgate.watcher")

# IN_MODIFY never triggers a call: it fires on every write(2), so reacting to
# it would hand the master half-written files. It only marks an in-place write
# as in progress, which holds back the periodic call (the poll would otherwise
# read the half-written file) until IN_CLOSE_WRITE marks its end. The
# rename/create/delete events cover the other ways a file gets replaced, and
# IN_ATTRIB covers touch/chmod (and the link-count drop of an unlink).
_DIR_MASK: int = int(
    flags.MODIFY
    | flags.CLOSE_WRITE
    | flags.MOVED_TO
    | flags.MOVED_FROM
    | flags.CREATE
    | flags.DELETE
    | flags.ATTRIB
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
)
_SELF_EVENTS: int = int(flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT)
_IGNORED: int = int(flags.IGNORED)
_Q_OVERFLOW: int = int(flags.Q_OVERFLOW)
_MODIFY: int = int(flags.MODIFY)

# Failures of inotify_add_watch that mean "the directory vanished between the
# check and the call": retry at once instead of waiting for the next poll.
_VANISHED = frozenset({errno.ENOENT, errno.ENOTDIR})
# Re-planning rounds per sync; more are only needed while directories are
# created or swapped faster than we can arm watches, and the next event or
# poll picks up from there.
_SYNC_ATTEMPTS = 5

# How long stop() waits for the thread. It only exceeds a few milliseconds
# when the on_change callback itself blocks.
_STOP_TIMEOUT = 5.0
# Pause after an unexpected error in the loop, so a persistent failure logs
# once per second instead of spinning.
_ERROR_BACKOFF_MS = 1000


@dataclass(frozen=True)
class _Filter:
    """Which entry names inside one watched directory matter to us."""

    names: frozenset[str]
    # Kubernetes swaps the ``..data`` symlink and creates ``..<timestamp>``
    # directories next to the file: any ``..*`` name can change what the
    # configured path resolves to.
    dotdot: bool

    def matches(self, name: str) -> bool:
        return name in self.names or (self.dotdot and name.startswith(".."))


@dataclass(frozen=True)
class _Armed:
    wd: int
    # (st_dev, st_ino) of the directory when the watch was added; a different
    # identity later means the path now names another directory (deleted and
    # re-created, or a symlink on the way was swapped) and the watch is stale.
    ident: tuple[int, int]


class ConfigWatcher:
    """Call ``on_change`` from a daemon thread whenever ``path`` may have changed.

    ``on_change`` runs in the watcher thread and should only hand off work (the
    master enqueues a wake-up). It is called once after relevant inotify events
    have been quiet for ``settle`` seconds, and unconditionally every
    ``poll_interval`` seconds.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_change: Callable[[], None],
        *,
        settle: float = 0.02,
        poll_interval: float = 1.0,
    ) -> None:
        if settle < 0:
            raise ValueError(f"settle must be >= 0, got {settle!r}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        # Made absolute now: a later chdir() in the master must not move the watch.
        self._path = os.path.abspath(os.fspath(path))
        self._on_change = on_change
        self._settle = settle
        self._poll_interval = poll_interval

        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake_fd = -1
        self._inotify: INotify | None = None
        # Only touched by start() before the thread exists, then by the thread.
        self._armed: dict[str, _Armed] = {}
        self._filters: dict[int, list[_Filter]] = {}
        self._arm_errors: dict[str, int] = {}
        # An in-place write to the file has begun (IN_MODIFY) and not ended
        # (IN_CLOSE_WRITE, or the file replaced): the poll must not read it.
        self._writing = False

    @property
    def path(self) -> str:
        return self._path

    def start(self) -> None:
        """Arm the watches and start the watcher thread.

        The watches are armed before this returns, so a change made right
        after ``start()`` is seen.
        """
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError("ConfigWatcher already started")
            wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                self._inotify = INotify()
            except OSError as exc:
                # Typically fs.inotify.max_user_instances exhausted. The
                # periodic call still gets changes through, just slower.
                logger.error(
                    "inotify unavailable (%s); checking %s every %.1f s only",
                    exc,
                    self._path,
                    self._poll_interval,
                )
                self._inotify = None
            self._armed.clear()
            self._filters.clear()
            self._arm_errors.clear()
            try:
                self._sync_watches()
            except Exception:
                logger.exception("arming inotify watches for %s failed", self._path)
            self._wake_fd = wake_fd
            self._thread = threading.Thread(
                target=self._run, name="fluxgate-config-watcher", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and release its file descriptors.

        Returns as soon as the thread has exited; waits at most a few seconds
        (only a blocked ``on_change`` can delay it).
        """
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            if self._wake_fd >= 0:
                try:
                    os.eventfd_write(self._wake_fd, 1)
                except OSError as exc:
                    logger.debug("waking the watcher thread failed: %s", exc)
        if thread is threading.current_thread():
            # Called from on_change: the loop sees the wake-up when it returns.
            return
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            logger.warning(
                "config watcher thread did not stop within %.0f s (on_change blocked?)",
                _STOP_TIMEOUT,
            )
            return
        with self._lock:
            if self._thread is thread:
                self._thread = None

    # -- the thread -------------------------------------------------------

    def _run(self) -> None:
        inotify = self._inotify
        wake_fd = self._wake_fd
        try:
            self._loop(inotify, wake_fd)
        except BaseException:
            # Only reachable through a bug in _loop's own error handling; the
            # master keeps running on the last good config either way.
            logger.exception("config watcher thread crashed")
        finally:
            with self._lock:
                self._wake_fd = -1
                os.close(wake_fd)
                if inotify is not None:
                    inotify.close()
                if self._inotify is inotify:
                    self._inotify = None

    def _loop(self, inotify: INotify | None, wake_fd: int) -> None:
        poller = select.poll()
        poller.register(wake_fd, select.POLLIN)
        ino_fd = -1
        if inotify is not None:
            ino_fd = inotify.fileno()
            poller.register(ino_fd, select.POLLIN)

        next_poll = time.monotonic() + self._poll_interval
        deadline: float | None = None  # when the current burst counts as settled
        while True:
            try:
                wake_at = next_poll if deadline is None else min(next_poll, deadline)
                # Rounded up: a 0 ms timeout for a deadline 0.4 ms away would spin.
                timeout_ms = max(0, math.ceil((wake_at - time.monotonic()) * 1000))
                ready = dict(poller.poll(timeout_ms))
                if wake_fd in ready:
                    return
                if ino_fd in ready:
                    if ready[ino_fd] & (select.POLLERR | select.POLLNVAL):
                        logger.error("inotify descriptor failed; falling back to polling")
                        poller.unregister(ino_fd)
                        ino_fd = -1
                    elif inotify is not None and self._drain(inotify):
                        deadline = time.monotonic() + self._settle

                now = time.monotonic()
                due = False
                if now >= next_poll:
                    # The safety net also re-checks the watches: a symlink
                    # swapped in an unwatched ancestor only shows up here.
                    self._sync_watches()
                    next_poll = now + self._poll_interval
                    # Not in the middle of an in-place write: its close comes as
                    # an event and gets a call of its own once the write is whole.
                    due = not self._writing
                # A pending burst still gets its own call after it settles even
                # if the poll just fired: the poll may have read mid-burst.
                if deadline is not None and now >= deadline:
                    deadline = None
                    due = True
                if due:
                    self._notify()
            except Exception:
                logger.exception("config watcher error; continuing")
                backoff = select.poll()
                backoff.register(wake_fd, select.POLLIN)
                if backoff.poll(_ERROR_BACKOFF_MS):
                    return

    def _notify(self) -> None:
        try:
            self._on_change()
        except Exception:
            logger.exception("config watcher on_change callback failed")

    def _drain(self, inotify: INotify) -> bool:
        """Consume pending events; True when one of them concerns the file."""
        relevant = False
        resync = False
        for event in inotify.read(timeout=0):
            mask = int(event.mask)
            wd = int(event.wd)
            if mask & _Q_OVERFLOW:
                # Events were lost: assume the worst.
                self._writing = False
                relevant = resync = True
                continue
            if mask & _IGNORED:
                # The kernel dropped the watch (directory deleted, file system
                # unmounted). IGNORED for a watch we removed ourselves refers
                # to a wd we no longer track and is skipped.
                if self._forget_wd(wd):
                    relevant = resync = True
                continue
            filters = self._filters.get(wd)
            if filters is None:
                continue
            # Self events (directory deleted or moved) always count: the file
            # went with it.
            if mask & _SELF_EVENTS or any(f.matches(str(event.name)) for f in filters):
                if mask == _MODIFY:
                    self._writing = True  # a write(2) to the file: not a call
                    continue
                self._writing = False
                relevant = resync = True
        # Re-arm now rather than after the debounce, so events of the same
        # burst in a newly created or newly resolved directory are not lost.
        if resync and self._sync_watches():
            # A newly armed directory may already hold a new file whose events
            # happened before the watch existed.
            relevant = True
        return relevant

    # -- watch bookkeeping -------------------------------------------------

    def _plan(self) -> dict[str, list[_Filter]]:
        """Directories to watch now, with the names that matter in each."""
        link_dir, link_name = os.path.split(self._path)
        real_dir, real_name = os.path.split(os.path.realpath(self._path))
        plan: dict[str, list[_Filter]] = {}
        for directory, name in ((link_dir, link_name), (real_dir, real_name)):
            target = directory
            wanted = _Filter(frozenset({name}), dotdot=True)
            # For a missing directory, watch the deepest ancestor that exists
            # for the creation of the next path component.
            while not os.path.isdir(target):
                parent = os.path.dirname(target)
                if parent == target:
                    break
                wanted = _Filter(frozenset({os.path.basename(target)}), dotdot=False)
                target = parent
            filters = plan.setdefault(target, [])
            if wanted not in filters:
                filters.append(wanted)
        return plan

    def _sync_watches(self) -> bool:
        """Make the armed watches match the plan; True if anything changed."""
        if self._inotify is None:
            return False
        changed = False
        for _ in range(_SYNC_ATTEMPTS):
            step_changed, retry = self._apply(self._plan())
            changed |= step_changed
            # Arm first, then look again: a directory created after _plan()
            # checked for it but before its parent's watch existed produced
            # no event anywhere. Only a plan that is stable after arming
            # guarantees the next change is reported.
            if not (step_changed or retry):
                break
        return changed

    def _apply(self, plan: dict[str, list[_Filter]]) -> tuple[bool, bool]:
        inotify = self._inotify
        assert inotify is not None
        changed = False
        retry = False
        for path in list(self._armed):
            if path not in plan:
                self._disarm(path)
                changed = True
        for path in plan:
            try:
                st = os.stat(path)
            except OSError:
                # Vanished since _plan looked: plan again.
                if path in self._armed:
                    self._disarm(path)
                    changed = True
                retry = True
                continue
            ident = (st.st_dev, st.st_ino)
            current = self._armed.get(path)
            if current is not None:
                if current.ident == ident:
                    continue
                self._disarm(path)
                changed = True
            try:
                wd = int(inotify.add_watch(path, _DIR_MASK))
            except OSError as exc:
                if exc.errno in _VANISHED:
                    retry = True
                elif self._arm_errors.get(path) != exc.errno:
                    # ENOSPC (max_user_watches) or EACCES: only the periodic
                    # call is left for this directory. Logged once per cause.
                    self._arm_errors[path] = exc.errno or 0
                    logger.warning(
                        "cannot watch %s for changes of %s (%s); relying on the %.1f s poll",
                        path,
                        self._path,
                        exc,
                        self._poll_interval,
                    )
                continue
            self._arm_errors.pop(path, None)
            self._armed[path] = _Armed(wd, ident)
            changed = True
            logger.debug("watching %s (wd %d) for %s", path, wd, self._path)
        # Two paths can name one directory (a symlinked directory and its
        # target); the kernel then hands out one shared wd.
        self._filters = {}
        for path, armed in self._armed.items():
            wd_filters = self._filters.setdefault(armed.wd, [])
            wd_filters.extend(f for f in plan.get(path, ()) if f not in wd_filters)
        return changed, retry

    def _disarm(self, path: str) -> None:
        armed = self._armed.pop(path)
        if any(other.wd == armed.wd for other in self._armed.values()):
            return
        self._filters.pop(armed.wd, None)
        if self._inotify is not None:
            # EINVAL: the kernel already dropped it (directory deleted).
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(armed.wd)

    def _forget_wd(self, wd: int) -> bool:
        paths = [path for path, armed in self._armed.items() if armed.wd == wd]
        for path in paths:
            del self._armed[path]
        self._filters.pop(wd, None)
        return bool(paths)
