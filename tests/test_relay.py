"""A response body handed to a sink as aiohttp parses it (fluxgate.upstream_body `stream_body`).

The relay (fluxgate.relay) writes each chunk to the client in the callback
that parsed it. These tests drive `UpstreamClient` against a scripted
upstream on a real socket, in one event loop, and record what the sink is
told: every byte in order (what aiohttp had buffered first), one end, and
nothing that belongs to another exchange on the same pooled connection; and
what an open response keeps of its request.
"""

from __future__ import annotations

import asyncio
import collections
import gc
from collections.abc import AsyncIterator, Awaitable

import aiohttp
import pytest
from yarl import URL

from fluxgate.exchange import ClientLink, Exchange
from fluxgate.relay import BodyRelay
from fluxgate.upstream import UpstreamClient
from fluxgate.upstream_body import stream_body, streamable, unstream_body
from fluxgate.upstream_wire import UpstreamResponse
from tests.conftest import OPENAI_KEY
from tests.scripted_upstream import ScriptedUpstream, Step, run


class Sink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ends: list[BaseException | None] = []
        self.flushes = 0
        self.done = asyncio.Event()

    def chunk(self, data: bytes) -> None:
        assert not self.ends, "a chunk after the end"
        self.chunks.append(data)

    def flush(self) -> None:
        self.flushes += 1

    def ended(self, error: BaseException | None) -> None:
        self.ends.append(error)
        self.done.set()


async def get(client: UpstreamClient, url: URL) -> UpstreamResponse:
    return await client.request(
        "GET", url.origin(), url.raw_path_qs, [("Host", url.host or "")], None, 5.0
    )


HEAD_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
HEAD_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "parts", "end"),
    [
        (HEAD_CHUNKED, [b"4\r\naaaa\r\n", b"4\r\nbbbb\r\n", b"4\r\ncccc\r\n"], b"0\r\n\r\n"),
        (HEAD_LENGTH, [b"aaaa", b"bbbb", b"cccc"], b""),
    ],
    ids=["chunked", "content-length"],
)
def test_the_body_reaches_the_sink_in_order_what_was_buffered_first(
    head: bytes, parts: list[bytes], end: bytes
) -> None:
    async def test(client: UpstreamClient) -> None:
        more = asyncio.Event()
        script: list[Step] = [head + parts[0], more, parts[1], parts[2] + end]
        async with ScriptedUpstream(script) as url:
            response = await get(client, url)
            while response.content.total_bytes < 4:  # parsed into aiohttp's buffer
                await asyncio.sleep(0.01)
            assert streamable(response)  # what the relay checks: aiohttp's own reader
            sink = Sink()
            protocol = stream_body(response, sink)
            assert protocol is not None
            assert sink.chunks == [b"aaaa"]  # the buffered chunk, at once
            more.set()
            await sink.done.wait()
            assert b"".join(sink.chunks) == b"aaaabbbbcccc"
            assert sink.ends == [None]
            response.release()

    run(test)


def test_a_body_that_ended_before_it_was_streamed_ends_the_sink_at_once() -> None:
    async def test(client: UpstreamClient) -> None:
        async with ScriptedUpstream([HEAD_LENGTH + b"aaaabbbbcccc"]) as url:
            response = await get(client, url)
            await response.content.wait_eof()
            sink = Sink()
            assert stream_body(response, sink) is None
            assert (sink.chunks, sink.ends) == ([b"aaaabbbbcccc"], [None])

    run(test)


@pytest.mark.parametrize(
    ("first", "rest"),
    [
        (HEAD_LENGTH + b"aaaa", b""),  # the upstream closes after 4 of 12 bytes
        # aiohttp itself tells the body's reader nothing of a chunk that does not
        # parse (fluxgate.upstream); the connection then stays open.
        (HEAD_CHUNKED + b"4\r\naaaa\r\n", b"zz\r\nxx\r\n"),
    ],
    ids=["cut short", "malformed chunk"],
)
def test_a_body_that_fails_ends_the_sink_with_aiohttps_error(first: bytes, rest: bytes) -> None:
    async def test(client: UpstreamClient) -> None:
        more = asyncio.Event()
        async with ScriptedUpstream([first, more, rest]) as url:
            response = await get(client, url)
            sink = Sink()
            assert stream_body(response, sink) is not None
            more.set()
            await sink.done.wait()
            [error] = sink.ends
            assert isinstance(error, aiohttp.ClientPayloadError)
            assert b"".join(sink.chunks) == b"aaaa"
            response.close()

    run(test)


def test_a_released_response_does_not_reach_the_sink_of_the_next_exchange_on_its_connection() -> (
    None
):
    # aiohttp's `release` marks a response's reader closed even after its end;
    # by then its connection may carry the next exchange, streamed to another sink.
    async def test(client: UpstreamClient) -> None:
        first_rest, second_rest = asyncio.Event(), asyncio.Event()
        first: list[Step] = [HEAD_LENGTH, first_rest, b"aaaabbbbcccc"]
        second: list[Step] = [HEAD_LENGTH + b"dddd", second_rest, b"eeeeffff"]
        upstream = ScriptedUpstream(first, second)
        async with upstream as url:
            response1 = await get(client, url)
            sink1 = Sink()
            protocol1 = stream_body(response1, sink1)
            first_rest.set()
            await sink1.done.wait()
            response2 = await get(client, url)
            sink2 = Sink()
            protocol2 = stream_body(response2, sink2)
            assert protocol2 is not None and protocol2 is protocol1  # the pooled connection
            response1.release()
            assert sink2.ends == []
            second_rest.set()
            await sink2.done.wait()
            assert (b"".join(sink2.chunks), sink2.ends) == (b"ddddeeeeffff", [None])
            assert upstream.connections == 1
            response2.release()

    run(test)


@pytest.mark.parametrize(
    ("first", "rest"),
    [
        (HEAD_LENGTH + b"aaaa", b"bbbbcccc"),
        (HEAD_CHUNKED + b"4\r\naaaa\r\n", b"4\r\nbbbb\r\n4\r\ncccc\r\n0\r\n\r\n"),
    ],
    ids=["content-length", "chunked"],
)
def test_a_sink_unbound_before_the_end_hears_nothing_more(first: bytes, rest: bytes) -> None:
    async def test(client: UpstreamClient) -> None:
        more = asyncio.Event()
        async with ScriptedUpstream([first, more, rest]) as url:
            response = await get(client, url)
            while response.content.total_bytes < 4:  # a chunk counted before the sink
                await asyncio.sleep(0.01)
            sink = Sink()
            protocol = stream_body(response, sink)
            assert protocol is not None
            unstream_body(protocol, sink)  # the relay was cancelled
            more.set()
            await response.content.wait_eof()  # the rest went to aiohttp's own buffer
            assert (sink.chunks, sink.ends) == ([b"aaaa"], [])
            assert await response.content.read() == b"bbbbcccc"
            response.release()

    run(test)


def deques() -> int:
    return sum(isinstance(o, collections.deque) for o in gc.get_objects())


def test_a_streamed_body_holds_no_buffers_while_its_sink_takes_the_chunks() -> None:
    # Thousands of open streams each held three empty deques (a 64-slot block each):
    # the reader's buffer and chunk boundaries, the connection's parsed responses.
    async def test(client: UpstreamClient) -> None:
        more = asyncio.Event()
        script: list[Step] = [HEAD_CHUNKED + b"4\r\naaaa\r\n", more, b"4\r\nbbbb\r\n0\r\n\r\n"]
        async with ScriptedUpstream(script) as url:
            response = await get(client, url)
            while response.content.total_bytes < 4:  # a chunk boundary counted already
                await asyncio.sleep(0.01)
            sink = Sink()
            held = deques()
            assert stream_body(response, sink) is not None
            assert deques() == held - 3
            more.set()
            await sink.done.wait()
            assert (b"".join(sink.chunks), sink.ends) == (b"aaaabbbb", [None])
            assert deques() == held  # aiohttp's reader has its own again
            response.release()

    run(test)


def test_a_response_whose_body_streams_keeps_nothing_of_its_head() -> None:
    # It went to the client before the body; a provider's head is often
    # twenty headers, and a stream can last minutes.
    async def test(client: UpstreamClient) -> None:
        more = asyncio.Event()
        head = HEAD_CHUNKED.replace(b"\r\n\r\n", b"\r\nX-Big: " + b"b" * 4000 + b"\r\n\r\n")
        async with ScriptedUpstream([head, more, b"4\r\naaaa\r\n0\r\n\r\n"]) as url:
            response = await get(client, url)
            assert response.headers["X-Big"] == "b" * 4000  # read, and cached by aiohttp
            assert len(response.raw_headers) == 3
            sink = Sink()
            assert stream_body(response, sink) is not None
            assert (len(response.headers), response.raw_headers) == (0, ())
            more.set()
            await sink.done.wait()
            assert (b"".join(sink.chunks), sink.ends) == (b"aaaa", [None])
            response.release()

    run(test)


async def _small_body() -> AsyncIterator[bytes]:
    yield b"{}"


@pytest.mark.parametrize("streamed", [False, True], ids=["whole-body", "streamed-body"])
def test_a_response_keeps_none_of_its_requests_headers(streamed: bool) -> None:
    # They carry the provider key: aiohttp puts the request's headers in the
    # errors it makes from a response, whose repr a log line could print.
    async def test(client: UpstreamClient) -> None:
        headers = [("Host", "127.0.0.1"), ("Authorization", f"Bearer {OPENAI_KEY}")]

        def send(url: URL) -> Awaitable[UpstreamResponse]:
            body = _small_body() if streamed else b"{}"
            return client.request("POST", url.origin(), url.raw_path_qs, headers[:], body, 5.0)

        async with ScriptedUpstream([HEAD_LENGTH + b"aaaabbbbcccc"]) as url:
            response = await send(url)
            assert all(OPENAI_KEY not in repr(kept) for kept in gc.get_referents(response))
            assert await response.content.read() == b"aaaabbbbcccc"
            response.release()
        async with ScriptedUpstream([b"HTTP/1.1 101 Go\r\n\r\n"]) as url:
            with pytest.raises(aiohttp.ClientResponseError) as refused:  # an unsolicited 1xx
                await send(url)
            assert OPENAI_KEY not in repr(refused.value) + str(refused.value)

    run(test)


class ClientRecorder:
    """What the relay writes to the client (a `ClientBody`'s interface)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.paused = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def test_a_burst_of_tiny_chunks_goes_to_the_client_in_one_write_per_upstream_read() -> None:
    # A hostile upstream's thousands of one-byte chunks in one packet must not
    # cost a system call each on the client's side.
    async def test(client: UpstreamClient) -> None:
        burst = b"1\r\nx\r\n" * 2000
        more = asyncio.Event()
        async with ScriptedUpstream([HEAD_CHUNKED, more, burst + b"0\r\n\r\n"]) as url:
            response = await get(client, url)
            out = ClientRecorder()
            loop = asyncio.get_running_loop()
            relay = BodyRelay(out, Exchange(), None, None, loop)  # type: ignore[arg-type]
            running = asyncio.ensure_future(relay.run(response, ClientLink()))
            await asyncio.sleep(0)  # bound to the reader now
            more.set()
            await running
            assert b"".join(out.writes) == b"x" * 2000
            assert len(out.writes) <= 3  # one per read of the upstream's socket
            response.release()

    run(test)
