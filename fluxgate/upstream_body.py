"""The protocol of an upstream connection, and a response body handed to a sink as it is parsed.

aiohttp's connection protocol (`RelayResponseHandler`) marks a pooled
connection unusable when any byte arrives between exchanges, and fails a
body that does not parse. A response body can be taken from it chunk by
chunk, in the callback that parses it (`stream_body`): the relay
(fluxgate.relay) writes each chunk to the client there, with no task woken
per chunk.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Final, Protocol, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader

from .upstream_wire import NO_HEADERS, PlainResponse, UpstreamResponse


class RelayResponseHandler(ResponseHandler):
    """aiohttp's connection protocol, marked unusable by any byte that arrives between exchanges.

    aiohttp checks a pooled connection only for being open. Bytes the upstream
    sends while it sits in the pool (a stray response, or the answer to a
    request a client smuggled in a body the upstream did not read as one) are
    parsed and queued as the *next* response, which the next client would get
    (docs/security.md). A whole queued message already shows in `should_close`; this
    flag covers a partial one, which a fresh parser would otherwise take up
    mid-message.

    It also tells a streamed body's sink when a read has been parsed
    (`stream_body`), and fails a body that does not parse.
    """

    idle = False  # the last response has ended and no exchange is running
    # A body handed to a sink (`stream_body`): its reader, the sink, and whether
    # the body is chunked.
    streaming: tuple[StreamReader, BodySink, bool] | None = None

    def data_received(self, data: bytes) -> None:
        if self.idle and data:  # aiohttp calls it with b"" itself to resume parsing
            self.force_close()
        super().data_received(data)
        if self.streaming is not None:  # what this read held has been parsed
            self.streaming[1].flush()

    def set_exception(self, exc: BaseException, *args: Any, **kwargs: Any) -> None:
        super().set_exception(exc, *args, **kwargs)
        # aiohttp puts a body that fails to parse (a malformed chunk) on the
        # protocol but not on the body's reader, and closing the transport then
        # tells it nothing either: its reader, or the relay's sink, would wait
        # for the rest until a deadline. It fails now, as a cut body.
        payload = self._payload
        if payload is not None and not payload.is_eof() and payload.exception() is None:
            payload.set_exception(aiohttp.ClientPayloadError("response body not completed"))

    def went_idle(self) -> None:
        self.idle = True


class BodySink(Protocol):
    """Where `stream_body` hands a response body: called from aiohttp's parser."""

    def chunk(self, data: bytes) -> None: ...

    def flush(self) -> None:
        """The chunks of one read from the upstream have all been handed over.

        One read may hold many chunks (a hostile upstream's thousands of
        one-byte ones): a sink that writes them out together here makes one
        write to the client per read from the upstream, as nginx does."""

    def ended(self, error: BaseException | None) -> None:
        """The body ended (None) or failed (aiohttp's error); called once, the
        chunks before it flushed or not."""


class _StreamedReader(StreamReader):
    """A response body's reader whose chunks go to a sink rather than to a buffer.

    `stream_body` gives a response's reader this class once its buffered
    chunks are taken, and binds the sink on the connection's protocol; the
    end, a failure or `unstream_body` give it aiohttp's class back. So a
    reader called after its exchange (aiohttp's `release` marks it closed,
    even after its end, when its connection may carry the next exchange) is
    aiohttp's own again and reaches no sink. No slots of its own: the class
    of an object made by aiohttp's parser can only be swapped for one with
    its layout. While swapped it holds no buffers (`_swap`).
    """

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        if data:
            self._protocol.streaming[1].chunk(data)  # type: ignore[attr-defined]
        return False

    # A sink keeps no chunk: there are no HTTP chunk boundaries to count (aiohttp
    # pauses reading after enough of them when they are buffered).
    def begin_http_chunk_receiving(self) -> None:
        pass

    def end_http_chunk_receiving(self) -> None:
        pass

    def feed_eof(self) -> None:
        sink = self._unbind()  # aiohttp's class again: no `super()` from here
        StreamReader.feed_eof(self)  # its callbacks put the connection back in the pool
        sink.ended(None)

    def set_exception(self, exc: BaseException, *args: Any, **kwargs: Any) -> None:
        sink = self._unbind()  # aiohttp's class again: no `super()` from here
        StreamReader.set_exception(self, exc, *args, **kwargs)
        sink.ended(exc)

    def _unbind(self) -> BodySink:
        protocol = cast(RelayResponseHandler, self._protocol)
        assert protocol.streaming is not None and protocol.streaming[0] is self
        return _unswap(protocol)


# What a buffer that stays empty while a body streams is replaced with (`_swap`):
# nothing can be put in it, so a library call that tried would fail at once.
_NOTHING_BUFFERED: Final[Any] = ()


def _swap(content: StreamReader, protocol: RelayResponseHandler, sink: BodySink) -> None:
    """Bind `sink` to the body, and let go of the buffers that stay empty meanwhile.

    They are the reader's buffer and its queue of chunk boundaries, and the
    connection's queue of parsed responses (this one's has been read; the next
    cannot be parsed before this body ends). An empty deque still holds a
    block of 64 slots, and thousands of open streams each held three.
    `_unswap` gives aiohttp fresh ones.
    """
    chunked = content._http_chunk_splits is not None
    content._buffer = _NOTHING_BUFFERED
    content._http_chunk_splits = None
    if not protocol._buffer:
        protocol._buffer = _NOTHING_BUFFERED
    content.__class__ = _StreamedReader
    protocol.streaming = (content, sink, chunked)


def _unswap(protocol: RelayResponseHandler) -> BodySink:
    assert protocol.streaming is not None
    content, sink, chunked = protocol.streaming
    protocol.streaming = None
    content.__class__ = StreamReader
    content._buffer = collections.deque()
    content._http_chunk_splits = collections.deque() if chunked else None
    if protocol._buffer is _NOTHING_BUFFERED:
        protocol._buffer = collections.deque()
    return sink


def streamable(response: UpstreamResponse) -> bool:
    """Whether `stream_body` can take this response's body: its reader is
    aiohttp's plain one (a HEAD's or a bodiless answer's is not, nor would
    be a reader of another kind in a later aiohttp: read those as usual)."""
    return type(response.content) is StreamReader


def stream_body(response: UpstreamResponse, sink: BodySink) -> ResponseHandler | None:
    """Hand the rest of `response`'s body to `sink` as aiohttp parses it.

    What is already buffered goes to `sink.chunk` (and `flush`) at once. Returns the
    connection's protocol, whose `pause_reading` and `resume_reading` hold
    the upstream back while the client cannot take more; or None when the
    body had already ended (`sink.ended` has been called). Until it ends,
    `unstream_body` must undo it when the caller stops listening.

    A body still to come is taken to mean that the head has been relayed:
    what aiohttp parsed of it is let go (`_let_head_go`), so read any header
    needed before.
    """
    content = response.content
    assert type(content) is StreamReader, "not streamable"
    error = content.exception()
    if error is None and (buffered := content.read_nowait()):
        sink.chunk(buffered)
        sink.flush()
    connection = response.connection
    if error is None and not content.is_eof() and connection is None:
        # Unfinished, yet nothing left to finish it: a cut body, never a whole one.
        error = aiohttp.ClientPayloadError("response body not completed")
    if error is not None or content.is_eof():
        sink.ended(error)
        return None
    assert connection is not None
    protocol = connection.protocol
    assert isinstance(protocol, RelayResponseHandler)
    _let_head_go(response)
    _swap(content, protocol, sink)
    return protocol


def _let_head_go(response: UpstreamResponse) -> None:
    """Drop the response's parsed head: its header list, its raw headers and
    the copies aiohttp cached of them. A stream can last minutes, and a
    provider's head is often twenty headers or more."""
    if isinstance(response, PlainResponse):
        response.let_head_go()
        return
    assert isinstance(response, aiohttp.ClientResponse)
    response._headers = NO_HEADERS
    response._raw_headers = ()
    response._cache.pop("headers", None)
    response._cache.pop("raw_headers", None)


def unstream_body(protocol: ResponseHandler, sink: BodySink) -> None:
    """`sink` hears no more of the body `stream_body` handed it (if it had not ended)."""
    assert isinstance(protocol, RelayResponseHandler)
    if protocol.streaming is not None and protocol.streaming[1] is sink:
        _unswap(protocol)


def relay_handler(loop: asyncio.AbstractEventLoop) -> ResponseHandler:
    return RelayResponseHandler(loop=loop)
