"""Fluxgate's own endpoints under `/_fluxgate/`: health and metrics, never proxied.

README "Request handling" and "Metrics". Both answer without authentication
and only to GET and HEAD. Health is 200 while a valid config serves and 503
on the safe defaults (no valid file applied yet), so that a load balancer
sends traffic elsewhere; metrics are the whole server's Prometheus text,
unless they are off or served by the master on their own address.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Final

from .config import Config
from .errors import METRICS_UNREADABLE, NO_ENDPOINT, OWN_METHOD, ProxyError, error_headers
from .exchange import Exchange
from .logs import log_fields
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import MetricsUnreadable, WorkerMetrics

log = logging.getLogger("fluxgate.metrics")

# Fluxgate's own endpoints live under this prefix, which is never proxied.
RESERVED_PREFIX: Final = b"/_fluxgate"
HEALTH_PATHS: Final = frozenset({b"/_fluxgate/health", b"/_fluxgate/health/"})
METRICS_PATHS: Final = frozenset({b"/_fluxgate/metrics", b"/_fluxgate/metrics/"})
_METRICS_CONTENT_TYPE: Final = METRICS_CONTENT_TYPE.encode()


def is_reserved(path: bytes) -> bool:
    """Whether `path` is under `/_fluxgate` (on a segment boundary)."""
    n = len(RESERVED_PREFIX)
    return path.startswith(RESERVED_PREFIX) and (len(path) == n or path[n] == 0x2F)  # "/"


class OwnEndpoints:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self.pid = os.getpid()

    async def serve(self, config: Config, path: bytes, send: Any, ex: Exchange) -> None:
        if path in HEALTH_PATHS:
            ex.outcome = "health"
        elif path in METRICS_PATHS and self._serves_metrics(config):
            ex.outcome = "metrics"
        else:
            raise ProxyError(NO_ENDPOINT)
        if ex.method not in ("GET", "HEAD"):
            raise ProxyError(OWN_METHOD)
        if ex.outcome == "metrics":
            status, body = 200, await self._render()
            headers = [(b"content-type", _METRICS_CONTENT_TYPE),
                       (b"content-length", b"%d" % len(body))]  # fmt: skip
        else:
            status, body = self._health(config)
            headers = error_headers(body)
        ex.status = status
        ex.response_bytes = ex.response_length = len(body)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _render(self) -> bytes:
        try:
            return await self.metrics.render()
        except MetricsUnreadable as exc:
            log_fields(log, logging.WARNING, "metrics unreadable", error=str(exc))
            raise ProxyError(METRICS_UNREADABLE) from None

    def _health(self, config: Config) -> tuple[int, bytes]:
        state: dict[str, object] = {"status": "ok"}
        status = 200
        if config.safe_defaults:
            status, state = 503, {"status": "unavailable", "reason": "no_config"}
        body = {**state, "generation": config.generation, "pid": self.pid}
        return status, json.dumps(body).encode()

    def _serves_metrics(self, config: Config) -> bool:
        """The main listener serves metrics unless they are off or on their own address."""
        server = config.server
        return server.metrics and server.metrics_address is None and self.metrics.enabled
