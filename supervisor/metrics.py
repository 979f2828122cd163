"""The master's side of the metrics: the shared directory, dead workers, its own
series, and the optional separate listener (`server.metrics_address`).

This module imports prometheus_client, so it may only be imported once
`supervisor.app.prepare_metrics_directory` has set `PROMETHEUS_MULTIPROC_DIR`
(the library picks its file storage at import time).

Dead workers: prometheus_client's `mark_process_dead` drops a dead process's
live gauges. Its counters and histograms must outlive it (a counter that went
down would read as a reset), but one file set per dead worker would pile up
and slow every scrape, so they are folded into one archive file per type and
deleted, under an exclusive lock that readers take shared.

The master's series: `fluxgate_config_generation` and `fluxgate_workers` use
the `livemax` gauge mode: only the master writes them (a forked worker's copy
of such a gauge reads 0 and is removed when it dies, so the max is the
master's value); `fluxgate_config_reloads_total{outcome}` and
`fluxgate_worker_restarts_total` are counters.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import threading
from typing import Any

from prometheus_client import Counter, Gauge, start_http_server
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import mark_process_dead

from fluxgate.config import Config, split_bind_address
from fluxgate.errors import METRICS_UNREADABLE
from fluxgate.logs import log_fields
from fluxgate.metrics import (
    HEADER_SIZE,
    READ_ERRORS,
    MetricsUnreadable,
    check_multiprocess,
    locked,
    registry,
)

log = logging.getLogger("fluxgate.supervisor")

ARCHIVED_TYPES = ("counter", "histogram")  # files whose values outlive their process


def archive_dead_worker(directory: str, pid: int) -> None:
    """Forget a dead worker's live gauges; fold its counters and histograms into
    the archive so that their totals stay and its files go."""
    mark_process_dead(pid, directory)
    with locked(directory, fcntl.LOCK_EX):
        for kind in ARCHIVED_TYPES:
            path = os.path.join(directory, f"{kind}_{pid}.db")
            if not os.path.exists(path):
                continue
            values = _dead_values(path, pid)
            if values:
                archive = MmapedDict(os.path.join(directory, f"{kind}_archive.db"))
                try:
                    for key, value in values:
                        total, _ = archive.read_value(key)
                        archive.write_value(key, total + value, 0.0)
                finally:
                    archive.close()
            os.remove(path)
        # Gauges in the other modes are not used by workers; drop leftovers.
        for path in glob.glob(os.path.join(directory, f"gauge_*_{pid}.db")):
            os.remove(path)


def _dead_values(path: str, pid: int) -> list[tuple[str, float]]:
    """A dead worker's non-zero series. A file it died before sizing holds none;
    one that cannot be read is dropped with a warning, because left in place
    it would fail every scrape from then on."""
    if os.stat(path).st_size < HEADER_SIZE:
        return []
    try:
        values = MmapedDict.read_all_values_from_file(path)
        return [(key, value) for key, value, _timestamp, _pos in values if value]
    except READ_ERRORS as exc:
        log_fields(log, logging.WARNING, "metrics of a dead worker unreadable, dropped",
                   pid=pid, file=os.path.basename(path), error=type(exc).__name__)  # fmt: skip
        return []


class MetricsListener:
    """prometheus_client's own HTTP server, in a thread of the master."""

    def __init__(self, address: str, directory: str) -> None:
        host, port = split_bind_address(address)
        self.address = address
        self.server, self.thread = start_http_server(port, host, registry(directory))
        self.server.set_app(_answering_unreadable(self.server.get_app()))

    def close_inherited(self) -> None:
        """In a forked worker: drop its copy of the socket (no thread came along)."""
        self.server.socket.close()

    def stop(self) -> None:
        # shutdown() waits for the serving loop to notice (up to 0.5 s): not in
        # the master's main loop.
        threading.Thread(target=self.stop_now, daemon=True).start()

    def stop_now(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _answering_unreadable(app: Any) -> Any:
    """The library's WSGI app, answering files it cannot read as the workers'
    endpoint does (fluxgate.endpoints): 503 with a JSON body and one WARNING,
    where the WSGI server would print a traceback and a bare 500."""
    status = f"{METRICS_UNREADABLE.status} Service Unavailable"
    headers = [(name.decode(), value.decode()) for name, value in METRICS_UNREADABLE.headers]

    def metrics_app(environ: dict[str, Any], start_response: Any) -> Any:
        try:
            return app(environ, start_response)
        except MetricsUnreadable as exc:
            log_fields(log, logging.WARNING, "metrics unreadable", error=str(exc))
            start_response(status, headers)
            return [METRICS_UNREADABLE.body]

    return metrics_app


class MasterMetrics:
    def __init__(self, directory: str) -> None:
        check_multiprocess()
        self.directory = directory
        self.listener: MetricsListener | None = None
        self.generation = Gauge(
            "fluxgate_config_generation",
            "Config generation the supervisor published.",
            multiprocess_mode="livemax",
            registry=None,
        )
        self.workers = Gauge(
            "fluxgate_workers",
            "Worker processes running.",
            multiprocess_mode="livemax",
            registry=None,
        )
        self.reloads = Counter(
            "fluxgate_config_reloads",
            "Config changes seen, by outcome: applied, rejected (invalid), "
            "unreadable (file missing or unreadable).",
            ["outcome"],
            registry=None,
        )
        self.restarts = Counter(
            "fluxgate_worker_restarts",
            "Workers that exited without being asked to (crash, kill, watchdog) and were replaced.",
            registry=None,
        )
        for outcome in ("applied", "rejected", "unreadable"):
            self.reloads.labels(outcome)  # present at 0 from the start

    def reload_outcome(self, outcome: str, generation: int) -> None:
        self.reloads.labels(outcome).inc()
        self.generation.set(generation)

    def worker_exited(self, pid: int, *, asked: bool) -> None:
        if not asked:
            self.restarts.inc()
        try:
            archive_dead_worker(self.directory, pid)
        except OSError as exc:  # never let bookkeeping take the master down
            log.warning("could not archive the metrics of worker %d: %s", pid, exc)

    def close_inherited(self) -> None:
        if self.listener is not None:
            self.listener.close_inherited()

    def apply(self, config: Config) -> None:
        """Start, move or stop the separate listener to match `config`."""
        self.generation.set(config.generation)
        wanted = config.server.metrics_address if config.server.metrics else None
        current = self.listener.address if self.listener is not None else None
        if wanted == current:
            return
        if wanted is None:
            self._stop_listener()
            return
        try:
            listener = MetricsListener(wanted, self.directory)
        except OSError as first:
            if self.listener is None or first.errno != errno.EADDRINUSE:
                self._bind_failed(wanted, first, keeping=self.listener is not None)
                return
            # The new address may overlap the old one (same port, wildcard host).
            old, self.listener = self.listener, None
            old.stop_now()
            try:
                listener = MetricsListener(wanted, self.directory)
            except OSError as exc:
                self._bind_failed(wanted, exc, keeping=False)
                self.apply_address(old.address)
                return
        self._stop_listener()
        self.listener = listener
        log_fields(log, logging.INFO, "serving metrics", address=wanted)

    def apply_address(self, address: str) -> None:
        try:
            self.listener = MetricsListener(address, self.directory)
        except OSError as exc:
            self._bind_failed(address, exc, keeping=False)

    def _bind_failed(self, address: str, exc: OSError, *, keeping: bool) -> None:
        log_fields(
            log,
            logging.WARNING,
            "cannot bind the metrics listener" + ("; keeping the old one" if keeping else ""),
            address=address,
            reason=exc.strerror or str(exc),
        )

    def _stop_listener(self) -> None:
        if self.listener is not None:
            self.listener.stop()
            self.listener = None

    def set_workers(self, count: int) -> None:
        self.workers.set(count)
