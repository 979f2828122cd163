"""The proxy: a raw ASGI application that authenticates, routes and relays one exchange.

SPEC §4.5–4.11. The request body is streamed up as the client sends it and
the response streamed down chunk by chunk as it arrives; nothing is buffered
beyond one chunk. If the client goes away, the protocol (fluxgate.protocol,
which this app requires) calls back and the exchange is cancelled at once,
so an abandoned generation stops even while the upstream is silent; a watcher
task waiting on `receive()` would do the same at ~15 µs more per request.

`ProxyApp.config` is the only mutable attribute: the worker replaces it with
a new immutable `Config` on reload, and each request reads it once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp

from .auth import AuthError, authenticate
from .config import Config, Upstream, default_config
from .errors import (
    DOT_SEGMENT,
    NO_ENDPOINT,
    NOT_FOUND,
    OWN_METHOD,
    UPSTREAM_TIMEOUT,
    ErrorResponse,
    ProxyError,
    StreamAborted,
    error_headers,
)
from .headers import client_headers, upstream_headers
from .logs import TRACE, RequestLog, loggable_target, loggable_url, request_log, text_str
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import WorkerMetrics
from .routing import has_dot_segment, match, upstream_target
from .upstream import UpstreamClient, upstream_failure
from .usage import Tap, open_tap

# Fluxgate's own endpoints live under this prefix, which is never proxied.
RESERVED_PREFIX: Final = b"/_fluxgate"
HEALTH_PATHS: Final = frozenset({b"/_fluxgate/health", b"/_fluxgate/health/"})
METRICS_PATHS: Final = frozenset({b"/_fluxgate/metrics", b"/_fluxgate/metrics/"})
# Key under which the protocol layer puts the request-target exactly as received.
TARGET_SCOPE_KEY: Final = "fluxgate.target"
# Key under which the protocol layer puts itself, for its `on_lost` callback.
CONNECTION_SCOPE_KEY: Final = "fluxgate.connection"

Scope = dict[str, Any]


class Exchange:
    """What one request did, for its log line."""

    __slots__ = (
        "auth_error",
        "client_gone",
        "finished",
        "key_id",
        "outcome",
        "request_bytes",
        "response_bytes",
        "response_length",
        "response_started",
        "status",
        "target_url",
        "timed_out",
        "ttfb_ms",
        "upstream",
        "usage",
    )

    def __init__(self) -> None:
        self.status = 0
        self.outcome = "ok"
        self.key_id: str | None = None
        self.auth_error: str | None = None  # why authentication failed (fluxgate.auth)
        self.upstream: str | None = None
        self.target_url: str | None = None
        self.ttfb_ms: float | None = None
        self.request_bytes = 0
        self.response_bytes = 0
        self.response_started = False
        self.client_gone = False
        self.timed_out = False  # request_timeout_ms passed first
        self.finished = False
        self.response_length: int | None = None
        self.usage: Tap | None = None  # set when the upstream has `usage` on

    @classmethod
    def rejected(cls, status: int, outcome: str) -> Exchange:
        """A request the protocol layer answered before the app saw it."""
        ex = cls()
        ex.status, ex.outcome = status, outcome
        return ex


def _content_length(headers: list[tuple[bytes, bytes]], name: bytes) -> int | None:
    for key, value in headers:
        if key == name:
            return int(value) if value.isdigit() else None
    return None


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value != b"0"
    return False


class ProxyApp:
    def __init__(self, config: Config | None = None) -> None:
        self.config = config or default_config()
        self.client: UpstreamClient | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pid = os.getpid()
        self.request_log = RequestLog(_request_fields, render_text=_request_text)
        self.metrics = WorkerMetrics()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.loop = asyncio.get_running_loop()
                self.client = UpstreamClient()
                logging.getLogger("uvicorn.error").addFilter(_not_stream_aborted)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.request_log.flush()
                self.metrics.flush()
                if self.client is not None:
                    await self.client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle(self, scope: Scope, receive: Any, send: Any) -> None:
        started = time.monotonic()
        config = self.config
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        target: bytes = scope[TARGET_SCOPE_KEY]
        path = target.partition(b"?")[0]
        ex = Exchange()
        try:
            if path.startswith(RESERVED_PREFIX) and _is_reserved(path):
                await self._own_endpoint(config, path, scope["method"], send, ex)
                return
            if has_dot_segment(path):
                raise ProxyError(DOT_SEGMENT)
            try:
                principal = authenticate(config, headers)
            except AuthError as exc:
                ex.auth_error = exc.reason
                raise
            ex.key_id = principal.key_id
            upstream = match(principal.routes, path)
            if upstream is None:
                raise ProxyError(NOT_FOUND)
            await self._forward(config, upstream, scope, target, receive, send, ex)
        except ProxyError as err:
            response = err.response
            ex.status, ex.outcome = response.status, response.outcome
            if not ex.client_gone:
                ex.response_bytes = ex.response_length = await _send_error(send, response)
        finally:
            duration = time.monotonic() - started
            if config.server.metrics:
                self.metrics.add(ex, duration)
            if request_log.isEnabledFor(TRACE):
                self.request_log.add(_request_values(config, scope, target, ex, duration))

    async def _own_endpoint(
        self, config: Config, path: bytes, method: str, send: Any, ex: Exchange
    ) -> None:
        if path in HEALTH_PATHS:
            ex.outcome = "health"
        elif path in METRICS_PATHS and self._serves_metrics(config):
            ex.outcome = "metrics"
        else:
            raise ProxyError(NO_ENDPOINT)
        if method not in ("GET", "HEAD"):
            raise ProxyError(OWN_METHOD)
        status = 200
        if ex.outcome == "metrics":
            body = await self.metrics.render()
            headers = [
                (b"content-type", METRICS_CONTENT_TYPE.encode()),
                (b"content-length", b"%d" % len(body)),
            ]
        else:
            status, body = self._health(config)
            headers = error_headers(body)
        ex.status = status
        ex.response_bytes = ex.response_length = len(body)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _health(self, config: Config) -> tuple[int, bytes]:
        """200 while a valid config serves; 503 on the safe defaults, which can
        serve nothing, so that a load balancer sends its traffic elsewhere."""
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

    async def _forward(
        self,
        config: Config,
        upstream: Upstream,
        scope: Scope,
        target: bytes,
        receive: Any,
        send: Any,
        ex: Exchange,
    ) -> None:
        client, loop = self.client, self.loop
        assert client is not None and loop is not None, "lifespan startup creates them"
        ex.upstream = upstream.name
        # ASCII only (the parser refuses other bytes in a request-target).
        path_qs = upstream_target(upstream, target).decode("latin-1")
        url = upstream.origin + path_qs
        ex.target_url = url
        headers = upstream_headers(scope["headers"], upstream)
        # The loop is passed, and the deadline is a plain timer rather than
        # asyncio.timeout(): on Python 3.11 every get_running_loop() (which
        # current_task() and asyncio.timeout() call when not given the loop)
        # makes a getpid() system call, four of them per request.
        task = asyncio.current_task(loop)
        assert task is not None

        def client_gone() -> None:
            if not ex.finished:
                ex.client_gone = True
                task.cancel()

        def deadline_passed() -> None:
            if not ex.finished and not ex.client_gone:
                ex.timed_out = True
                task.cancel()

        connection = scope[CONNECTION_SCOPE_KEY]
        connection.on_lost = client_gone
        body = _request_body(receive, ex) if _has_body(scope["headers"]) else None
        sent = time.monotonic()
        response: aiohttp.ClientResponse | None = None
        complete = False
        self.metrics.open_stream(upstream.name)
        deadline = loop.call_later(config.request_timeout_ms / 1000, deadline_passed)
        try:
            try:
                response = await client.request(
                    scope["method"],
                    # Not URL(url): yarl would drop an empty "?" query.
                    upstream.origin_url.with_path(path_qs, encoded=True),
                    headers,
                    body,
                )
            except (aiohttp.ClientError, OSError) as exc:
                if ex.client_gone or ex.timed_out:  # our cancellation, reported as an error
                    raise asyncio.CancelledError from None
                raise upstream_failure(exc) from None
            ex.ttfb_ms = (time.monotonic() - sent) * 1000
            ex.status = response.status
            ex.response_length = response.content_length
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": client_headers(response.raw_headers),
                }
            )
            ex.response_started = True
            tap = None
            if upstream.usage is not None:  # read the provider's token usage as it passes
                ex.usage = open_tap(
                    upstream.usage, response.status, response.headers, ex.response_length
                )
                tap = ex.usage if ex.usage is not None and ex.usage.active else None
            try:
                async for chunk in response.content.iter_any():
                    ex.response_bytes += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if tap is not None:
                        tap.feed(chunk)
            except (aiohttp.ClientError, OSError):
                ex.outcome = "upstream_body_error"
                raise StreamAborted from None
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = True
        except asyncio.CancelledError:
            if ex.timed_out:
                task.uncancel()
                if not ex.response_started:
                    raise ProxyError(UPSTREAM_TIMEOUT) from None
                ex.outcome = "upstream_timeout"
                raise StreamAborted from None
            if not ex.client_gone:
                raise
            task.uncancel()
            ex.outcome = "client_disconnected"
            if not ex.response_started:
                ex.status = 499  # nginx's convention: the client closed the request
        finally:
            ex.finished = True
            deadline.cancel()
            connection.on_lost = None
            self.metrics.close_stream(upstream.name)
            if response is not None:
                if complete:
                    response.release()
                else:
                    # Abort, never reuse: an unfinished upstream exchange must stop now.
                    response.close()


def _not_stream_aborted(record: logging.LogRecord) -> bool:
    """Keep uvicorn from logging a cut stream as an application crash.

    uvicorn logs every exception out of the app at ERROR with a traceback.
    `StreamAborted` is our deliberate way to make it close the connection, and
    the request log line already records why (its outcome).
    """
    return not (record.exc_info and isinstance(record.exc_info[1], StreamAborted))


async def _request_body(receive: Any, ex: Exchange) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            ex.client_gone = True
            raise ConnectionResetError("client went away during the request body")
        chunk = message.get("body", b"")
        if chunk:
            ex.request_bytes += len(chunk)
            yield chunk
        if not message.get("more_body", False):
            return


async def _send_error(send: Any, response: ErrorResponse) -> int:
    await send(
        {"type": "http.response.start", "status": response.status, "headers": response.headers}
    )
    await send({"type": "http.response.body", "body": response.body})
    return len(response.body)


def _is_reserved(path: bytes) -> bool:
    n = len(RESERVED_PREFIX)
    return len(path) == n or path[n] == 0x2F  # "/"


def _request_values(
    config: Config, scope: Scope, target: bytes, ex: Exchange, duration: float
) -> tuple[Any, ...]:
    """What the log line needs, taken at the request's end (see logs.RequestLog).

    Plain values only, so the request's scope and Exchange are freed now rather
    than held until the batch is written; formatting waits for the batch.
    """
    client = scope.get("client")
    client_ip = client[0] if client else None
    if config.server.trusted_proxies:  # behind nginx: the client its X-Forwarded-For names
        client_ip = config.server.trusted_proxies.client_ip(client_ip, scope["headers"])
    return (
        client_ip,
        scope["method"],
        target,
        _content_length(scope["headers"], b"content-length"),
        ex.key_id,
        ex.upstream,
        ex.target_url,
        ex.status,
        ex.outcome,
        ex.auth_error,
        duration,
        ex.ttfb_ms,
        ex.request_bytes,
        ex.response_bytes,
        ex.response_length,
        ex.usage,
    )


def _request_fields(values: tuple[Any, ...]) -> dict[str, Any]:
    """The log line's fields (those that are not None), from `_request_values`."""
    (client_ip, method, target, request_length, key_id, upstream, target_url, status, outcome,
     auth_error, duration, ttfb_ms, request_bytes, response_bytes, response_length,
     usage) = values  # fmt: skip
    fields: dict[str, Any] = {"client_ip": client_ip, "method": method,
                              "request_url": loggable_target(target)}  # fmt: skip
    if client_ip is None:
        del fields["client_ip"]
    if request_length is not None:
        fields["request_body_length"] = request_length
    if key_id is not None:
        fields["api_key"] = key_id
    if upstream is not None:
        fields["upstream"] = upstream
    if target_url is not None:
        fields["target_url"] = loggable_url(target_url)
    fields["status"] = status
    fields["outcome"] = outcome
    if auth_error is not None:
        fields["auth_error"] = auth_error
    fields["duration_ms"] = round(duration * 1000, 3)
    if ttfb_ms is not None:
        fields["ttfb_ms"] = round(ttfb_ms, 3)
    fields["request_bytes"] = request_bytes
    fields["response_bytes"] = response_bytes
    if response_length is not None:
        fields["response_body_length"] = response_length
    if usage is not None and (counts := usage.result()) is not None:
        fields.update((k, v) for k, v in counts.fields().items() if v is not None)
    return fields


def _request_text(values: tuple[Any, ...]) -> str:
    """`_request_fields` as the text format writes them, without the dict.

    Must produce exactly what TextFormatter makes of `_request_fields(values)`
    (tests/test_logs.py checks it on generated values).
    """
    (client_ip, method, target, request_length, key_id, upstream, target_url, status, outcome,
     auth_error, duration, ttfb_ms, request_bytes, response_bytes, response_length,
     usage) = values  # fmt: skip
    parts = [] if client_ip is None else ["client_ip=" + text_str[client_ip]]
    parts.append("method=" + text_str[method])
    parts.append("request_url=" + text_str[loggable_target(target)])
    if request_length is not None:
        parts.append(f"request_body_length={request_length}")
    if key_id is not None:
        parts.append("api_key=" + text_str[key_id])
    if upstream is not None:
        parts.append("upstream=" + text_str[upstream])
    if target_url is not None:
        parts.append("target_url=" + text_str[loggable_url(target_url)])
    parts.append(f"status={status} outcome={text_str[outcome]}")
    if auth_error is not None:
        parts.append("auth_error=" + auth_error)  # one of fluxgate.auth's fixed words
    parts.append(f"duration_ms={round(duration * 1000, 3)}")
    if ttfb_ms is not None:
        parts.append(f"ttfb_ms={round(ttfb_ms, 3)}")
    parts.append(f"request_bytes={request_bytes} response_bytes={response_bytes}")
    if response_length is not None:
        parts.append(f"response_body_length={response_length}")
    if usage is not None and (counts := usage.result()) is not None:
        parts.extend(f"{k}={n}" for k, n in counts.fields().items() if n is not None)
    return " ".join(parts)
