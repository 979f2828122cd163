"""The long-streams upstream: thousands of slow SSE streams, each event stamped when written.

    GET|POST /ticks?events=N&interval_ms=M   200, chunked text/event-stream: N events, the
                                            first at once, then one every M ms, each its own
                                            chunk and its own write, carrying
                                            time.monotonic_ns() taken just before that write
                                            ("t"); the last is `data: [DONE]`

Anything else is a 404. HTTP/1.1 keep-alive; a request body (Content-Length or
chunked) is read and dropped. bench.streams subtracts the stamp from the time
an event reaches the client, so the latency of every event through a proxy is
measured without the upstream's own timing in it.

It must stay cheap next to what it feeds (10,000 open streams, 10,000 events/s)
on a machine it shares with the proxy and the client: a raw asyncio Protocol
rather than StreamReader (no task per connection), and one timer for every
stream. Streams sharing an interval sit in a wheel of one slot per millisecond
of that interval, by the phase of their next event; a single callback every
millisecond, scheduled only while a stream is open, writes the events of the
slots whose time has come. The write itself is what the stamp times.

Run: python -m bench.tick_upstream --port P
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from typing import cast
from urllib.parse import parse_qs

import uvloop

TICK_NS = 1_000_000  # the wheel's resolution: events are due on whole milliseconds
HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ncontent-length: 10\r\n\r\nnot found\n"
)
# The shape of an OpenAI chat.completion.chunk, about 140 bytes an event (chunk framing
# included) as in a real token stream; "t" is read by the client (bench.streams).
EVENT = (
    b'data: {"id": "chatcmpl-tick", "object": "chat.completion.chunk", "t": %d, "i": %d, '
    b'"choices": [{"delta": {"content": "tok "}}]}\n\n'
)
_DONE = b"data: [DONE]\n\n"
DONE = b"%x\r\n%s\r\n" % (len(_DONE), _DONE)
LAST = b"0\r\n\r\n"


def _event_chunk(i: int) -> bytes:
    data = EVENT % (time.monotonic_ns(), i)
    return b"%x\r\n%s\r\n" % (len(data), data)


class Stream:
    """One response in progress: what is left to send and when the next event is due."""

    __slots__ = ("conn", "due_tick", "left", "sent")

    def __init__(self, conn: TickProtocol, events: int, due_tick: int) -> None:
        self.conn = conn
        self.left = events  # events still to send, [DONE] included
        self.sent = 0
        self.due_tick = due_tick

    def emit(self) -> bool:
        """Write the next event; False once the stream is over (or its client gone)."""
        conn = self.conn
        if conn.transport is None or conn.transport.is_closing():
            return False
        if self.left == 1:
            conn.transport.write(DONE)
            conn.transport.write(LAST)
            conn.finish()
            return False
        conn.transport.write(_event_chunk(self.sent))
        self.sent += 1
        self.left -= 1
        return True


class Wheel:
    """The streams of one interval, in one slot per tick of it, by phase."""

    def __init__(self, interval_ticks: int, now_tick: int) -> None:
        self.ticks = interval_ticks
        self.slots: list[list[Stream]] = [[] for _ in range(interval_ticks)]
        self.done_tick = now_tick  # every slot up to this tick has been served
        self.count = 0

    def add(self, stream: Stream) -> None:
        self.slots[stream.due_tick % self.ticks].append(stream)
        self.count += 1

    def advance(self, now_tick: int) -> None:
        # A late callback catches up on every slot it skipped, at most one full turn.
        first = max(self.done_tick + 1, now_tick - self.ticks + 1)
        for tick in range(first, now_tick + 1):
            slot = self.slots[tick % self.ticks]
            if not slot:
                continue
            keep = []
            for stream in slot:
                # A stream added during this tick may sit in a slot served now but
                # be due a whole interval later.
                if stream.due_tick > tick:
                    keep.append(stream)
                elif stream.emit():
                    stream.due_tick += self.ticks
                    keep.append(stream)
            self.count -= len(slot) - len(keep)
            self.slots[tick % self.ticks] = keep
        self.done_tick = now_tick


class Ticker:
    """The one timer of the process: serves every wheel each millisecond while any has a stream."""

    def __init__(self) -> None:
        self.wheels: dict[int, Wheel] = {}
        self.handle: asyncio.TimerHandle | None = None

    def start(self, conn: TickProtocol, events: int, interval_ms: int) -> None:
        now_tick = time.monotonic_ns() // TICK_NS
        stream = Stream(conn, events, now_tick + interval_ms)
        if not stream.emit():  # the first event at once
            return
        wheel = self.wheels.get(interval_ms)
        if wheel is None:
            wheel = self.wheels[interval_ms] = Wheel(interval_ms, now_tick)
        wheel.add(stream)
        if self.handle is None:
            self.handle = asyncio.get_running_loop().call_later(0.001, self._tick)

    def _tick(self) -> None:
        now_tick = time.monotonic_ns() // TICK_NS
        active = 0
        for wheel in self.wheels.values():
            if wheel.count:
                wheel.advance(now_tick)
            else:
                wheel.done_tick = now_tick
            active += wheel.count
        # Idle between scenarios: no wake-ups at all while no stream is open.
        self.handle = asyncio.get_running_loop().call_later(0.001, self._tick) if active else None


TICKER = Ticker()


class TickProtocol(asyncio.Protocol):
    """One client connection: parses request heads, skips bodies, starts streams."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.body_left = 0  # Content-Length bytes still to skip
        self.chunked = False  # skipping a chunked request body
        self.streaming = False  # a response is in progress: later requests wait in buf
        self.pending: tuple[bytes, dict[str, list[str]]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None  # the stream, if any, sees it at its next event and is dropped

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._process()

    def _skip_body(self) -> bool:
        """Drop what `buf` holds of the current body; True once it is all gone."""
        if self.body_left:
            n = min(self.body_left, len(self.buf))
            self.buf = self.buf[n:]
            self.body_left -= n
            return not self.body_left
        while self.chunked:
            end = self.buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(self.buf[:end].split(b";", 1)[0], 16)
            if size == 0:
                # No trailers are sent to it: the last chunk is `0\r\n\r\n`.
                if len(self.buf) < end + 4:
                    return False
                self.buf = self.buf[end + 4 :]
                self.chunked = False
            elif len(self.buf) >= end + 2 + size + 2:
                self.buf = self.buf[end + 2 + size + 2 :]
            else:
                return False
        return True

    def _process(self) -> None:
        while not self.streaming and self.transport is not None:
            if self.pending is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self.buf = self.buf[:end], self.buf[end + 4 :]
                lines = head.split(b"\r\n")
                target = lines[0].split(b" ")[1]
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        self.body_left = int(value)
                    elif name == b"transfer-encoding" and b"chunked" in value.lower():
                        self.chunked = True
                path, _, query = target.partition(b"?")
                self.pending = (path, parse_qs(query.decode()))
            if not self._skip_body():
                return
            path, params = self.pending
            self.pending = None
            if path != b"/ticks":
                self.transport.write(NOT_FOUND)
                continue
            events = int(params.get("events", ["10"])[0])
            interval_ms = int(params.get("interval_ms", ["100"])[0])
            self.streaming = True
            self.transport.write(HEAD)
            TICKER.start(self, max(1, events), max(1, interval_ms))

    def finish(self) -> None:
        """The stream's last chunk is written: serve the next request on this connection."""
        self.streaming = False
        if self.buf:
            self._process()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(TickProtocol, "127.0.0.1", port, backlog=8192)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    # One descriptor per stream: 10,000 of them is past the usual soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    uvloop.run(serve(port))


if __name__ == "__main__":
    main()
