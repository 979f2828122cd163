"""The upstream HTTP client: one aiohttp connection pool per worker, used as a pure relay.

A stock `ClientSession` adds headers, decompresses bodies, keeps cookies,
follows redirects and cuts requests after 300 s. Each of those would make
the proxy unfaithful (docs/architecture.md, "Library traps"), so none of it
is used: requests go through aiohttp's connector directly
(`UpstreamClient`), with nothing added and nothing decoded. The mapping from
client exceptions to the statuses of README "Request handling", step 10
lives beside it.

A request whose body is all here is written by Fluxgate itself and its
response read from the connection's parser (fluxgate.upstream_wire); the
connections' protocol, and the response bodies handed to the relay as they
are parsed, are fluxgate.upstream_body's.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.payload import AsyncIterablePayload
from multidict import CIMultiDict
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
from .upstream_body import RelayResponseHandler, relay_handler
from .upstream_wire import (
    NO_HEADERS,
    PlainResponse,
    UpstreamResponse,
    request_head,
    unsolicited_interim,
)

# The one header aiohttp would still add to a request built from a complete
# header list: the body payload's Content-Type (application/octet-stream for a
# stream). Built once, read by every request.
_SKIP_AUTO_HEADERS: Final = CIMultiDict[None]({"Content-Type": None})
# A keep-alive connection the upstream closed while idle fails the next request
# on it; aiohttp's session retries those once when a replay is harmless.
_RETRY_ON_STALE: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Idle connections a worker keeps per upstream origin, as nginx's `keepalive`
# (README "Many long streams").
MAX_IDLE: Final = 256
# Methods whose request content has no meaning a server must honour (RFC 9110
# §9.3): an upstream may answer one without reading its body and then read
# the body as the next request, whose answer, however late, would go to
# whichever client uses the connection next. Such an exchange is never pooled.
_BODY_MAY_BE_IGNORED: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
_NO_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None)
_READ_BUFSIZE: Final = 2**16
# A body this small goes in the same write as the head (copied once); a larger
# one is written after it, not copied.
_JOINED_BODY: Final = 2**16
# Origins whose connect request is kept (`UpstreamClient._connect_request`): more
# than a config has upstreams; reloads that change them start the table again.
_CONNECT_REQUESTS: Final = 256
_MAX_LINE_SIZE: Final = 8190
_MAX_FIELD_SIZE: Final = 8190
_MAX_HEADERS: Final = 128


class VerbatimRequest(aiohttp.ClientRequest):
    """A request whose body streams up, sent with exactly the headers it is
    given, in their order (a request that arrived whole is written by
    fluxgate.upstream_wire instead).

    The caller passes the complete header list, `Host` first, so aiohttp's
    merging and defaulting is skipped: no User-Agent/Accept/Accept-Encoding,
    and no `Content-Type` from the body payload.

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
        return aiohttp.RequestInfo(self.url, self.method, NO_HEADERS, self.original_url)

    def update_auto_headers(self, skip_auto_headers: Any) -> None:
        self._skip_auto_headers = _SKIP_AUTO_HEADERS


class _ConnectRequest(aiohttp.ClientRequest):
    """What the connector reads to find or make a connection (its host, port and
    TLS setting), never sent and never changed: its pool key is worked out once
    rather than at every connection taken from the pool."""

    @functools.cached_property
    def connection_key(self) -> ConnectionKey:
        return super().connection_key


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, keeping at most `max_idle` idle connections per origin.

    aiohttp keeps every connection given back for `keepalive_timeout`, however
    many: after a burst of thousands of streams a worker held thousands of idle
    upstream connections (a socket, a parser and, over TLS, its buffers each)
    for up to twice that, and the provider held them too. A connection given
    back beyond the bound closes the one idle longest. aiohttp has no setting
    for it; `_release` is where it files a connection as idle.
    """

    def __init__(self, max_idle: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_idle = max_idle

    def _release(self, key: ConnectionKey, protocol: Any, *, should_close: bool = False) -> None:
        super()._release(key, protocol, should_close=should_close)
        idle = self._conns.get(key)
        if idle is not None and len(idle) > self.max_idle:
            oldest, _ = idle.popleft()
            oldest.close()


class UpstreamClient:
    """The worker's connection pool to the upstreams, and one exchange at a time over it.

    `ClientSession.request` spends about as much CPU on per-call machinery
    (argument merging, URL rebuilding, cookie, proxy, auth, trace and timer
    bookkeeping; none of which a relay uses) as on the exchange itself. This
    drives aiohttp's own parts directly: the connector's keep-alive pool and
    its connections' parser, with the request written here when it arrived
    whole (fluxgate.upstream_wire), or `ClientRequest.send` and
    `ClientResponse.start` when its body streams. Only
    the connect deadline is aiohttp's; the others (first byte, idle, total)
    are the caller's (fluxgate.forward), per exchange.
    Must be created with the worker's loop running.
    """

    def __init__(self, max_idle: int = MAX_IDLE) -> None:
        self.connector = _Connector(
            max_idle,
            limit=0,  # max_connections already bounds concurrency on the client side
            ttl_dns_cache=30,
            keepalive_timeout=30,
        )
        # aiohttp has no public way to choose the protocol class of its connections.
        self.connector._factory = functools.partial(relay_handler, asyncio.get_running_loop())
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
        self._connect_requests: dict[tuple[URL, ssl.SSLContext | bool], aiohttp.ClientRequest] = {}

    async def close(self) -> None:
        await self.session.close()

    async def request(
        self,
        method: str,
        origin: URL,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        connect_timeout: float,
        ssl: ssl.SSLContext | bool = True,
    ) -> UpstreamResponse:
        """Send the request head for `target` (path and query, as the client sent
        them) at `origin`, and `body` (bytes, or streamed); return once the
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
                if body is None or isinstance(body, bytes):
                    return await self._send_whole(method, origin, target, headers, body,
                                                  timeout, ssl)  # fmt: skip
                return await self._send_streamed(method, origin, target, headers, body,
                                                 timeout, ssl)  # fmt: skip
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                if not retry:
                    raise
                retry = False

    async def _send_whole(
        self,
        method: str,
        origin: URL,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        timeout: aiohttp.ClientTimeout,
        ssl: ssl.SSLContext | bool,
    ) -> UpstreamResponse:
        """A request whose body is all here, or that has none: head and body
        written at once, the response read straight from the connection's
        parser (fluxgate.upstream_wire says why)."""
        head = request_head(method, target, headers)
        conn, protocol = await self._connection(
            self._connect_request(origin, ssl), method, body is not None, timeout
        )
        try:
            transport = protocol.transport
            if transport is None or transport.is_closing():
                raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
            if not body:
                transport.write(head)
            elif len(body) <= _JOINED_BODY:  # one system call, one small copy
                transport.write(head + body)
            else:
                transport.writelines((head, body))
            return await PlainResponse.start(conn, protocol, origin, method)
        except BaseException as exc:
            _abandon(conn, protocol)
            if isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError | TimeoutError):
                raise aiohttp.ClientOSError(*exc.args) from exc
            raise

    async def _send_streamed(
        self,
        method: str,
        origin: URL,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes],
        timeout: aiohttp.ClientTimeout,
        ssl: ssl.SSLContext | bool,
    ) -> aiohttp.ClientResponse:
        """A request whose body is still arriving: aiohttp's `ClientRequest` sends
        it chunk by chunk from a task of its own while the response may
        already come (an early refusal), and its `ClientResponse` ends that task."""
        req = VerbatimRequest(
            method,
            origin.with_path(target, encoded=True),  # not URL(): keeps a bare "?"
            headers=headers,
            # Its payload made here: aiohttp's registry would find the kind of an
            # async iterator by trying every kind it knows in turn.
            data=AsyncIterablePayload(body),
            loop=self._loop,
            session=self.session,
            ssl=ssl,
        )
        conn, protocol = await self._connection(req, method, True, timeout)
        try:
            resp = await req.send(conn)
            try:
                await resp.start(conn)
                if resp.status < 200:
                    raise unsolicited_interim(resp.request_info, resp.status)
            except BaseException:
                resp.close()
                raise
            # From the end of this response on, any byte is one nobody asked for.
            resp.content.on_eof(protocol.went_idle)
        except BaseException as exc:
            _abandon(conn, protocol)
            if isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError | TimeoutError):
                raise aiohttp.ClientOSError(*exc.args) from exc
            raise
        return resp

    async def _connection(
        self,
        req: aiohttp.ClientRequest,
        method: str,
        has_body: bool,
        timeout: aiohttp.ClientTimeout,
    ) -> tuple[Connection, RelayResponseHandler]:
        """A connection for `req`'s origin from the pool, or a new one, set to
        parse the answer to `method`."""
        conn = await self._connect(req, timeout)
        protocol = conn.protocol
        assert isinstance(protocol, RelayResponseHandler)
        while protocol.should_close:
            # A pooled connection with something left on it: unread bytes, a
            # previous response not read to its end, a close the upstream
            # asked for. Never reused (as nginx does); the next pooled or a new one.
            conn.close()
            conn = await self._connect(req, timeout)
            protocol = conn.protocol
            assert isinstance(protocol, RelayResponseHandler)
        protocol.idle = False
        if has_body and method in _BODY_MAY_BE_IGNORED:
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
        return conn, protocol

    def _connect_request(self, origin: URL, ssl: ssl.SSLContext | bool) -> aiohttp.ClientRequest:
        """What the connector reads to find or make a connection to `origin` (its
        host, port and TLS setting): one request per origin and setting, never sent."""
        key = (origin, ssl)
        req = self._connect_requests.get(key)
        if req is None:
            if len(self._connect_requests) >= _CONNECT_REQUESTS:  # upstreams changed by reloads
                self._connect_requests.clear()
            req = _ConnectRequest("GET", origin, loop=self._loop, session=self.session, ssl=ssl)
            self._connect_requests[key] = req
        return req

    async def _connect(
        self, req: aiohttp.ClientRequest, timeout: aiohttp.ClientTimeout
    ) -> Connection:
        try:
            return await self.connector.connect(req, traces=[], timeout=timeout)
        except TimeoutError as exc:  # what ClientSession turns into this
            raise aiohttp.ConnectionTimeoutError(f"connect timeout to {req.url.host}") from exc


def _abandon(conn: Connection, protocol: RelayResponseHandler) -> None:
    """Close the connection of an exchange that failed.

    A response that did not parse leaves its error on the connection's
    protocol, and the traceback it got when it was raised holds the frames
    that read it, which hold the protocol: a cycle, which only a full
    collection would free (docs/architecture.md, "Garbage collection"). Those
    tracebacks go; the error being raised keeps its own.
    """
    error, depth = protocol.exception(), 0
    while error is not None and depth < 4:  # the error and what it was made from
        error.__traceback__, error, depth = None, error.__cause__, depth + 1
    conn.close()


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
