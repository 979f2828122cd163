"""The master process: gunicorn's Arbiter, with in-place config reload instead of restarts.

What changes from the stock Arbiter, and why (docs/architecture.md, "Library traps"):
- SIGHUP and file changes re-read the YAML through `ConfigPublisher` and
  signal the workers to swap their config; the stock HUP would restart
  every worker and block the master for up to the graceful timeout.
- The inotify watcher runs in a thread and only enqueues a wake-up; the
  file is read and validated here, in the main loop, one change at a time.
- SIGINT shuts down as gracefully as SIGTERM, bounded by server.shutdown_timeout_ms.
- A change of `server.bind_address` binds the new address first (keeping the
  old listener if that fails), then replaces the workers gracefully; a change
  of `server.workers` grows or shrinks the pool.
- systemd hears READY=1 only once workers serve, RELOADING=1 around a
  reload and STOPPING=1 at shutdown; gunicorn's own early READY is withheld.
- Each worker is given its slot in the shared connection table and its
  config through gunicorn's own `pre_fork` hook, and gives the slot back
  through `child_exit` (both installed by supervisor.app); the same slot in
  the local limits table (fluxgate.ratelimit_local) is zeroed with it.
- The day token budgets are saved to the state directory from the main loop
  when they changed (at most every 5 s) and once the workers have stopped.
- Metrics (supervisor.metrics): the master counts reloads and worker restarts,
  archives a dead worker's series, and may serve them on their own address.
- SIGUSR1 (logrotate's "reopen your files"): Fluxgate logs only to stderr, so
  there is nothing to reopen; it is logged and forwarded as gunicorn does, and
  the workers ignore it.
- Exit status 0 means a requested shutdown (SIGTERM, SIGINT, SIGQUIT) and
  nothing else: gunicorn's main loop takes any StopIteration as "shut down",
  exit 0, and systemd's Restart=on-failure would then leave the service down.
- The title is `fluxgate: supervisor [config=…]` from the start: gunicorn's
  own titles are turned off (supervisor.app).
- A second supervisor on the same --pid-file says so in one line and exits 1.
- SIGTTIN (one more worker) stops at the connection table's worker bound.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

from gunicorn import sock as gsock
from gunicorn.arbiter import Arbiter
from gunicorn.pidfile import Pidfile

from fluxgate.config import Config
from fluxgate.logs import log_fields
from fluxgate.validation import MAX_WORKERS
from fluxgate.worker import HEARTBEAT_INTERVAL

from . import oneline, sdnotify
from .metrics import MasterMetrics
from .watcher import ConfigWatcher

log = logging.getLogger("fluxgate.supervisor")

# A queue entry that is not a signal: the watcher saw the file change.
CONFIG_EVENT = signal.NSIG + 1


class FluxgateArbiter(Arbiter):
    LISTENERS: list[Any]
    num_workers: int

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.publisher = app.publisher
        self.watcher = ConfigWatcher(self.publisher.path, self._on_file_event)
        self._ready_sent = False
        self._stop_requested = False  # a signal asked for the shutdown: exit 0 is right
        self._asked_to_stop: set[int] = set()  # pids sent a stop signal: not restarts
        self.metrics = app.metrics = MasterMetrics(app.metrics_dir)
        self.publisher.on_outcome = self.metrics.reload_outcome

    # Start and stop

    def start(self) -> None:
        # Before binding: a second supervisor must not touch the first one's port.
        self._check_pid_file()
        if not self.LISTENERS:
            self.LISTENERS = self._bind(self.cfg.address) or []
            if not self.LISTENERS:
                sys.exit(1)
        # gunicorn would send READY=1 before any worker exists, and workers
        # must not inherit the socket.
        sdnotify.claim_socket()
        try:
            super().start()
        except RuntimeError as exc:  # gunicorn's Pidfile: running, or no such directory
            log_fields(log, logging.ERROR, "cannot start", error=oneline.describe(exc))
            sys.exit(1)
        self.metrics.apply(self.app.current_config)
        self.watcher.start()

    def _bind(self, addresses: list[Any]) -> list[Any] | None:
        """Listeners for `addresses`, or None (logged) when any cannot be bound."""
        listeners = []
        for address in addresses:
            try:
                listeners.append(gsock._sock_type(address)(address, self.cfg, self.log))
            except OSError as exc:
                log_fields(
                    log,
                    logging.ERROR,
                    "cannot bind",
                    address=_format(address),
                    reason=exc.strerror or str(exc),
                )
                for listener in listeners:
                    listener.close()
                return None
        return listeners

    def _check_pid_file(self) -> None:
        if not self.cfg.pidfile:
            return
        try:
            running = Pidfile(self.cfg.pidfile).validate()
        except OSError as exc:
            log_fields(
                log,
                logging.ERROR,
                "cannot read the pid file",
                pid_file=self.cfg.pidfile,
                error=exc.strerror or str(exc),
            )
            sys.exit(1)
        if running and running != os.getpid():
            log_fields(
                log,
                logging.ERROR,
                "another supervisor is running with this pid file",
                pid_file=self.cfg.pidfile,
                pid=running,
            )
            sys.exit(1)

    def halt(self, reason: str | None = None, exit_status: int = 0) -> None:
        if exit_status == 0 and not self._stop_requested:
            # gunicorn's loop ends on any StopIteration (or KeyboardInterrupt) with
            # status 0; only a signal's is a shutdown, anything else is a failure.
            exc = sys.exc_info()[1]
            log_fields(
                log,
                logging.ERROR,
                "stopping on an unexpected error",
                error=oneline.describe(exc) if exc is not None else "unknown",
                traceback=oneline.frames(exc.__traceback__) if exc is not None else "",
            )
            exit_status = 1
        sdnotify.stopping()
        self.watcher.stop()
        log.info(
            "shutting down: waiting up to %.0f s for in-flight requests", self.cfg.graceful_timeout
        )
        super().halt(reason, exit_status)

    def stop(self, graceful: bool = True) -> None:
        super().stop(graceful)
        # The workers are gone: nothing charges tokens any more.
        self.app.budget_store.save()

    def handle_term(self) -> None:
        self._stop_requested = True
        super().handle_term()

    def handle_int(self) -> None:
        self._stop_requested = True
        raise StopIteration  # graceful, like SIGTERM

    def handle_quit(self) -> None:
        self._stop_requested = True
        super().handle_quit()

    def handle_ttin(self) -> None:
        if self.num_workers >= MAX_WORKERS:
            log_fields(
                log, logging.WARNING, "SIGTTIN: already at the most workers", workers=MAX_WORKERS
            )
            return
        super().handle_ttin()

    def handle_usr1(self) -> None:
        log.info("SIGUSR1: no log files to reopen (Fluxgate logs to stderr)")
        super().handle_usr1()

    # Workers

    def prepare_worker(self, worker: Any) -> None:
        """gunicorn's `pre_fork` hook (supervisor.app): the new worker's slot in the
        connection table and the config it starts on, carried into it by fork."""
        used = {w.slot for w in self.WORKERS.values()}
        slot = next((i for i in range(self.app.connection_table.size) if i not in used), None)
        if slot is None:  # not a StopIteration: gunicorn's loop would take that for "exit 0"
            raise RuntimeError(
                f"no free slot in the connection table ({len(used)} workers hold all of them)"
            )
        self.app.connection_table.reset_slot(slot)
        self.app.limit_table.reset_slot(slot)
        worker.slot = slot
        worker.fluxgate_config = self.publisher.config
        worker.spawned_at = time.monotonic()

    def worker_gone(self, worker: Any) -> None:
        """gunicorn's `child_exit` hook: a worker has exited and was reaped."""
        # Its connections died with it; a stale count would lower the limit.
        self.app.connection_table.release_slot(worker.slot)
        # Its requests in flight too: they must not hold concurrency places.
        self.app.limit_table.release_slot(worker.slot)
        asked = worker.pid in self._asked_to_stop
        self._asked_to_stop.discard(worker.pid)
        self.metrics.worker_exited(worker.pid, asked=asked)

    def kill_worker(self, pid: int, sig: int) -> None:
        if sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
            self._asked_to_stop.add(pid)
        super().kill_worker(pid, sig)

    def manage_workers(self) -> None:
        super().manage_workers()
        self.metrics.set_workers(len(self.WORKERS))
        if not self._ready_sent and self.WORKERS and self._all_booted():
            self._ready_sent = True
            sdnotify.ready()
            log_fields(
                log,
                logging.INFO,
                "serving",
                address=_format(self.cfg.address[0]),
                workers=len(self.WORKERS),
                generation=self.publisher.generation,
            )

    def _all_booted(self) -> bool:
        # A worker's first heartbeat comes once its server listens (fluxgate.worker).
        return all(w.tmp.last_update() > w.spawned_at for w in self.WORKERS.values())

    # Config changes

    def _on_file_event(self) -> None:
        self.SIG_QUEUE.put_nowait(CONFIG_EVENT)  # called from the watcher thread

    def wait_for_signals(self, timeout: float = 1.0) -> list[int]:
        signals: list[int] = super().wait_for_signals(timeout=min(timeout, HEARTBEAT_INTERVAL))
        self.app.budget_store.tick()  # saves the day budgets when due and changed
        if CONFIG_EVENT in signals:
            signals = [s for s in signals if s != CONFIG_EVENT]
            self.reload_config(forced=signal.SIGHUP in signals)
            signals = [s for s in signals if s != signal.SIGHUP]
        return signals

    def handle_hup(self) -> None:
        self.reload_config(forced=True)

    def reload_config(self, forced: bool) -> None:
        if forced:
            sdnotify.reloading()
        try:
            applied = self.publisher.check(forced=forced)
            if applied is not None:
                self._apply(applied.config, applied.previous)
        finally:
            if forced:
                sdnotify.ready()

    def _apply(self, config: Config, previous: Config) -> None:
        self.app.current_config = config
        self.cfg.set("graceful_timeout", self.app.graceful_timeout(config))
        if config.server.bind_address != previous.server.bind_address:
            self._rebind(config)
        workers = self.app.worker_count(config)
        if workers != self.num_workers:
            log_fields(
                log,
                logging.INFO,
                "resizing worker pool",
                workers=workers,
                previous=self.num_workers,
            )
            self.num_workers = workers
        self.kill_workers(signal.SIGHUP)
        self.metrics.apply(config)

    def _rebind(self, config: Config) -> None:
        self.cfg.set("bind", [config.server.bind_address])
        listeners = self._bind(self.cfg.address)
        if listeners is None:
            log_fields(
                log,
                logging.WARNING,
                "keeping the old listener",
                address=_format(self.LISTENERS[0].cfg_addr),
            )
            return
        # Close our copy of the old socket before forking, or the new workers
        # would inherit it and keep the old port accepting connections nobody serves.
        for listener in self.LISTENERS:
            listener.close()
        self.LISTENERS = listeners
        log_fields(log, logging.INFO, "listening", address=_format(self.cfg.address[0]))
        # New workers serve the new socket; the old ones are retired gracefully
        # (oldest first, by manage_workers) and finish their in-flight requests.
        for _ in range(self.num_workers):
            self.spawn_worker()
        self.manage_workers()


def _format(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)
