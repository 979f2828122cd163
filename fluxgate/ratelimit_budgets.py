"""The master's side of the day budgets (README "Limits and budgets"): they
survive a restart of the service.

The master loads today's tokens into the local table (fluxgate.ratelimit_local)
from a JSON file in the state directory at start, and saves them when they
changed, at most every `SAVE_INTERVAL` seconds and at shutdown. Under systemd
the directory is `$STATE_DIRECTORY` (`StateDirectory=fluxgate` in the unit).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Final

from .logs import log_fields
from .ratelimit_local import LocalTable

log = logging.getLogger("fluxgate.limits")

SAVE_INTERVAL: Final = 5.0  # seconds between the master's saves of the day budgets
STATE_FILE: Final = "budgets.json"
STATE_SUBDIRECTORY: Final = "fluxgate-state"  # next to the config, outside systemd


def state_directory(config_path: str) -> str:
    """Where the day budgets are kept: $STATE_DIRECTORY (systemd's StateDirectory=;
    the first, if it names several), else `fluxgate-state` beside the config file."""
    configured = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if configured:
        return configured
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), STATE_SUBDIRECTORY)


class BudgetStore:
    """The master's side of the day budgets' persistence: load at start, save
    when they changed (at most every SAVE_INTERVAL s) and at shutdown. It never
    fails a start: a file that cannot be read or written is one WARNING."""

    def __init__(
        self,
        table: LocalTable,
        directory: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILE)
        self.clock = clock
        self._last_save = clock()
        self._warned = False

    def load(self) -> None:
        try:
            self.table.load(self.path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            self._warn("cannot read the token budgets; starting from none spent", exc)

    def tick(self) -> None:
        """Called from the master's loop (at least once a second)."""
        now = self.clock()
        if now - self._last_save >= SAVE_INTERVAL:
            self._last_save = now
            self.save()

    def save(self) -> None:
        if self.table.changes == self.table.saved_changes:
            return
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self.table.save(self.path)
        except OSError as exc:
            self._warn("cannot save the token budgets; they will not survive a restart", exc)

    def _warn(self, message: str, exc: BaseException) -> None:
        if self._warned:
            return
        self._warned = True
        log_fields(
            log,
            logging.WARNING,
            message,
            path=self.path,
            error=getattr(exc, "strerror", None) or str(exc),
        )
