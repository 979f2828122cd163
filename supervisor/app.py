"""`fluxgate-supervisor start`: the gunicorn application that the master runs.

gunicorn's own settings come from code here, then from an optional
`gunicorn.conf.py` in the working directory (gunicorn's usual place for it),
for process-level tuning only. What the YAML owns — the bind address and the
worker count — is never taken from there, and the YAML is never parsed inside
gunicorn's config loading, where an error would `sys.exit` the master.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
from typing import Any

import gunicorn.util
from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from setproctitle import setproctitle

from fluxgate.config import Config
from fluxgate.limits import ConnectionTable
from fluxgate.logs import configure_logging, log_fields
from fluxgate.ratelimit_budgets import BudgetStore, state_directory
from fluxgate.ratelimit_local import LocalTable

from . import oneline
from .publisher import ConfigPublisher
from .runtime import RuntimeDirectory, remove_stale

log = logging.getLogger("fluxgate.supervisor")

GUNICORN_CONF = "gunicorn.conf.py"
YAML_OWNED = frozenset({"bind", "workers"})
# gunicorn hooks Fluxgate uses itself; an operator's in gunicorn.conf.py runs after ours.
FLUXGATE_HOOKS = frozenset({"pre_fork", "child_exit"})
# Seconds an idle client connection is kept open; workers take gunicorn's
# `keepalive` setting, so gunicorn.conf.py can change it.
KEEPALIVE_TIMEOUT = 15
SHUTDOWN_MARGIN = 5  # seconds the master waits beyond a worker's own drain bound


class GunicornLogger(glogging.Logger):
    """gunicorn's messages in Fluxgate's format, on the same handler; no access log."""

    def setup(self, cfg: Any) -> None:
        self.cfg = cfg
        self._access_log_enabled = False
        configure_master_logging()
        self.access_log.disabled = True


def configure_master_logging() -> None:
    oneline.install(configure_logging())


def master_title(config_path: str) -> str:
    return f"fluxgate: supervisor [config={os.path.abspath(config_path)}]"


class FluxgateApplication(BaseApplication):
    def __init__(
        self,
        config_path: str,
        workers: int | None,
        pid_file: str | None,
        runtime: RuntimeDirectory,
    ) -> None:
        self.workers_override = workers
        self.pid_file = pid_file
        self.runtime = runtime
        self.runtime_dir = runtime.path
        self.metrics_dir = prepare_metrics_directory(runtime.metrics)
        self.publisher = ConfigPublisher(config_path, self.runtime_dir, prepare=runtime.ensure)
        # The generation serving now: gunicorn's settings (bind, workers) follow it.
        self.current_config: Config = self.publisher.load_initial()
        # Read by every worker after fork (see fluxgate.worker.WorkerContext).
        self.snapshot_path = self.publisher.snapshot_path
        self.connection_table = ConnectionTable()
        # The local limits backend's counts (fluxgate.ratelimit_local), and the
        # day budgets' file in the state directory, taken back before any fork.
        self.limit_table = LocalTable()
        self.budget_store = BudgetStore(self.limit_table, state_directory(config_path))
        self.budget_store.load()
        self.operator_hooks: dict[str, Any] = {}  # gunicorn.conf.py's, run after ours
        self.metrics: Any = None  # supervisor.metrics.MasterMetrics, made by the arbiter
        super().__init__(usage=None, prog="fluxgate-supervisor")

    def close_master_only_files(self) -> None:
        """Called in each forked worker (see fluxgate.worker.WorkerContext)."""
        if self.metrics is not None:
            self.metrics.close_inherited()

    def worker_count(self, config: Config) -> int:
        return self.workers_override or config.server.workers or os.cpu_count() or 1

    def graceful_timeout(self, config: Config) -> int:
        # The workers' own drain bound (server.shutdown_timeout_ms), plus a margin.
        return math.ceil(config.server.shutdown_timeout_ms / 1000 + SHUTDOWN_MARGIN)

    def load_config(self) -> None:
        config = self.current_config
        settings: dict[str, Any] = {
            "bind": [config.server.bind_address],
            "workers": self.worker_count(config),
            "worker_class": "fluxgate.worker.FluxgateWorker",
            "graceful_timeout": self.graceful_timeout(config),
            "timeout": 30,
            "keepalive": KEEPALIVE_TIMEOUT,
            "control_socket_disable": True,
            "proc_name": "fluxgate",
            "logger_class": GunicornLogger,
            "pidfile": self.pid_file,
            "pre_fork": _pre_fork,
            "child_exit": _child_exit,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)
        if os.path.isfile(GUNICORN_CONF):
            self._load_overrides(GUNICORN_CONF)

    def do_load_config(self) -> None:
        """gunicorn's, but a failure (say a broken gunicorn.conf.py) is one log line:
        gunicorn prints a blank line and `Error: …` to stderr, records with no level."""
        try:
            self.load_default_config()
            self.load_config()
            validate = getattr(self.cfg, "validate", None)  # newer gunicorn releases only
            if validate is not None:
                validate()
        except Exception as exc:
            log_fields(
                log,
                logging.ERROR,
                "cannot load the process settings",
                error=oneline.describe(exc),
                traceback=oneline.frames(exc.__traceback__),
            )
            sys.exit(1)

    def _load_overrides(self, filename: str) -> None:
        namespace: dict[str, Any] = {"__file__": filename}
        with open(filename) as f:
            exec(compile(f.read(), filename, "exec"), namespace)
        for key, value in namespace.items():
            if key.startswith("_") or key not in self.cfg.settings:
                continue
            if key in YAML_OWNED:
                log.warning("%s: %r is set in the YAML config; ignoring it here", filename, key)
                continue
            if key in FLUXGATE_HOOKS:
                self.operator_hooks[key] = value
                continue
            self.cfg.set(key, value)

    def load(self) -> None:
        """Workers build their own app (fluxgate.worker); there is nothing to import."""


METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # fluxgate.metrics.ENV_DIR; see below


def _pre_fork(server: Any, worker: Any) -> None:
    server.prepare_worker(worker)  # FluxgateArbiter: the worker's slot and config
    _operator_hook(server, "pre_fork", worker)


def _child_exit(server: Any, worker: Any) -> None:
    server.worker_gone(worker)  # FluxgateArbiter: its slot back, its metrics archived
    _operator_hook(server, "child_exit", worker)


def _operator_hook(server: Any, name: str, worker: Any) -> None:
    hook = server.app.operator_hooks.get(name)
    if hook is not None:
        hook(server, worker)


def prepare_metrics_directory(directory: str) -> str:
    """Point this process (and so every worker it forks) at the private
    directory for the Prometheus series (supervisor.runtime makes it).

    Must run before prometheus_client is first imported: the library picks
    its file storage at import time. The variable is an internal mechanism
    between the supervisor and its own workers, not operator configuration
    (README "Logs": only logging settings come from the environment): any value it had is
    replaced. The directory goes with the runtime directory at exit.
    """
    os.environ[METRICS_ENV] = directory
    return directory


FDS_PER_CONNECTION = 2  # the client's socket and the upstream's
FD_MARGIN = 64  # listener, pipes, log, inotify, snapshot, DNS...


def raise_fd_limit(max_connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one; workers inherit it.

    Every proxied request holds two descriptors, and any one worker may hold all
    of `max_connections`: under the common soft limit of 1024 a worker ran out of
    descriptors near 500 streams (upstream connects failing as 502s) while the
    default limit admits 1024. Nothing here uses select(), so a high limit is
    safe (nginx's worker_rlimit_nofile and Go's runtime do the same).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    need = FDS_PER_CONNECTION * max_connections + FD_MARGIN
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "open file limit %d is below the %d that server.max_connections %d may need; "
            "raise LimitNOFILE (systemd) or ulimit -n",
            soft,
            need,
            max_connections,
        )


def _no_title(title: str) -> None:
    """gunicorn's own process titles are not used (see `run`)."""


def run(config_path: str, workers: int | None = None, pid_file: str | None = None) -> int:
    """Serve until told to stop; the exit status (0 only for a requested shutdown)."""
    # Fluxgate titles its processes itself (the arbiter and each worker, with the
    # config path and generation); gunicorn would title them "gunicorn: master
    # [...]" and "gunicorn: worker [...]" in between, and it has no setting for
    # that, so its title function is made a no-op in the master before any fork.
    gunicorn.util._setproctitle = _no_title
    setproctitle(master_title(config_path))
    configure_master_logging()
    remove_stale()
    try:
        runtime = RuntimeDirectory()
    except OSError as exc:
        log_fields(
            log,
            logging.ERROR,
            "cannot create the runtime directory",
            error=oneline.describe(exc),
        )
        return 1
    master_pid = os.getpid()
    try:
        app = FluxgateApplication(config_path, workers, pid_file, runtime)
        # Only now: the arbiter's imports bring in prometheus_client (see above).
        from .arbiter import FluxgateArbiter

        raise_fd_limit(app.current_config.server.max_connections)
        FluxgateArbiter(app).run()
    except SystemExit as exc:
        # gunicorn's sys.exit(): the status it chose (a worker leaves this way too).
        # Fluxgate's halt() makes 0 mean a requested shutdown; sys.exit() without a
        # status is never one.
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # anything gunicorn did not catch: one line, not a traceback
        if os.getpid() == master_pid:
            log_fields(
                log,
                logging.ERROR,
                "supervisor failed",
                error=oneline.describe(exc),
                traceback=oneline.frames(sys.exc_info()[2]),
            )
        return 1
    finally:
        runtime.remove()  # only in the master: a worker leaves through here too
    return 0
