"""The protocol of an upstream connection, and a response body handed to a sink as it is parsed.

aiohttp's connection protocol (`RelayResponseHandler`) marks a pooled
connection unusable when any byte arrives between exchanges, and fails a
body that does not parse. A response body can be taken from it chunk by
chunk, in the callback that parses it (`stream_body`): the relay
(fluxgate.relay) writes each chunk to the client there, with no task woken
per chunk.

A chunked body's read that is exactly one whole chunk, arriving while the
parser stands between two chunks, goes to the sink as it arrived
(`BodySink.whole_chunk`) instead of through the parser: such reads are most
of a token stream, one event each, and the parser's callbacks were the
larger part of their cost (bench/design.md). The parser stays where it was,
before a chunk-size line, which is where that read leaves the body too.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Final, Protocol, cast

import aiohttp
from aiohttp import http_parser
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader

from .upstream_wire import NO_HEADERS, PlainResponse, UpstreamResponse

# Whether aiohttp parses with llhttp (its C parser), which ends a chunk only
# after the line break that closes its data. That is what makes "no chunk
# open, and the read ended with a line break" mean "before a chunk-size line"
# (`RelayResponseHandler.data_received`). aiohttp's Python parser ends a chunk
# before that line break: with it, every read is parsed.
_LLHTTP: Final = http_parser.HttpResponseParser is not http_parser.HttpResponseParserPy
# The longest chunk-size line `chunk_size` takes: 16 hex digits, as llhttp.
_SIZE_DIGITS: Final = 16


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
    # While a body streams (set by `_swap`, read only then): whether its reads
    # may skip the parser; whether a chunk's size line has been parsed and its
    # end not yet (from the parser's callbacks); and whether the parser has
    # taken every byte so far and stands before a chunk-size line.
    whole_chunks = False
    chunk_open = False
    between_chunks = False
    socket_paused = False  # by `pause_reading` while a body streams

    def data_received(self, data: bytes) -> None:
        streaming = self.streaming
        if streaming is None:
            if self.idle and data:  # aiohttp calls it with b"" itself to resume parsing
                self.force_close()
            super().data_received(data)
            return
        if self.between_chunks and streaming[1].whole_chunk(data):
            return  # the parser stays before the next chunk, as the body does
        super().data_received(data)
        if self.streaming is streaming:  # the body goes on after this read
            if self.whole_chunks:
                # With no chunk open, a read that ended with a line break left
                # llhttp before a size line (`_LLHTTP`; a size line ends with
                # one too, and opens its chunk). The parser took all of it: it
                # is not paused while a body streams (`pause_reading`), and
                # when aiohttp pauses it, it stops in a chunk's data.
                self.between_chunks = not self.chunk_open and data.endswith(b"\n")
            streaming[1].flush()  # what this read held has been parsed

    # The relay pauses the connection while the client's buffer is full. aiohttp's
    # pause also tells the parser to stop after the next piece of body it
    # parses, and its resume does not take that back: the first read after
    # it would be parsed up to its first chunk only, the rest (the body's end,
    # maybe) held until the upstream sent more. A sink keeps nothing, so
    # while a body streams only the socket stops being read.
    def pause_reading(self) -> None:
        if self.streaming is None:
            super().pause_reading()
        elif not self.socket_paused:
            self.socket_paused = True
            self._pause_transport_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self.socket_paused:
            self.socket_paused = False
            self._resume_transport_reading()
        else:
            super().resume_reading(resume_parser)

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

    def whole_chunk(self, data: bytes) -> bool:
        """Take `data`, a read from the upstream made while the parser stood
        before a chunk-size line, as it arrived if it is one whole chunk
        (`chunk_size`); or return False, having done nothing, to have it parsed."""

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
    # pauses reading after enough of them when they are buffered). Whether one
    # is open tells the protocol where the parser stands (`data_received`).
    def begin_http_chunk_receiving(self) -> None:
        self._protocol.chunk_open = True  # type: ignore[attr-defined]

    def end_http_chunk_receiving(self) -> None:
        self._protocol.chunk_open = False  # type: ignore[attr-defined]

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


def _swap(
    content: StreamReader, protocol: RelayResponseHandler, sink: BodySink, chunked: bool
) -> None:
    """Bind `sink` to the body, and let go of the buffers that stay empty meanwhile.

    They are the reader's buffer and its queue of chunk boundaries, and the
    connection's queue of parsed responses (this one's has been read; the next
    cannot be parsed before this body ends). An empty deque still holds a
    block of 64 slots, and thousands of open streams each held three.
    `_unswap` gives aiohttp fresh ones.

    `chunked`: whether the body is known to be chunked. A chunk already begun
    says so too; until then, where the parser stands is not known.
    """
    begun = content._http_chunk_splits is not None
    protocol.whole_chunks = _LLHTTP and chunked
    # A chunk begun may still be open; none begun: the parser may be inside
    # the first size line. Either way the next read is parsed, and tells.
    protocol.chunk_open = begun
    protocol.between_chunks = False
    chunked = chunked or begun
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
    chunked = isinstance(response, PlainResponse) and response.chunked
    _let_head_go(response)
    _swap(content, protocol, sink, chunked)
    return protocol


def chunk_size(data: bytes) -> int:
    """The size of the chunk that `data` is, when it is exactly one whole chunk
    of a chunked body, framed as the relay frames one (fluxgate.client_response):
    the size in lowercase hex without leading zeros, no extension, CRLF line
    ends, more than 0 bytes. Otherwise 0: other framings are valid too, but
    those reads are parsed (and framed anew for the client)."""
    line_end = data.find(b"\r\n", 1, _SIZE_DIGITS + 2)
    size = len(data) - line_end - 4
    if line_end > 0 and size > 0 and data.endswith(b"\r\n") and data[:line_end] == b"%x" % size:
        return size
    return 0


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
