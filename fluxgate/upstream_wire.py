"""A request Fluxgate writes itself on a connection from aiohttp's pool, and its response.

Most requests arrive whole: a body that came with the head, or none. For
those, fluxgate.upstream writes the head and body in one piece
(`request_head`) and reads the answer straight from the connection's own
parser (`PlainResponse.start`): aiohttp's `ClientRequest` and
`ClientResponse` would add a URL, a header table, a payload, a stream
writer, a task to send the body from, a request record and a timer, none of
which a relay whose head is complete needs. The connector still owns the
connection; its protocol still parses, frames and limits the response.

The head is what aiohttp's writer makes of the same list: the request line,
the headers in order, UTF-8 (fluxgate.headers `wire_text`), a line break in
any of them refused.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import aiohttp
from aiohttp import hdrs
from aiohttp.connector import Connection
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# What a response keeps of its request's headers (in an aiohttp error), and of
# its own once its body streams (fluxgate.upstream_body `stream_body`).
NO_HEADERS: Final = CIMultiDictProxy(CIMultiDict[str]())
_CONNECTION_CLOSED: Final = "Connection closed"


class UpstreamResponse(Protocol):
    """What the forwarder reads of a response: `PlainResponse`, or aiohttp's
    `ClientResponse` for a request whose body streamed up."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def raw_headers(self) -> Any: ...  # tuple[tuple[bytes, bytes], ...]
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> StreamReader: ...
    @property
    def connection(self) -> Connection | None: ...
    def release(self) -> Any:
        """The body has been read to its end: the connection goes back to the pool."""

    def close(self) -> None:
        """Stop now: the connection is closed, never reused."""


def request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """The request line and headers, byte for byte what aiohttp's writer makes of them.

    A line break inside a name or value would end the header early and let
    the rest pass as another header, or as the next request: refused, as
    aiohttp's writer does (ValueError). The client's headers cannot hold one
    (the parser refuses them) nor can the config's, so this is the last line
    of defence, and costs one count of the finished text.
    """
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    text = "\r\n".join(lines) + "\r\n\r\n"
    breaks = len(lines) + 1
    if text.count("\n") != breaks or text.count("\r") != breaks:
        raise ValueError("line break in the request line or a header")
    return text.encode()


def request_info(origin: URL, method: str) -> aiohttp.RequestInfo:
    """What an aiohttp error keeps of the request: not its headers, which hold
    the provider key (an error's repr would print them), nor its target."""
    return aiohttp.RequestInfo(origin, method, NO_HEADERS, origin)


def unsolicited_interim(info: aiohttp.RequestInfo, status: int) -> aiohttp.ClientResponseError:
    """aiohttp reads past 100 and the other interim responses but returns a 101,
    which nothing here asked for (Upgrade is never forwarded): relayed, it
    would make the client connection a tunnel to the upstream. A bad
    response, and the connection goes."""
    return aiohttp.ClientResponseError(info, (), status=status, message="unsolicited 1xx")


class PlainResponse:
    """The response to a request written with `request_head`: its head as the
    connection's parser gave it, its body's reader, and the connection until
    the body has ended (then it goes back to the pool by itself)."""

    __slots__ = ("chunked", "connection", "content", "headers", "raw_headers", "status")

    def __init__(self, message: Any, content: StreamReader, connection: Connection) -> None:
        self.status: int = message.code
        self.headers: CIMultiDictProxy[str] = message.headers
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = message.raw_headers
        self.chunked: bool = message.chunked  # the body's framing, as the parser reads it
        self.content = content
        self.connection: Connection | None = connection
        # Called at once if the body has already ended (whole in the first read).
        content.on_eof(self._ended)

    @classmethod
    async def start(
        cls, connection: Connection, protocol: Any, origin: URL, method: str
    ) -> PlainResponse:
        """Wait for the response head on `connection` (whose protocol is `protocol`,
        fluxgate.upstream's handler), past any interim 100 or 103."""
        while True:
            try:
                message, content = await protocol.read()
            except HttpProcessingError as exc:  # what aiohttp's ClientResponse raises for it
                raise aiohttp.ClientResponseError(
                    request_info(origin, method), (), status=exc.code, message=exc.message
                ) from exc
            if message.code < 100 or message.code > 199:
                break
            if message.code == 101:
                raise unsolicited_interim(request_info(origin, method), message.code)
        response = cls(message, content, connection)
        # From the end of this response on, any byte is one nobody asked for.
        content.on_eof(protocol.went_idle)
        return response

    @property
    def content_length(self) -> int | None:
        value = self.headers.get(hdrs.CONTENT_LENGTH)
        return None if value is None else int(value)

    def let_head_go(self) -> None:
        """Drop the parsed head (its body streams on: fluxgate.upstream_body `stream_body`)."""
        self.headers = NO_HEADERS
        self.raw_headers = ()

    def _ended(self) -> None:
        connection, self.connection = self.connection, None
        if connection is None:
            return
        transport = connection.transport
        if transport is not None and transport.get_write_buffer_size():
            # Answered before all of the request went out (an early refusal of a
            # large body): the rest would reach the upstream ahead of the next
            # request on this connection, or fail it. Never reused.
            connection.close()
        else:
            connection.release()

    def release(self) -> None:
        self._unfinished()
        self._ended()  # a body not read to its end leaves the connection unusable: closed

    def close(self) -> None:
        self._unfinished()
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()

    def _unfinished(self) -> None:
        """A reader not at its end fails from now on, as aiohttp's response does;
        that also drops its end-of-body callbacks, which hold this response."""
        content = self.content
        if not content.is_eof() and content.exception() is None:
            content.set_exception(aiohttp.ClientConnectionError(_CONNECTION_CLOSED))
