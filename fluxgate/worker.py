"""The worker process: a gunicorn `Worker` serving uvicorn (uvloop, httptools).

Written instead of using uvicorn-worker because of the traps docs/architecture.md lists:
its SIGHUP default kills a worker that is still booting, its quit handling
does not stop uvicorn, and a worker draining outside a full shutdown stops
sending heartbeats and is killed by the master's watchdog mid-stream. Here:

- SIGHUP is ignored from fork until the loop's handler exists, and the
  published config is re-read once after that so an early HUP is not lost;
- a config reload swaps one immutable `Config` on the app, between requests;
- a heartbeat task runs for the whole life of the process, drain included,
  and also re-checks the snapshot once a second in case a signal was lost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import signal
import socket
import sys
from typing import Any, Protocol

import uvicorn
from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker
from setproctitle import setproctitle

from .config import Config, build_config
from .gcpolicy import GcPolicy
from .heaptrim import HeapTrim
from .limits import ConnectionGate, ConnectionTable
from .logs import configure_logging
from .protocol import FluxgateProtocol
from .proxy import ProxyApp
from .ratelimit import Limiter, LimitSettings
from .ratelimit_local import LocalLimiter, LocalTable
from .ratelimit_redis import RedisLimiter
from .snapshot import read_snapshot, snapshot_mtime

log = logging.getLogger("fluxgate.worker")

HEARTBEAT_INTERVAL = 1.0


class WorkerContext(Protocol):
    """What the master's application object hands to every forked worker."""

    snapshot_path: str
    connection_table: ConnectionTable
    limit_table: LocalTable  # the local limits backend's counts (fluxgate.ratelimit_local)

    def close_master_only_files(self) -> None:
        """Close what a worker inherits by fork but must not hold (the master's
        metrics listener: a worker keeping it open would keep its port open)."""


def drain_seconds(config: Config) -> int:
    """How long a stopping worker (SIGTERM, or retired by the master) lets
    requests in flight finish before cancelling them: server.shutdown_timeout_ms,
    in uvicorn's whole seconds, rounded up."""
    return math.ceil(config.server.shutdown_timeout_ms / 1000)


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal capture: the worker owns signals.

    uvicorn re-raises a captured SIGTERM after shutting down, which would end
    every clean worker exit as "killed by SIGTERM" in the master's log.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()

    def install_signal_handlers(self) -> None:
        pass

    def capture_signals(self) -> Any:
        import contextlib

        return contextlib.nullcontext()


class FluxgateWorker(Worker):
    slot: int  # its slot in the connection table
    fluxgate_config: Config  # the config it starts on
    spawned_at: float  # when the master forked it (monotonic)

    def init_signals(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        # Until the event loop's handler exists, a reload signal must not kill us.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # SIGUSR1 is "reopen log files" (the master forwards it): workers write
        # only to stderr, so there is nothing to reopen and it stays ignored.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGWINCH, signal.SIG_IGN)

    def load_wsgi(self) -> None:
        ctx: WorkerContext = self.app
        ctx.close_master_only_files()
        configure_logging()
        # Set on this object by the master's pre_fork hook (supervisor.app).
        config: Config = self.fluxgate_config
        self.snapshot_path = ctx.snapshot_path
        self.gate = ConnectionGate(ctx.connection_table, self.slot, config.server.max_connections)
        self.limit_table = ctx.limit_table
        self.proxy = ProxyApp(config, make_limiter=self.make_limiter)
        self.proxy.metrics.connections = lambda: self.gate.active
        self._snapshot_mtime = 0
        self.gc_policy = GcPolicy(connections=lambda: self.gate.active)
        self.heap_trim = HeapTrim()
        self._set_title()

    def make_limiter(self, settings: LimitSettings) -> Limiter:
        """The limiter of the configured backend (README "Limits and budgets"),
        made by the app in the worker's running loop when a policy first needs it."""
        if settings.backend == "redis":
            assert settings.redis_url is not None  # validation requires it
            return RedisLimiter(settings.redis_url)
        return LocalLimiter(self.limit_table, self.slot)

    def run(self) -> None:
        import uvloop

        uvloop.run(self._serve())

    async def _serve(self) -> None:
        config = self.proxy.config
        uv_config = uvicorn.Config(
            self.proxy,
            http=functools.partial(  # type: ignore[arg-type]
                FluxgateProtocol, gate=self.gate, metrics=self.proxy.metrics
            ),
            loop="none",
            ws="none",
            lifespan="on",
            server_header=False,
            date_header=False,
            access_log=False,
            proxy_headers=False,
            log_config=None,
            timeout_keep_alive=self.cfg.keepalive,
            timeout_graceful_shutdown=drain_seconds(config),
        )
        self.server = server = _Server(uv_config)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload_config)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(sig, server.handle_exit, sig, None)
        # Everything allocated so far lives as long as the process, and open
        # streams keep theirs alive: see fluxgate.gcpolicy.
        self.gc_policy.start()
        self._configure_metrics(config)
        heartbeat = asyncio.ensure_future(self._heartbeat())
        # A HUP sent between fork and the handler above was ignored: catch up.
        self.reload_config()
        try:
            await server.serve(sockets=[s.sock for s in self.sockets])
        finally:
            heartbeat.cancel()
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    async def _heartbeat(self) -> None:
        # The master counts a worker as booted at its first heartbeat (and only
        # then logs "serving" and tells systemd READY=1): that must mean it
        # accepts connections, not merely that its loop runs. A worker that
        # never gets there is killed by the master's timeout like a hung one.
        await self.server.listening.wait()
        while True:
            self.notify()
            self.proxy.metrics.refresh()
            self.gc_policy.tick()
            self.heap_trim.tick()
            if os.getppid() != self.ppid:
                log.warning("master (pid %s) is gone: shutting down", self.ppid)
                self.server.should_exit = True
            if snapshot_mtime(self.snapshot_path) != self._snapshot_mtime:
                self.reload_config()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    def reload_config(self) -> None:
        """Apply the published generation if it is newer than ours."""
        self._snapshot_mtime = snapshot_mtime(self.snapshot_path)
        try:
            snapshot = read_snapshot(self.snapshot_path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cannot read the published config: %s", exc)
            return
        if snapshot.generation <= self.proxy.config.generation:
            return
        try:
            config = build_config(snapshot.doc, snapshot.generation)
        except Exception:  # the master validated it; never let a surprise kill us
            log.exception("published config generation %d could not be built", snapshot.generation)
            return
        self.proxy.config = config
        self.gate.limit = config.server.max_connections
        self._configure_metrics(config)
        self.server.config.timeout_graceful_shutdown = drain_seconds(config)
        self._set_title()
        log.debug("worker applied config generation %d", config.generation)

    def _configure_metrics(self, config: Config) -> None:
        self.proxy.metrics.recording = config.server.metrics
        self.proxy.metrics.set_generation(config.generation)

    def _set_title(self) -> None:
        setproctitle(f"fluxgate: worker {self.age} [gen {self.proxy.config.generation}]")
