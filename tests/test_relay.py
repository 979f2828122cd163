"""A response body handed to a sink as aiohttp parses it (fluxgate.upstream_body `stream_body`).

The relay (fluxgate.relay) writes each chunk to the client in the callback
that parsed it. These tests drive `UpstreamClient` against a scripted
upstream on a real socket, in one event loop, and record what the sink is
told: every byte in order (what aiohttp had buffered first), one end, and
nothing that belongs to another exchange on the same pooled connection; and
what an open response keeps of its request.

A read that is one whole chunk, while the parser stands between chunks,
goes to the sink as it arrived: the tests that hand the connection's
protocol reads of their own check that this changes nothing the sink is
told, whatever the reads and wherever the parser stands.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from yarl import URL

from fluxgate.exchange import ClientLink, Exchange
from fluxgate.relay import BodyRelay
from fluxgate.upstream import UpstreamClient
from fluxgate.upstream_body import (
    RelayResponseHandler,
    chunk_size,
    stream_body,
    streamable,
    unstream_body,
)
from fluxgate.upstream_wire import UpstreamResponse
from fluxgate.usage import OPENAI, SseTap
from tests.conftest import OPENAI_KEY
from tests.scripted_upstream import ScriptedUpstream, Step, run


class Sink:
    """Records the body; takes a read as it arrived when offered a whole chunk
    (`takes_whole`), as the relay does; pauses the connection at the first
    chunk if told to (`pause_at`), as the relay does when the client's buffer
    is full."""

    def __init__(self, takes_whole: bool = True) -> None:
        self.chunks: list[bytes] = []
        self.ends: list[BaseException | None] = []
        self.flushes = 0
        self.done = asyncio.Event()
        self.takes_whole = takes_whole
        self.whole: list[bytes] = []  # the reads taken as they arrived
        self.pause_at: RelayResponseHandler | None = None

    def chunk(self, data: bytes) -> None:
        assert not self.ends, "a chunk after the end"
        self.chunks.append(data)
        if self.pause_at is not None:
            self.pause_at.pause_reading()
            self.pause_at = None

    def whole_chunk(self, data: bytes) -> bool:
        size = chunk_size(data)
        if not self.takes_whole or not size:
            return False
        self.whole.append(data)
        self.chunk(data[-size - 2 : -2])
        return True

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
    """What the relay writes to the client (a `ClientBody`'s interface): the
    bodies' bytes, and when `chunked`, the chunks it was given framed."""

    def __init__(self, chunked: bool = False) -> None:
        self.writes: list[bytes] = []
        self.framed: list[bytes] = []
        self.paused = False
        self.chunked = chunked

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def write_framed(self, data: bytes) -> None:
        assert self.chunked
        self.framed.append(data)
        self.writes.append(data[data.index(b"\r\n") + 2 : -2])


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


# Reads handed to the connection's protocol by the test, one call each: so
# where each read begins and ends is exact. The head comes from the socket.

Read = bytes | Callable[[RelayResponseHandler], None]  # a read, or something to do between reads


def feed(reads: list[Read], sink: Sink, pause_at_first_chunk: bool = False) -> None:
    """Stream a chunked body to `sink`, its reads after the head being `reads`."""

    async def test(client: UpstreamClient) -> None:
        hold = asyncio.Event()
        async with ScriptedUpstream([HEAD_CHUNKED, hold]) as url:
            response = await get(client, url)
            protocol = stream_body(response, sink)
            assert isinstance(protocol, RelayResponseHandler)
            if pause_at_first_chunk:
                sink.pause_at = protocol
            for read in reads:
                if isinstance(read, bytes):
                    protocol.data_received(read)
                else:
                    read(protocol)
            response.close()
            hold.set()

    run(test)


def told(reads: list[Read], pause_at_first_chunk: bool = False) -> tuple[Any, Any]:
    """What a sink that takes whole chunks is told of `reads`, and what one that
    has every read parsed is: (chunks, ends, reads taken whole) of each."""
    told = []
    for takes_whole in (True, False):
        sink = Sink(takes_whole)
        feed(reads, sink, pause_at_first_chunk)
        ends = [end if end is None else (type(end), str(end)) for end in sink.ends]
        told.append((sink.chunks, ends, sink.whole))
    return told[0], told[1]


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (b"5\r\nhello\r\n", 5),
        (b"a\r\n0123456789\r\n", 10),
        (b"5\r\nhel\r\n\r\n", 5),  # data that holds a line break
        (b"ffffffff\r\n", 0),  # a size line, no data
        (b"0\r\n\r\n", 0),  # the last chunk
        (b"A\r\n0123456789\r\n", 0),  # upper case
        (b"05\r\nhello\r\n", 0),  # a leading zero
        (b"+5\r\nhello\r\n", 0),
        (b"0x5\r\nhello\r\n", 0),
        (b"5;x=y\r\nhello\r\n", 0),  # an extension
        (b"5 \r\nhello\r\n", 0),  # a space after the size
        (b"5\nhello\n", 0),  # bare line feeds
        (b"5\r\nhello\n\n", 0),
        (b"5\r\nhell\r\n", 0),  # short
        (b"5\r\nhello!\r\n", 0),  # long
        (b"5\r\nhello\r\n1\r\n!\r\n", 0),  # two chunks
        (b"\r\nhello\r\n", 0),
        (b"", 0),
    ],
)
def test_chunk_size_takes_only_one_whole_chunk_framed_as_the_relay_frames_one(
    data: bytes, size: int
) -> None:
    assert chunk_size(data) == size


def test_a_read_that_is_one_whole_chunk_between_chunks_reaches_the_sink_as_it_arrived() -> None:
    reads: list[Read] = [b"5\r\nhello\r\n", b"6\r\n world\r\n", b"1\r\n!\r\n", b"0\r\n\r\n"]
    sink = Sink()
    feed(reads, sink)
    # The first read is parsed: where the parser stood after the head is not known.
    assert sink.whole == [b"6\r\n world\r\n", b"1\r\n!\r\n"]
    assert (b"".join(sink.chunks), sink.ends) == (b"hello world!", [None])


@pytest.mark.parametrize(
    "other",
    [
        [b"1\r\na\r\n1\r\nb\r\n"],
        [b"A\r\n0123456789\r\n"],
        [b"05\r\nabcde\r\n"],
        [b"5;x=y\r\nabcde\r\n"],
        [b"5 \r\nabcde\r\n"],
        [b"5\r\nab", b"cde\r\n"],
        [b"5\r\nabcde", b"\r\n"],
        [b"5", b"\r\nabcde\r\n"],
    ],
    ids=[
        "two chunks", "upper case", "leading zero", "extension", "space",
        "split in the data", "split before the line break", "split in the size line",
    ],
)  # fmt: skip
def test_other_reads_are_parsed_and_the_next_whole_chunk_goes_as_it_arrived(
    other: list[bytes],
) -> None:
    reads: list[Read] = [b"5\r\nhello\r\n", *other, b"3\r\nxyz\r\n", b"0\r\n\r\n"]
    (chunks, ends, whole), parsed = told(reads)
    assert whole == [b"3\r\nxyz\r\n"]
    assert (chunks, ends, []) == parsed
    assert ends == [None]


@pytest.mark.parametrize(
    "reads",
    [
        # A hostile upstream: reads that look like a whole chunk where the parser
        # stands inside one. They are that chunk's bytes, and nothing else.
        [b"5\r\nhello\r\n", b"a\r\n", b"5\r\nhello\r\n", b"\r\n0\r\n\r\n"],
        [b"5\r\nhello\r\n", b"a\r\nab", b"3\r\nabc\r\n", b"\r\n0\r\n\r\n"],
        [b"5\r\nhello\r\n", b"5\r\nabcd\n", b"5\r\nhello\r\n", b"0\r\n\r\n"],
        [b"5\r\nhello\r\n", b"1", b"5\r\nhello\r\n", b"x" * 14 + b"\r\n0\r\n\r\n"],
        [b"5\r\nhello\r\n", b"5\r\nhello\r\n0\r\n"],
    ],
    ids=[
        "after a size line", "inside the data", "before the line break after the data",
        "inside a size line", "after the last chunk's size line",
    ],
)  # fmt: skip
def test_a_read_that_looks_like_a_whole_chunk_is_parsed_where_the_parser_is_not_between_chunks(
    reads: list[Read],
) -> None:
    (chunks, ends, whole), parsed = told(reads)
    assert whole == []  # the first read was parsed too
    assert (chunks, ends, whole) == parsed


def test_a_body_paused_mid_read_keeps_the_order_of_its_chunks() -> None:
    # Paused by the sink in the first chunk: a whole chunk arriving after must
    # not overtake the rest of that read.
    def resume(protocol: RelayResponseHandler) -> None:
        protocol.resume_reading()

    reads: list[Read] = [
        b"5\r\nhello\r\n5\r\nworld\r\n", b"5\r\nagain\r\n", resume, b"1\r\n!\r\n",
        b"1\r\n?\r\n", b"0\r\n\r\n",
    ]  # fmt: skip
    (chunks, ends, _), parsed = told(reads, pause_at_first_chunk=True)
    assert (b"".join(chunks), ends) == (b"helloworldagain!?", [None])
    assert (chunks, ends, []) == parsed


def test_a_body_paused_and_resumed_between_reads_ends_with_its_last_read() -> None:
    # The relay pauses the connection between reads while the client's buffer
    # is full; the read after the resume holds the last chunk and the end.
    def pause(protocol: RelayResponseHandler) -> None:
        protocol.pause_reading()
        assert not protocol.transport.is_reading()  # type: ignore[union-attr]

    def resume(protocol: RelayResponseHandler) -> None:
        protocol.resume_reading()
        assert protocol.transport.is_reading()  # type: ignore[union-attr]

    sink = Sink()
    feed([b"5\r\nhello\r\n", pause, resume, b"5\r\nworld\r\n0\r\n\r\n"], sink)
    assert (sink.chunks, sink.ends) == ([b"hello", b"world"], [None])


def random_body(rng: random.Random) -> bytes:
    """A chunked body in varied framings, some the relay's own."""
    parts = []
    for _ in range(rng.randrange(1, 8)):
        data = bytes(rng.choice(b"ab\r\n") for _ in range(rng.randrange(1, 20)))
        size = rng.choice([b"%x", b"%X", b"0%x", b"%x;e=1"]) % len(data)
        parts.append(size + b"\r\n" + data + b"\r\n")
    return b"".join(parts) + b"0\r\n\r\n"


def test_whatever_the_reads_the_sink_is_told_what_parsing_every_read_tells() -> None:
    rng = random.Random(1729)
    for _ in range(150):
        body = random_body(rng)
        cuts = sorted(rng.sample(range(1, len(body)), rng.randrange(0, min(6, len(body) - 1))))
        reads: list[Read] = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        (chunks, ends, _), parsed = told(reads)
        assert (chunks, ends, []) == parsed, reads
        assert ends == [None], reads


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked client", "other client"])
def test_the_relay_writes_a_whole_chunk_as_it_arrived_to_a_chunked_client_only(
    chunked: bool,
) -> None:
    usage = b'data: {"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    events = [b"data: a\n\n", b"data: b\n\n", usage]
    reads = [b"%x\r\n%b\r\n" % (len(event), event) for event in events]

    async def test(client: UpstreamClient) -> None:
        hold = asyncio.Event()
        async with ScriptedUpstream([HEAD_CHUNKED, hold]) as url:
            response = await get(client, url)
            assert response.connection is not None
            protocol = response.connection.protocol
            assert protocol is not None
            out, ex, tap, beats = ClientRecorder(chunked), Exchange(), SseTap(OPENAI), []
            loop = asyncio.get_running_loop()
            relay = BodyRelay(out, ex, tap, lambda: beats.append(1), loop)  # type: ignore[arg-type]
            running = asyncio.ensure_future(relay.run(response, ClientLink()))
            await asyncio.sleep(0)  # bound to the reader now
            for read in [*reads, b"0\r\n\r\n"]:
                protocol.data_received(read)
            await running
            # The first read is parsed (fluxgate.upstream_body), the rest taken whole.
            assert out.framed == (reads[1:] if chunked else [])
            assert out.writes == events
            assert ex.response_bytes == len(b"".join(events))
            assert len(beats) == 3
            result = tap.result()
            assert result is not None
            assert (result.input_tokens, result.output_tokens) == (3, 4)
            response.release()

    run(test)


class FillingClient(ClientRecorder):
    """A client whose buffer fills at the body's last write, as a slow reader's
    does: its protocol then pauses the relay (`BodyRelay.pause`)."""

    relay: BodyRelay | None = None

    def write(self, data: bytes) -> None:
        super().write(data)
        if data.endswith(b"!") and self.relay is not None:
            self.relay.pause()


def test_a_client_that_fills_up_at_the_end_leaves_the_connection_reading_in_the_pool() -> None:
    # By the body's last write its connection is back in the pool: pausing it
    # then would stall the next exchange on it, which nothing would resume.
    async def test(client: UpstreamClient) -> None:
        more = asyncio.Event()
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        upstream = ScriptedUpstream(
            [HEAD_CHUNKED, more, b"3\r\nend\r\n1\r\n!\r\n0\r\n\r\n"], [answer]
        )
        async with upstream as url:
            response = await get(client, url)
            out = FillingClient()
            relay = out.relay = BodyRelay(out, Exchange(), None, None, asyncio.get_running_loop())  # type: ignore[arg-type]
            running = asyncio.ensure_future(relay.run(response, ClientLink()))
            await asyncio.sleep(0)  # bound to the reader now
            more.set()
            await running
            assert b"".join(out.writes) == b"end!"
            response.release()
            following = await get(client, url)
            assert await following.content.read() == b"ok"
            following.release()
        assert upstream.connections == 1

    run(test)
