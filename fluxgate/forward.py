"""Forwarding one request: open the upstream exchange (with failover), then relay its body.

README "Request handling", steps 7–11, and "Upstream resilience". The request
body streams up as the client sends it and the response streams down chunk
by chunk as it arrives; nothing is held beyond one chunk, except a body small
enough to replay (`RequestBody`). Opening tries the upstream's provider keys
in turn (fluxgate.keypool) while the answer says the provider refused our key
or is overloaded, or the connection failed before any response byte, and the
request can be sent again. The client sees exactly one response.

Three things can end an exchange early, and each cancels the task that
relays it (`Guard`): the client going away (its connection's `ClientLink`,
so an abandoned generation stops even while the upstream is silent), a
deadline of the upstream's (the whole exchange, the first byte, the silence
between chunks), or, through aiohttp, the connect deadline. What the
cancellation means (a 504, a cut stream, a 499) is decided in one place,
`Guard.settle`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Final

import aiohttp

from .client_response import ClientBody, client_body, send_head, take_body
from .config import ProviderKey, Timeouts, Upstream
from .deadlines import Deadlines
from .errors import (
    UPSTREAM_FIRST_BYTE_TIMEOUT,
    UPSTREAM_TIMEOUT,
    ErrorResponse,
    ProxyError,
    StreamAborted,
)
from .exchange import CONNECTION_SCOPE_KEY, ClientLink, Exchange, Scope
from .headers import client_headers, upstream_headers
from .keypool import KeyPool, KeyPools
from .metrics import WorkerMetrics
from .relay import relay_body
from .routing import upstream_target
from .upstream import UpstreamClient, upstream_failure
from .upstream_wire import UpstreamResponse
from .usage import open_tap

# Which deadline passed: what the client gets before a response, and the log's
# outcome after one started.
_BEFORE_RESPONSE: Final[dict[str, ErrorResponse]] = {
    "total": UPSTREAM_TIMEOUT,
    "first_byte": UPSTREAM_FIRST_BYTE_TIMEOUT,
}
_CUT_OUTCOME: Final = {
    "total": "upstream_timeout",
    "first_byte": "upstream_first_byte_timeout",
    "idle": "upstream_idle_timeout",
}
MAX_BACKOFF: Final = 5.0  # seconds between two attempts at most
_END: Final = {"type": "http.response.body", "body": b"", "more_body": False}


class Guard:
    """Cancels the relaying task when the client goes away or a deadline passes.

    The deadlines are loop timers rather than asyncio.timeout(): on Python
    3.11 every get_running_loop() (which current_task() and asyncio.timeout()
    call when not given the loop) makes a getpid() system call. The whole
    exchange's shares a timer with the others due at about the same time
    (fluxgate.deadlines); the idle deadline is one timer checked against the
    last chunk's time, not a timer re-armed for every chunk.
    """

    __slots__ = (
        "connection", "deadlines", "ex", "idle", "last_chunk", "loop", "phase", "slot", "task",
    )  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        connection: ClientLink,
        ex: Exchange,
        timeouts: Timeouts,
        deadlines: Deadlines,
    ) -> None:
        task = asyncio.current_task(loop)
        assert task is not None
        self.loop, self.task, self.ex, self.connection = loop, task, ex, connection
        connection.on_lost = self.client_gone
        self.deadlines = deadlines
        self.slot = deadlines.add(timeouts.request, self._total_expired)
        self.phase: asyncio.TimerHandle | None = None  # first byte, then idle
        self.idle = 0.0
        self.last_chunk = 0.0

    def client_gone(self) -> None:
        if not self.ex.finished:
            self.ex.client_gone = True
            self.task.cancel()

    def _total_expired(self) -> None:
        self._expired("total")

    def _expired(self, which: str) -> None:
        if not self.ex.finished and not self.ex.client_gone and self.ex.timeout is None:
            self.ex.timeout = which
            self.task.cancel()

    def await_head(self, timeouts: Timeouts) -> None:
        """The first-byte deadline of an attempt; none needed when it is not shorter
        than the whole exchange's (the default), which then says the same."""
        if timeouts.first_byte < timeouts.request:
            self.phase = self.loop.call_later(timeouts.first_byte, self._expired, "first_byte")

    def head_arrived(self) -> None:
        if self.phase is not None:
            self.phase.cancel()
            self.phase = None

    def watch_idle(self, seconds: float) -> None:
        self.idle, self.last_chunk = seconds, self.loop.time()
        self.phase = self.loop.call_later(seconds, self._idle_check)

    def chunk(self) -> None:
        self.last_chunk = self.loop.time()

    def _idle_check(self) -> None:
        remaining = self.last_chunk + self.idle - self.loop.time()
        if remaining > 0:
            self.phase = self.loop.call_later(remaining, self._idle_check)
        else:
            self.phase = None
            self._expired("idle")

    def ours(self) -> bool:
        """Whether a cancellation (or the error it caused) came from this guard."""
        return self.ex.client_gone or self.ex.timeout is not None

    def settle(self) -> None:
        """After a cancellation of ours: record what it means, or raise the answer.

        A deadline before the response started is a 504; after, the stream is
        cut. A client that left gets nothing (499 in the log if it had no
        response yet).
        """
        ex = self.ex
        self.task.uncancel()
        if ex.timeout is not None:
            if not ex.response_started:
                raise ProxyError(_BEFORE_RESPONSE.get(ex.timeout, UPSTREAM_TIMEOUT)) from None
            ex.outcome = _CUT_OUTCOME[ex.timeout]
            raise StreamAborted from None
        ex.outcome = "client_disconnected"
        if not ex.response_started:
            ex.status = 499  # nginx's convention: the client closed the request

    def close(self) -> None:
        self.ex.finished = True
        self.deadlines.cancel(self.slot, self._total_expired)
        self.head_arrived()
        self.connection.on_lost = None


class RequestBody:
    """The client's body, streamed up as it arrives; kept (by reference, up to
    `limit` bytes; never when `limit` is negative) while it is sent, so that a
    failover attempt can send it again."""

    __slots__ = ("complete", "ex", "kept", "limit", "receive", "size")

    def __init__(self, receive: Any, ex: Exchange, limit: int) -> None:
        self.receive, self.ex = receive, ex
        # A body announced larger than the limit is never kept.
        self.limit = -1 if ex.request_length is not None and ex.request_length > limit else limit
        self.kept: list[bytes] | None = [] if self.limit >= 0 else None
        self.size = 0
        self.complete = False

    @property
    def replayable(self) -> bool:
        """Read to its end, and all of it kept."""
        return self.complete and self.kept is not None

    def stream(self) -> AsyncIterator[bytes]:
        return self._replay() if self.complete else self._first()

    async def whole(self) -> bytes | None:
        """The body in one piece, when it has arrived whole (`Exchange.body_arrived`):
        no async iterator for aiohttp to drain. None when the client has gone
        meanwhile (`stream` then finds that out as before)."""
        chunk = take_body(self.receive)
        if chunk is None:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
        self.ex.request_bytes += len(chunk)
        self._keep(chunk)
        self.complete = True
        return chunk

    async def _first(self) -> AsyncIterator[bytes]:
        ex = self.ex
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                ex.client_gone = True
                raise ConnectionResetError("client went away during the request body")
            chunk = message.get("body", b"")
            if chunk:
                ex.request_bytes += len(chunk)
                self._keep(chunk)
                yield chunk
            if not message.get("more_body", False):
                self.complete = True
                return

    def _keep(self, chunk: bytes) -> None:
        if self.kept is not None:
            self.size += len(chunk)
            if self.size > self.limit:
                self.kept = None  # too large to replay: let the chunks go
            else:
                self.kept.append(chunk)

    async def _replay(self) -> AsyncIterator[bytes]:
        for chunk in self.kept or ():
            yield chunk


class Forwarder:
    """Relays exchanges through one worker's upstream client and key pools."""

    def __init__(
        self, client: UpstreamClient, loop: asyncio.AbstractEventLoop, metrics: WorkerMetrics
    ) -> None:
        self.client = client
        self.loop = loop
        self.metrics = metrics
        self.pools = KeyPools()
        self.deadlines = Deadlines(loop)  # each exchange's whole deadline
        metrics.benched = self.pools.benched

    async def forward(
        self, upstream: Upstream, scope: Scope, receive: Any, send: Any, ex: Exchange
    ) -> None:
        ex.upstream = upstream.name
        guard = Guard(self.loop, scope[CONNECTION_SCOPE_KEY], ex, upstream.timeouts, self.deadlines)
        response: UpstreamResponse | None = None
        complete = False
        self.metrics.open_stream(upstream.name)
        try:
            response = await self.open(upstream, scope, receive, ex, guard)
            client, body = await start_relay(upstream, response, send, ex, guard)
            try:
                await body
            except (aiohttp.ClientError, OSError) as exc:
                # The response's reader keeps this error, and its traceback would
                # keep this frame, which keeps the response: a cycle (fluxgate.gcpolicy).
                exc.__traceback__ = None
                ex.outcome = "upstream_body_error"
                raise StreamAborted from None
            if client is None or not client.end():
                await send(_END)
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
    ) -> UpstreamResponse:
        """Send the request, on the next key while failover applies; return the
        response head the client gets, or raise its 502/504."""
        # ASCII only (the parser refuses other bytes in a request-target).
        path_qs = upstream_target(upstream, ex.target).decode("latin-1")
        ex.target_url = upstream.origin + path_qs
        headers = upstream_headers(scope["headers"], upstream, ex.connection_tokens)
        pool = self.pools.pool(upstream) if len(upstream.keys) > 1 else None
        # Kept for a replay only where one can happen: a pool that may fail over.
        replay = upstream.retry_body_limit if pool and upstream.max_attempts > 1 else -1
        body = RequestBody(receive, ex, replay) if ex.has_body else None
        # A Content-Length body that is all here goes up as bytes (framing unchanged).
        whole = None
        if body is not None and ex.body_arrived and ex.request_length is not None:
            whole = await body.whole()
        tried: set[int] = set()
        while True:
            index = 0 if pool is None else pool.choose(time.monotonic(), frozenset(tried))
            assert index is not None  # `_may_retry` checked that a key is left
            tried.add(index)
            key = upstream.keys[index] if upstream.keys else None
            ex.attempts += 1
            ex.provider_key = key.id if key is not None else None
            guard.await_head(upstream.timeouts)
            sent = time.monotonic()
            try:
                response = await self.client.request(
                    ex.method,
                    upstream.origin_url,
                    path_qs,
                    _with_key(headers, key, pool is not None),
                    whole if whole is not None or body is None else body.stream(),
                    upstream.timeouts.connect,
                    upstream.tls,
                )
            except (aiohttp.ClientError, OSError) as exc:
                guard.head_arrived()
                if guard.ours():  # our cancellation, reported as an error
                    raise asyncio.CancelledError from None
                if not _may_retry(upstream, pool, tried, body, ex):
                    raise upstream_failure(exc) from None
            else:
                guard.head_arrived()
                status = response.status
                if pool is not None:
                    pool.answered(index, status, response.headers, time.monotonic())
                if status not in upstream.retry_on or not _may_retry(
                    upstream, pool, tried, body, ex
                ):
                    ex.ttfb_ms = (time.monotonic() - sent) * 1000
                    ex.status = status
                    ex.response_length = response.content_length
                    return response
                response.close()  # this answer is not the client's: never read, never reused
            ex.retried = [*(ex.retried or ()), ex.provider_key]
            if upstream.retry_backoff:
                await asyncio.sleep(
                    min(upstream.retry_backoff * 2 ** (ex.attempts - 1), MAX_BACKOFF)
                )


def _with_key(
    headers: list[tuple[str, str]], key: ProviderKey | None, again: bool
) -> list[tuple[str, str]]:
    """The request headers with the provider key's last; a copy only when another
    attempt may need the list without this key's."""
    if key is None:
        return headers
    if again:
        return [*headers, key.credential]
    headers.append(key.credential)
    return headers


def _may_retry(
    upstream: Upstream,
    pool: KeyPool | None,
    tried: set[int],
    body: RequestBody | None,
    ex: Exchange,
) -> bool:
    """Another attempt, on a key not yet tried, with the same request?"""
    return (
        pool is not None
        and ex.attempts < upstream.max_attempts
        and len(tried) < len(upstream.keys)
        and (body is None or body.replayable)
        and not ex.client_gone
    )


async def start_relay(
    upstream: Upstream, response: UpstreamResponse, send: Any, ex: Exchange, guard: Guard
) -> tuple[ClientBody | None, Coroutine[Any, Any, None]]:
    """Send the response head; return what writes the rest to the client
    (fluxgate.client_response; None when `send` must) and what relays the body
    as each chunk arrives (fluxgate.relay), to await in the caller's frame: no
    frame of this one, nor the head's headers, stays alive for as long as a
    stream lasts."""
    status, headers = response.status, client_headers(response.raw_headers)
    client = send_head(send, status, headers)
    if client is None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        client = client_body(send)
    ex.response_started = True
    tap = None
    if upstream.usage is not None:  # read the provider's token usage as it passes
        ex.usage = open_tap(upstream.usage, response.status, response.headers, ex.response_length)
        tap = ex.usage if ex.usage is not None and ex.usage.active else None
    beat = None
    if upstream.timeouts.idle is not None:
        guard.watch_idle(upstream.timeouts.idle)
        beat = guard.chunk
    return client, relay_body(response, client, send, guard.connection, ex, tap, beat, guard.loop)
