"""Forwarding one request: open the upstream exchange, then relay its body.

README "Request handling", steps 7–11. The request body streams up as the
client sends it and the response streams down chunk by chunk as it arrives;
nothing is held beyond one chunk. Two things can end an exchange early, and
both cancel the task that relays it (`Guard`): the client going away (the
protocol's `on_lost` callback, so an abandoned generation stops even while
the upstream is silent) and the `request_timeout_ms` deadline. What the
cancellation then means (a 504, a cut stream, a 499) is decided in one place,
`Guard.settle`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from .config import Config, Upstream
from .errors import UPSTREAM_TIMEOUT, ProxyError, StreamAborted
from .exchange import CONNECTION_SCOPE_KEY, ClientConnection, Exchange, Scope
from .headers import client_headers, upstream_headers
from .metrics import WorkerMetrics
from .routing import upstream_target
from .upstream import UpstreamClient, upstream_failure
from .usage import open_tap


class Guard:
    """Cancels the relaying task when the client goes away or the deadline passes.

    The deadline is a plain loop timer rather than asyncio.timeout(): on
    Python 3.11 every get_running_loop() (which current_task() and
    asyncio.timeout() call when not given the loop) makes a getpid() system
    call, four of them per request.
    """

    __slots__ = ("connection", "ex", "task", "timer")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        connection: ClientConnection,
        ex: Exchange,
        seconds: float,
    ) -> None:
        task = asyncio.current_task(loop)
        assert task is not None
        self.task, self.ex, self.connection = task, ex, connection
        connection.on_lost = self.client_gone
        self.timer = loop.call_later(seconds, self.deadline_passed)

    def client_gone(self) -> None:
        if not self.ex.finished:
            self.ex.client_gone = True
            self.task.cancel()

    def deadline_passed(self) -> None:
        if not self.ex.finished and not self.ex.client_gone:
            self.ex.timed_out = True
            self.task.cancel()

    def ours(self) -> bool:
        """Whether a cancellation (or the error it caused) came from this guard."""
        return self.ex.client_gone or self.ex.timed_out

    def settle(self) -> None:
        """After a cancellation of ours: record what it means, or raise the answer.

        A deadline before the response started is a 504; after, the stream is
        cut. A client that left gets nothing (499 in the log if it had no
        response yet).
        """
        ex = self.ex
        self.task.uncancel()
        if ex.timed_out:
            if not ex.response_started:
                raise ProxyError(UPSTREAM_TIMEOUT) from None
            ex.outcome = "upstream_timeout"
            raise StreamAborted from None
        ex.outcome = "client_disconnected"
        if not ex.response_started:
            ex.status = 499  # nginx's convention: the client closed the request

    def close(self) -> None:
        self.ex.finished = True
        self.timer.cancel()
        self.connection.on_lost = None


class Forwarder:
    """Relays exchanges through one worker's upstream client."""

    def __init__(
        self, client: UpstreamClient, loop: asyncio.AbstractEventLoop, metrics: WorkerMetrics
    ) -> None:
        self.client = client
        self.loop = loop
        self.metrics = metrics

    async def forward(
        self,
        config: Config,
        upstream: Upstream,
        scope: Scope,
        receive: Any,
        send: Any,
        ex: Exchange,
    ) -> None:
        ex.upstream = upstream.name
        guard = Guard(self.loop, scope[CONNECTION_SCOPE_KEY], ex, config.request_timeout_ms / 1000)
        response: aiohttp.ClientResponse | None = None
        complete = False
        self.metrics.open_stream(upstream.name)
        try:
            response = await self.open(upstream, scope, receive, ex, guard)
            await relay(upstream, response, send, ex)
            complete = True
        except asyncio.CancelledError:
            if not guard.ours():
                raise
            guard.settle()
        finally:
            guard.close()
            self.metrics.close_stream(upstream.name)
            if response is not None:
                if complete:
                    response.release()
                else:
                    # Abort, never reuse: an unfinished upstream exchange must stop now.
                    response.close()

    async def open(
        self, upstream: Upstream, scope: Scope, receive: Any, ex: Exchange, guard: Guard
    ) -> aiohttp.ClientResponse:
        """Send the request and wait for the response head; 502 if that fails."""
        # ASCII only (the parser refuses other bytes in a request-target).
        path_qs = upstream_target(upstream, ex.target).decode("latin-1")
        ex.target_url = upstream.origin + path_qs
        headers = upstream_headers(scope["headers"], upstream, ex.connection_tokens)
        body = request_body(receive, ex) if ex.has_body else None
        sent = time.monotonic()
        try:
            response = await self.client.request(
                ex.method,
                # Not URL(url): yarl would drop an empty "?" query.
                upstream.origin_url.with_path(path_qs, encoded=True),
                headers,
                body,
                ssl=upstream.tls,
            )
        except (aiohttp.ClientError, OSError) as exc:
            if guard.ours():  # our cancellation, reported as an error
                raise asyncio.CancelledError from None
            raise upstream_failure(exc) from None
        ex.ttfb_ms = (time.monotonic() - sent) * 1000
        ex.status = response.status
        ex.response_length = response.content_length
        return response


async def relay(
    upstream: Upstream, response: aiohttp.ClientResponse, send: Any, ex: Exchange
) -> None:
    """The response head, then each body chunk the moment it arrives."""
    headers = client_headers(response.raw_headers)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    ex.response_started = True
    tap = None
    if upstream.usage is not None:  # read the provider's token usage as it passes
        ex.usage = open_tap(upstream.usage, response.status, response.headers, ex.response_length)
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


async def request_body(receive: Any, ex: Exchange) -> AsyncIterator[bytes]:
    """The client's body as it arrives, counted."""
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
