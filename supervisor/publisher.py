"""The master's view of the config file: read, validate, decide, publish.

README "Changes while running". Every check reads the file and hashes its
bytes; only content that differs from what is serving (or from what was
last rejected) is parsed. A valid version becomes the next generation and is
published as a snapshot for the workers; an invalid one is logged with every
problem and the last good config keeps serving. File errors (deleted,
unreadable, a directory) are logged once per condition, not once per poll.
A snapshot that cannot be written (the runtime directory was removed and
cannot be made again) is the same: the workers keep the generation they
have, the change is retried at the next check, and that is logged once.
Every event is one log line; a rejected file's problems are one field.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fluxgate.config import DEFAULT_DOC, Config, default_config
from fluxgate.configfile import (
    ConfigFileError,
    ConfigInvalid,
    parse_config_bytes,
    read_config_bytes,
    sha256_hex,
)
from fluxgate.logs import log_fields
from fluxgate.snapshot import SNAPSHOT_NAME, write_snapshot

from . import oneline

log = logging.getLogger("fluxgate.supervisor")


@dataclass(frozen=True, slots=True)
class Applied:
    """A new generation was published; `previous` is what served before it."""

    config: Config
    previous: Config


class ConfigPublisher:
    def __init__(
        self, path: str, runtime_dir: str, prepare: Callable[[], None] | None = None
    ) -> None:
        self.path = os.path.abspath(path)
        self.snapshot_path = os.path.join(runtime_dir, SNAPSHOT_NAME)
        # Called before each snapshot is written: recreates a removed runtime directory.
        self._prepare = prepare
        self._publish_error: str | None = None
        self.config: Config = default_config(generation=1)
        self.doc: dict[str, Any] = dict(DEFAULT_DOC)
        self._applied_digest: str | None = None
        self._rejected_digest: str | None = None
        self._file_error: str | None = None
        # Told of every reload outcome ("applied", "rejected", "unreadable") and
        # the generation then serving: the master's metrics.
        self.on_outcome: Callable[[str, int], None] | None = None

    def _outcome(self, outcome: str) -> None:
        if self.on_outcome is not None:
            self.on_outcome(outcome, self.generation)

    @property
    def generation(self) -> int:
        return self.config.generation

    def load_initial(self) -> Config:
        """The config to start on: the file's, or the safe defaults with one WARNING."""
        try:
            data = read_config_bytes(self.path)
            loaded = parse_config_bytes(data, generation=1)
        except ConfigFileError as exc:
            self._file_error = exc.reason
            log_fields(
                log,
                logging.WARNING,
                "config file not loaded; serving safe defaults that reject every request",
                path=self.path,
                error=exc.reason,
                cause=str(exc),
            )
        except ConfigInvalid as exc:
            self._rejected_digest = sha256_hex(data)
            log_fields(
                log,
                logging.WARNING,
                "config file invalid; serving safe defaults that reject every request",
                path=self.path,
                error="invalid",
                problems=len(exc.errors),
                cause="; ".join(exc.errors),
            )
        else:
            self.config, self.doc = loaded.config, loaded.doc
            self._applied_digest = loaded.digest
            log_fields(
                log,
                logging.INFO,
                "config loaded",
                path=self.path,
                generation=self.generation,
                upstreams=len(self.config.upstreams),
            )
        self._write(self.generation, self.doc)  # at start a failure is fatal: nothing serves yet
        return self.config

    def check(self, forced: bool = False) -> Applied | None:
        """Re-read the file; publish and return the new config if it changed and is valid.

        `forced` is a SIGHUP: it always reports what it found, even "unchanged".
        """
        try:
            data = read_config_bytes(self.path)
        except ConfigFileError as exc:
            if forced or exc.reason != self._file_error:
                self._outcome("unreadable")  # counted before logged: the line means it is
                log_fields(
                    log,
                    logging.WARNING,
                    "config file unavailable; keeping the last good config",
                    path=self.path,
                    error=exc.reason,
                    cause=str(exc),
                    generation=self.generation,
                )
            self._file_error = exc.reason
            return None
        recovered = self._file_error is not None
        self._file_error = None
        digest = sha256_hex(data)
        if digest == self._applied_digest:
            if forced or recovered:
                log_fields(
                    log,
                    logging.INFO,
                    "config unchanged",
                    path=self.path,
                    generation=self.generation,
                )
            return None
        if digest == self._rejected_digest and not forced:
            return None
        try:
            loaded = parse_config_bytes(data, generation=self.generation + 1)
        except ConfigInvalid as exc:
            self._rejected_digest = digest
            self._outcome("rejected")
            # One event, one line (journald and Loki make a record of each line).
            log_fields(
                log,
                logging.WARNING,
                "config rejected; keeping the last good config",
                path=self.path,
                generation=self.generation,
                problems=len(exc.errors),
                errors="; ".join(exc.errors),
            )
            return None
        if not self._publish(loaded.config.generation, loaded.doc):
            return None
        previous = self.config
        self.config, self.doc = loaded.config, loaded.doc
        self._applied_digest = digest
        self._rejected_digest = None
        self._outcome("applied")
        log_fields(
            log,
            logging.INFO,
            "config applied",
            path=self.path,
            generation=self.generation,
            outcome="applied",
        )
        return Applied(self.config, previous)

    def _write(self, generation: int, doc: dict[str, Any]) -> None:
        if self._prepare is not None:
            self._prepare()
        write_snapshot(self.snapshot_path, generation, doc)

    def _publish(self, generation: int, doc: dict[str, Any]) -> bool:
        """Write the snapshot of a new generation; False (logged once) when it cannot be."""
        try:
            self._write(generation, doc)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if reason != self._publish_error:
                log_fields(
                    log,
                    logging.WARNING,
                    "cannot publish the config to the workers; they keep the last good config",
                    path=self.snapshot_path,
                    error=oneline.describe(exc),
                    generation=self.generation,
                )
            self._publish_error = reason
            return False
        self._publish_error = None
        return True
