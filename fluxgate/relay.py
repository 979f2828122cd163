"""A response body on its way to the client, chunk by chunk, in the callback that parses it.

README "Request handling", step 9. Once the response head has gone out
through uvicorn's `send`, the body chunks aiohttp parses from one read of
the upstream socket are written to the client socket in the same callback,
in one write (`BodyRelay`): no reader buffer, no task woken, no ASGI
message per chunk. A long stream of small events is what a gateway mostly
carries, and that per-chunk machinery was most of its CPU per event
(bench/design.md).

Flow control runs both ways through the same callbacks: when the client's
socket buffer fills, the upstream's socket stops being read until it drains
(the read in hand is relayed whole: fluxgate.upstream_body
`RelayResponseHandler.pause_reading`). The token-usage tap and the idle
deadline see every chunk as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .exchange import ClientLink, Exchange
from .upstream_body import chunk_size, stream_body, streamable, unstream_body
from .upstream_wire import UpstreamResponse

if TYPE_CHECKING:
    from aiohttp.client_proto import ResponseHandler

    from .client_response import ClientBody
    from .usage import Tap


class BodyRelay:
    """One response body between aiohttp's parser (a `BodySink`, fluxgate.upstream)
    and the client's transport (a `Flow`, fluxgate.exchange)."""

    __slots__ = (
        "_beat", "_client", "_done", "_ex", "_framed", "_loop", "_paused", "_pending", "_tap",
        "_upstream", "error",
    )  # fmt: skip

    def __init__(
        self,
        client: ClientBody,
        ex: Exchange,
        tap: Tap | None,
        beat: Callable[[], None] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._client, self._ex, self._tap, self._beat = client, ex, tap, beat
        self._loop = loop
        self._framed = client.chunked  # the client's body is chunked too: a chunk goes as it is
        self._done: asyncio.Future[None] | None = None  # made only for a body still to come
        self._upstream: ResponseHandler | None = None
        self._paused = False
        self._pending: list[bytes] = []  # the chunks of the current upstream read
        self.error: BaseException | None = None  # how the body failed, once ended

    # From the upstream's parser

    def chunk(self, data: bytes) -> None:
        self._ex.response_bytes += len(data)
        self._pending.append(data)
        if self._tap is not None:
            self._tap.feed(data)
        if self._beat is not None:
            self._beat()

    def whole_chunk(self, data: bytes) -> bool:
        # The same bytes `chunk` and `flush` would write for it, in one step.
        size = chunk_size(data) if self._framed else 0
        if not size:
            return False
        self._ex.response_bytes += size
        if self._tap is not None:
            self._tap.feed(data[-size - 2 : -2])
        if self._beat is not None:
            self._beat()
        self._client.write_framed(data)
        return True

    def flush(self) -> None:
        pending = self._pending
        if pending:
            self._client.write(pending[0] if len(pending) == 1 else b"".join(pending))
            pending.clear()

    def ended(self, error: BaseException | None) -> None:
        # The connection may be back in the pool already: a client that fills up
        # at the last write must not pause it, or the next exchange on it stalls.
        self._upstream = None
        self.flush()
        # A result, never an exception, on the future: a relay cancelled after
        # the body failed would leave it unretrieved, which asyncio logs.
        self.error = error
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # From the client's protocol

    def pause(self) -> None:
        if self._upstream is not None and not self._paused:
            self._paused = True
            self._upstream.pause_reading()

    def resume(self) -> None:
        if self._upstream is not None and self._paused:
            self._paused = False
            self._upstream.resume_reading()

    async def run(self, response: UpstreamResponse, link: ClientLink) -> None:
        """Until the body has ended; raises how it failed (aiohttp's error)."""
        upstream = stream_body(response, self)
        if upstream is not None:
            self._upstream = upstream
            self._done = self._loop.create_future()
            link.flow = self
            if self._client.paused:  # already, or by the chunks that were buffered
                self.pause()
            try:
                await self._done
            finally:
                link.flow = None
                unstream_body(upstream, self)
                self._upstream = None
        if self.error is not None:
            raise self.error


def relay_body(
    response: UpstreamResponse,
    client: ClientBody | None,
    send: Any,
    link: ClientLink,
    ex: Exchange,
    tap: Tap | None,
    beat: Callable[[], None] | None,
    loop: asyncio.AbstractEventLoop,
) -> Coroutine[Any, Any, None]:
    """To await: the body of `response`, whose head has been sent, up to its
    end (not included: the caller ends it), written by `client`, or through
    `send` when there is none. Raises aiohttp's error if the body fails. Not a
    coroutine itself: no frame of its own held while a stream lasts."""
    if client is not None and streamable(response):
        return BodyRelay(client, ex, tap, beat, loop).run(response, link)
    return _through_send(response, send, ex, tap, beat)


async def _through_send(
    response: UpstreamResponse,
    send: Any,
    ex: Exchange,
    tap: Tap | None,
    beat: Callable[[], None] | None,
) -> None:
    # Another server than ours (tests), or a reader of another kind: chunk by chunk.
    async for chunk in response.content.iter_any():
        ex.response_bytes += len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if tap is not None:
            tap.feed(chunk)
        if beat is not None:
            beat()
