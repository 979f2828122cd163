"""The upstream HTTP client: one aiohttp connection pool per worker, used as a pure relay.

A stock `ClientSession` adds headers, decompresses bodies, keeps cookies,
follows redirects and cuts requests after 300 s. Each of those would make the
proxy unfaithful (docs/architecture.md, "Library traps"), so none of it is used: requests go
through aiohttp's connector, `ClientRequest` and `ClientResponse` directly
(`UpstreamClient`), with nothing added and nothing decoded. The mapping from
client exceptions to the statuses of README "Request handling", step 10 lives beside it.

A response body can also be taken from aiohttp chunk by chunk, in the
callback that parses it (`stream_body`): the relay (fluxgate.relay) writes
each chunk to the client there, with no task woken per chunk.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
from collections.abc import AsyncIterator
from typing import Any, Final, Protocol, cast

import aiohttp
from aiohttp import hdrs
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection
from aiohttp.payload import AsyncIterablePayload
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import (
    UPSTREAM_BAD_RESPONSE,
    UPSTREAM_CONNECT_TIMEOUT,
    UPSTREAM_CONNECTION_ERROR,
    UPSTREAM_DNS_ERROR,
    UPSTREAM_TLS_ERROR,
    UPSTREAM_UNREACHABLE,
    ProxyError,
)

# The one header aiohttp would still add to a request built from a complete
# header list: the body payload's Content-Type (application/octet-stream for a
# stream). Built once, read by every request.
_SKIP_AUTO_HEADERS: Final = CIMultiDict[None]({"Content-Type": None})
# What a response keeps of its request's headers (`VerbatimRequest.request_info`),
# and of its own once its body streams (`stream_body`).
_NO_HEADERS: Final = CIMultiDictProxy(CIMultiDict[str]())
# A keep-alive connection the upstream closed while idle fails the next request
# on it; aiohttp's session retries those once when a replay is harmless.
_RETRY_ON_STALE: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods whose request content has no meaning a server must honour (RFC 9110
# §9.3): an upstream may answer one without reading its body and then read
# the body as the next request, whose answer, however late, would go to
# whichever client uses the connection next. Such an exchange is never pooled.
_BODY_MAY_BE_IGNORED: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
_NO_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None)
_READ_BUFSIZE: Final = 2**16
_MAX_LINE_SIZE: Final = 8190
_MAX_FIELD_SIZE: Final = 8190
_MAX_HEADERS: Final = 128


class VerbatimRequest(aiohttp.ClientRequest):
    """A request that sends exactly the headers it is given, in their order.

    The caller passes the complete header list, `Host` first, so aiohttp's
    merging and defaulting is skipped: no User-Agent/Accept/Accept-Encoding,
    no `Content-Type` from the body payload, and no `Content-Length: 0` on a
    body-less POST the client sent without one (a request with neither
    length nor chunking already has an empty body, RFC 9112 §6.3).

    The response keeps none of those headers (`request_info`): they carry the
    provider's key.
    """

    def update_headers(self, headers: Any) -> None:
        self.headers = CIMultiDict(headers)

    @property
    def request_info(self) -> aiohttp.RequestInfo:
        """What the response, and any aiohttp error made from it, keeps of this
        request: not its headers. They hold the provider key, which an error's
        repr would otherwise print; and an open stream would keep them, with
        what serializing them left cached, for as long as it lasts."""
        return aiohttp.RequestInfo(self.url, self.method, _NO_HEADERS, self.original_url)

    def update_auto_headers(self, skip_auto_headers: Any) -> None:
        self._skip_auto_headers = _SKIP_AUTO_HEADERS

    def update_body_from_data(self, body: Any, _stacklevel: int = 3) -> None:
        had_length = hdrs.CONTENT_LENGTH in self.headers
        super().update_body_from_data(body, _stacklevel + 1)
        if body is None and not had_length:
            self.headers.pop(hdrs.CONTENT_LENGTH, None)


class _RelayResponseHandler(ResponseHandler):
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
        protocol = cast(_RelayResponseHandler, self._protocol)
        assert protocol.streaming is not None and protocol.streaming[0] is self
        return _unswap(protocol)


# What a buffer that stays empty while a body streams is replaced with (`_swap`):
# nothing can be put in it, so a library call that tried would fail at once.
_NOTHING_BUFFERED: Final[Any] = ()


def _swap(content: StreamReader, protocol: _RelayResponseHandler, sink: BodySink) -> None:
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


def _unswap(protocol: _RelayResponseHandler) -> BodySink:
    assert protocol.streaming is not None
    content, sink, chunked = protocol.streaming
    protocol.streaming = None
    content.__class__ = StreamReader
    content._buffer = collections.deque()
    content._http_chunk_splits = collections.deque() if chunked else None
    if protocol._buffer is _NOTHING_BUFFERED:
        protocol._buffer = collections.deque()
    return sink


def streamable(response: aiohttp.ClientResponse) -> bool:
    """Whether `stream_body` can take this response's body: its reader is
    aiohttp's plain one (a HEAD's or a bodiless answer's is not, nor would
    be a reader of another kind in a later aiohttp: read those as usual)."""
    return type(response.content) is StreamReader


def stream_body(response: aiohttp.ClientResponse, sink: BodySink) -> ResponseHandler | None:
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
    assert isinstance(protocol, _RelayResponseHandler)
    _let_head_go(response)
    _swap(content, protocol, sink)
    return protocol


def _let_head_go(response: aiohttp.ClientResponse) -> None:
    """Drop the response's parsed head: its header list, its raw headers and
    the copies aiohttp cached of them. A stream can last minutes, and a
    provider's head is often twenty headers or more."""
    response._headers = _NO_HEADERS
    response._raw_headers = ()
    response._cache.pop("headers", None)
    response._cache.pop("raw_headers", None)


def unstream_body(protocol: ResponseHandler, sink: BodySink) -> None:
    """`sink` hears no more of the body `stream_body` handed it (if it had not ended)."""
    assert isinstance(protocol, _RelayResponseHandler)
    if protocol.streaming is not None and protocol.streaming[1] is sink:
        _unswap(protocol)


def _relay_handler(loop: asyncio.AbstractEventLoop) -> ResponseHandler:
    return _RelayResponseHandler(loop=loop)


class UpstreamClient:
    """The worker's connection pool to the upstreams, and one exchange at a time over it.

    `ClientSession.request` spends about as much CPU on per-call machinery
    (argument merging, URL rebuilding, cookie, proxy, auth, trace and timer
    bookkeeping; none of which a relay uses) as on the exchange itself. This
    drives aiohttp's own parts directly, as the session does: the connector's
    keep-alive pool, `ClientRequest.send` and `ClientResponse.start`. Only
    the connect deadline is aiohttp's; the others (first byte, idle, total)
    are the caller's (fluxgate.forward), per exchange.
    Must be created with the worker's loop running.
    """

    def __init__(self) -> None:
        self.connector = aiohttp.TCPConnector(
            limit=0,  # max_connections already bounds concurrency on the client side
            ttl_dns_cache=30,
            keepalive_timeout=30,
        )
        # aiohttp has no public way to choose the protocol class of its connections.
        self.connector._factory = functools.partial(_relay_handler, asyncio.get_running_loop())
        # Never used to send; responses keep a reference to it, and closing
        # it closes the connector.
        self.session = aiohttp.ClientSession(
            connector=self.connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=_NO_TIMEOUT,
            trust_env=False,
        )
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        await self.session.close()

    async def request(
        self,
        method: str,
        url: URL,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        connect_timeout: float,
        ssl: ssl.SSLContext | bool = True,
    ) -> aiohttp.ClientResponse:
        """Send the request head (and `body`: bytes, or streamed), return once the
        response head is in.

        `connect_timeout` bounds getting a connection (TCP and TLS); a pooled
        one is there at once. Failing it raises `aiohttp.ConnectionTimeoutError`.
        `ssl`: the upstream's TLS setting (`Upstream.tls`). aiohttp keys its pool
        by (host, port, ssl), so upstreams with different contexts never share
        a connection, even to the same host.
        """
        retry = body is None and method in _RETRY_ON_STALE
        timeout = _connect_timeout(connect_timeout)
        while True:
            try:
                return await self._exchange(method, url, headers, body, timeout, ssl)
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                if not retry:
                    raise
                retry = False

    async def _exchange(
        self,
        method: str,
        url: URL,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        timeout: aiohttp.ClientTimeout,
        ssl: ssl.SSLContext | bool = True,
    ) -> aiohttp.ClientResponse:
        data: bytes | AsyncIterablePayload | None = None
        if isinstance(body, bytes):
            data = body
        elif body is not None:
            # Its payload made here: aiohttp's registry would find the kind of an
            # async iterator by trying every kind it knows in turn.
            data = AsyncIterablePayload(body)
        req = VerbatimRequest(
            method,
            url,
            headers=headers,
            data=data,
            loop=self._loop,
            session=self.session,
            ssl=ssl,
        )
        conn = await self._connect(req, timeout)
        protocol = conn.protocol
        assert isinstance(protocol, _RelayResponseHandler)
        while protocol.should_close:
            # A pooled connection with something left on it: unread bytes, a
            # previous response not read to its end, a close the upstream
            # asked for. Never reused (as nginx does); the next pooled or a new one.
            conn.close()
            conn = await self._connect(req, timeout)
            protocol = conn.protocol
            assert isinstance(protocol, _RelayResponseHandler)
        protocol.idle = False
        if body is not None and method in _BODY_MAY_BE_IGNORED:
            protocol.force_close()
        protocol.set_response_params(
            skip_payload=method == "HEAD",
            read_until_eof=True,
            auto_decompress=False,
            read_bufsize=_READ_BUFSIZE,
            max_line_size=_MAX_LINE_SIZE,
            max_field_size=_MAX_FIELD_SIZE,
            max_headers=_MAX_HEADERS,
        )
        try:
            resp = await req.send(conn)
            try:
                await resp.start(conn)
                if resp.status < 200:
                    # aiohttp reads past 100 and the other interim responses but
                    # returns a 101, which nothing here asked for (Upgrade is never
                    # forwarded): relayed, it would make the client connection a
                    # tunnel to the upstream. A bad response, and the connection goes.
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message="unsolicited 1xx"
                    )
            except BaseException:
                resp.close()
                raise
            # From the end of this response on, any byte is one nobody asked for.
            resp.content.on_eof(protocol.went_idle)
        except OSError as exc:
            conn.close()
            if isinstance(exc, aiohttp.ClientError | TimeoutError):
                raise
            raise aiohttp.ClientOSError(*exc.args) from exc
        except BaseException:
            conn.close()
            raise
        return resp

    async def _connect(self, req: VerbatimRequest, timeout: aiohttp.ClientTimeout) -> Connection:
        try:
            return await self.connector.connect(req, traces=[], timeout=timeout)
        except TimeoutError as exc:  # what ClientSession turns into this
            raise aiohttp.ConnectionTimeoutError(f"connect timeout to {req.url.host}") from exc


@functools.lru_cache(maxsize=64)
def _connect_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """aiohttp's timeout for getting a connection (TCP and TLS), one per value."""
    return aiohttp.ClientTimeout(total=None, connect=seconds, sock_connect=seconds, sock_read=None)


def upstream_failure(exc: BaseException) -> ProxyError:
    """The answer to an upstream failure before any response byte arrived: 502, or
    504 when no connection could be made within connect_timeout_ms."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ProxyError(UPSTREAM_CONNECT_TIMEOUT)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return ProxyError(UPSTREAM_DNS_ERROR)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return ProxyError(UPSTREAM_TLS_ERROR)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ProxyError(UPSTREAM_UNREACHABLE)
    if isinstance(exc, aiohttp.ClientResponseError):
        return ProxyError(UPSTREAM_BAD_RESPONSE)
    return ProxyError(UPSTREAM_CONNECTION_ERROR)
