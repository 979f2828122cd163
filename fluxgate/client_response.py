"""The relay's writes to the client: a response's head and body, as uvicorn's `send` writes them.

uvicorn's `send` takes an ASGI message per call: a head (`http.response.start`)
checked header by header against two regular expressions, then a coroutine,
a message and a flow check for every body chunk. For a relayed response
(fluxgate.forward, fluxgate.relay), whose headers aiohttp's parser has
already checked, that machinery was a large share of the Python a request
or a stream event costs (bench/design.md). `send_head` writes the head and
returns the response's `ClientBody`, which writes the body chunks and ends
the response (`end`) as `send` would: the same bytes, the same cycle state,
the connection kept or closed as uvicorn decided, uvicorn's own completion
hook called. Anything unusual (the client gone or its buffer full, another
server's `send`) goes through `send`.

A request body that arrived whole is taken from the cycle the same way
(`take_body`).

`ResponseWriter` is the transport as one request cycle sees it
(fluxgate.protocol installs it): the head is held for the first body write.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

# What uvicorn's `send` refuses in a header name (its HEADER_RE: control
# characters and separators) and in a value (control characters but tab;
# CR and LF are counted in the whole head instead).
_NOT_IN_NAMES: Final = bytes(range(0x20)) + b'\x7f()<>@,;:[]={} \\"'
_NOT_IN_VALUES: Final = (
    bytes(range(0x09)) + bytes(range(0x0B, 0x0D)) + bytes(range(0x0E, 0x20)) + b"\x7f"
)
# Headers whose meaning `send` works out itself (never among `client_headers`).
_SEND_DECIDES: Final = frozenset({b"transfer-encoding", b"connection"})
_CONNECTION_CLOSE: Final = b"connection: close\r\n"
_CHUNKED: Final = b"transfer-encoding: chunked\r\n"
_NO_CHUNKED_BODY: Final = (204, 304)
_LAST_CHUNK: Final = b"0\r\n\r\n"


def _cycle_of(send: Any) -> RequestResponseCycle | None:
    """The cycle whose `send` this is (directly, or wrapped by fluxgate.protocol
    for a request that expects 100 Continue); None for another server's."""
    cycle = getattr(send, "__self__", None) or getattr(send, "cycle", None)
    return cycle if isinstance(cycle, RequestResponseCycle) else None


def take_body(receive: Any) -> bytes | None:
    """The request body the cycle of `receive` holds, once all of it has arrived:
    what `receive` would return, without its coroutine, its Event wait and its
    message. None where `receive` must answer: another server's, a body still
    to come, a client gone, a response complete, a 100 Continue still owed."""
    cycle = _cycle_of(receive)
    if (
        cycle is None
        or cycle.more_body
        or cycle.disconnected
        or cycle.response_complete
        or cycle.waiting_for_100_continue
    ):
        return None
    cycle.flow.resume_reading()
    cycle.message_event.clear()
    body = bytes(cycle.body)
    cycle.body = bytearray()
    return body


def send_head(send: Any, status: int, headers: list[tuple[bytes, bytes]]) -> ClientBody | None:
    """Write the response head as `send` writes `http.response.start`, if it can,
    and return the `ClientBody` that writes the rest.

    `headers`: fluxgate.headers `client_headers` (lower-case names, no
    hop-by-hop header, so neither Transfer-Encoding nor Connection). Returns
    None, having changed nothing, where `send` must do it: another server's
    `send`, a response already started, a client gone or whose buffer is full
    (`send` waits for it), headers the server adds, logging, an unknown
    status, a malformed Content-Length or a byte `send` refuses (it raises).
    """
    cycle = _cycle_of(send)
    if (
        cycle is None
        or cycle.response_started
        or cycle.disconnected
        or cycle.flow.write_paused
        or cycle.default_headers
        or cycle.access_log
    ):
        return None
    line = STATUS_LINE.get(status)
    if line is None:
        return None
    parts = [line]
    length: bytes | None = None
    for name, value in headers:
        if len(name.translate(None, _NOT_IN_NAMES)) != len(name) or name in _SEND_DECIDES:
            return None
        if name == b"content-length" and length is None:
            length = value
        parts += (name, b": ", value, b"\r\n")
    lines = len(headers) + 2  # and the status line, and the blank one
    # As fluxgate.protocol's send for a request that expects 100 Continue: a
    # response before the body was asked for ends the connection.
    keep_alive = cycle.keep_alive and not (cycle.waiting_for_100_continue and cycle.more_body)
    if not keep_alive:
        parts.append(_CONNECTION_CLOSE)
        lines += 1
    chunked = length is None and cycle.scope["method"] != "HEAD" and status not in _NO_CHUNKED_BODY
    if chunked:
        parts.append(_CHUNKED)
        lines += 1
    parts.append(b"\r\n")
    head = b"".join(parts)
    if (
        head.count(b"\n") != lines
        or head.count(b"\r") != lines
        or len(head.translate(None, _NOT_IN_VALUES)) != len(head)
    ):
        return None
    try:
        expected = None if length is None else int(length.decode())
    except ValueError:
        return None
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.keep_alive = keep_alive
    if expected is not None:
        cycle.expected_content_length = expected
        cycle.chunked_encoding = False
    elif chunked:
        cycle.chunked_encoding = True
    cycle.transport.write(head)
    return ClientBody(cycle)


class ResponseWriter:
    """The transport as one request cycle sees it: its first write (the
    response head) is held until the next write or the end of the loop turn.

    uvicorn writes the head when the app sends `http.response.start`, and the
    body at the next message. For a response that arrived whole from the
    upstream (most non-streaming replies) those are two system calls where
    one will do; an SSE head whose first event is not there yet still goes
    out in the same loop turn.
    """

    __slots__ = ("_held", "_hold", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._hold = True
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._hold:
            self._hold = False
            self._held = data
            self._loop.call_soon(self.flush)
        elif self._held is not None:
            held, self._held = self._held, None
            self._transport.writelines((held, data))
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


class ClientBody:
    """A response's body chunks, written straight to the client's transport.

    The relay's path for each chunk (fluxgate.relay): framed exactly as
    uvicorn's `send` frames an `http.response.body` message (a chunk of its
    own under chunked encoding, counted against Content-Length otherwise,
    nothing for HEAD or once the client is gone), without the message, the
    coroutine and the flow check `send` costs per chunk; and ends the
    response (`end`). Made by `send_head`, or by `client_body` once `send`
    has sent the head.
    """

    __slots__ = ("_chunked", "_cycle", "_discard", "_out", "_transport")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        # The first write goes through the cycle's writer, which may hold the
        # head to send it with it; the later ones straight to the transport.
        writer = cycle.transport
        self._out: Any = writer
        self._transport = writer._transport if isinstance(writer, ResponseWriter) else writer
        self._chunked = bool(cycle.chunked_encoding)
        self._discard = cycle.scope["method"] == "HEAD"

    @property
    def paused(self) -> bool:
        """The client's socket buffer is over its high-water mark."""
        return self._cycle.flow.write_paused

    @property
    def chunked(self) -> bool:
        """The body goes out in chunks, each framed by `write` (`write_framed` takes
        one framed already)."""
        return self._chunked and not self._discard

    def write(self, chunk: bytes) -> None:
        if self._discard:
            return
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        else:
            # Counted even when not written: a client that hung up closes the
            # transport a loop turn before uvicorn hears of it, and `send`'s end
            # would meanwhile find the body short of its Content-Length.
            self._cycle.expected_content_length -= len(chunk)
            data = chunk
        if not self._transport.is_closing():
            self._out.write(data)
            self._out = self._transport

    def write_framed(self, data: bytes) -> None:
        """A chunk framed as `write` frames one (only when `chunked`)."""
        if not self._transport.is_closing():
            self._out.write(data)
            self._out = self._transport

    def end(self) -> bool:
        """End the response as `send` does for its last, empty `http.response.body`,
        if it can: the last chunk of a chunked body, the cycle complete, the
        connection closed unless kept alive, uvicorn's completion hook called.
        False, having changed nothing, where `send` must do it: a response
        already complete, a client gone or whose buffer is full, a body short
        of its Content-Length (`send` raises)."""
        cycle = self._cycle
        if cycle.response_complete or cycle.disconnected or cycle.flow.write_paused:
            return False
        if self._discard:
            cycle.expected_content_length = 0
        elif self._chunked:
            cycle.transport.write(_LAST_CHUNK)
        elif cycle.expected_content_length:
            return False
        else:
            cycle.transport.write(b"")  # as `send`: a head still held goes out now
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()
        return True


def client_body(send: Any) -> ClientBody | None:
    """The `ClientBody` of the response `send` (the app's ASGI send) has started,
    or None when `send` is not a cycle's of this protocol (then the relay
    sends each chunk through it)."""
    cycle = _cycle_of(send)
    if cycle is not None and cycle.response_started:
        return ClientBody(cycle)
    return None
