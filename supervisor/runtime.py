"""The master's private runtime directory, and the removal of ones left behind.

The directory holds the published config snapshot (provider keys included,
see fluxgate.snapshot) and the workers' Prometheus files. It is made 0700 by
`tempfile.mkdtemp` under $RUNTIME_DIRECTORY (systemd) or the temporary
directory, and removed by the master on every exit it controls. A master
killed outright (SIGKILL, OOM killer, power cut) cannot remove it, so each
directory records its owner in a `pid` file, and the next start removes the
directories of masters that are gone: only `fluxgate-XXXXXXXX` directories
(never symlinks) of the current user, whose recorded process no longer runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile

from fluxgate.logs import log_fields

log = logging.getLogger("fluxgate.supervisor")

PREFIX = "fluxgate-"
PID_NAME = "pid"
METRICS_NAME = "metrics"
# What tempfile.mkdtemp(prefix=PREFIX) makes: other fluxgate-* names (a demo's
# or a benchmark's temporary directory) are never touched.
_OWN_NAME = re.compile(re.escape(PREFIX) + r"[a-z0-9_]{8}")


def base_directory() -> str:
    return os.environ.get("RUNTIME_DIRECTORY") or tempfile.gettempdir()


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22).

    Together with the pid it names one process: a pid reused by an unrelated
    process has another start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ")".
    fields = data.rsplit(b")", 1)[-1].split()
    return fields[19].decode() if len(fields) > 19 else None


def _owner_line(pid: int) -> str:
    started = _start_time(pid)
    return f"{pid} {started}\n" if started else f"{pid}\n"


class RuntimeDirectory:
    """Created by the master at start; `remove` is a no-op in forked workers."""

    def __init__(self, base: str | None = None) -> None:
        self.base = base or base_directory()
        self.owner_pid = os.getpid()
        self.path = tempfile.mkdtemp(prefix=PREFIX, dir=self.base)
        try:
            self._fill()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    @property
    def metrics(self) -> str:
        return os.path.join(self.path, METRICS_NAME)

    def _fill(self) -> None:
        fd = os.open(
            os.path.join(self.path, PID_NAME),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
            0o600,
        )
        try:
            os.write(fd, _owner_line(self.owner_pid).encode())
        finally:
            os.close(fd)
        os.mkdir(self.metrics, 0o700)

    def ensure(self) -> None:
        """Recreate the directory if something removed it (a tmp cleaner, an operator).

        Raises OSError when the path holds something that is not our directory:
        in a shared /tmp another user could have put a symlink there.
        """
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            os.mkdir(self.path, 0o700)
            self._fill()
            log_fields(
                log, logging.WARNING, "runtime directory was removed; recreated it", path=self.path
            )
            return
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise OSError(f"{self.path} is no longer this master's directory")
        if not os.path.isdir(self.metrics):
            os.mkdir(self.metrics, 0o700)

    def remove(self) -> None:
        if os.getpid() == self.owner_pid:
            shutil.rmtree(self.path, ignore_errors=True)


def _dead_owner(directory: int) -> int | None:
    """The pid recorded in a runtime directory (an open descriptor) if that master is gone."""
    try:
        fd = os.open(PID_NAME, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
    except OSError:
        return None  # not written by a master that records itself: leave it alone
    try:
        text = os.read(fd, 64).decode("ascii", "replace").split()
    finally:
        os.close(fd)
    if not text or not text[0].isdigit() or int(text[0]) < 1:
        return None
    pid = int(text[0])
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except PermissionError:
        return None  # alive, as another user
    # Alive: the same master, unless the pid was reused by a process started later.
    recorded = text[1] if len(text) > 1 else None
    current = _start_time(pid)
    return pid if recorded and current and recorded != current else None


def remove_stale(base: str | None = None) -> list[str]:
    """Remove the runtime directories of masters that are gone; return their paths."""
    base = base or base_directory()
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    uid = os.getuid()
    for entry in entries:
        if not _OWN_NAME.fullmatch(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            # The directory opened is the one checked: lstat and open agree on the inode.
            same = os.fstat(fd)
            if (same.st_dev, same.st_ino) != (st.st_dev, st.st_ino):
                continue
            pid = _dead_owner(fd)
        finally:
            os.close(fd)
        if pid is None:
            continue
        with contextlib.suppress(OSError):
            # rmtree never follows symlinks inside the tree (it works on descriptors).
            shutil.rmtree(entry.path)
            removed.append(entry.path)
            log_fields(
                log,
                logging.INFO,
                "removed the runtime directory of a master that is gone",
                path=entry.path,
                pid=pid,
            )
    return removed
