"""The hardened HTTP protocol (README "Request handling", steps 1–4), tested the way
uvicorn tests its own.

A `FluxgateProtocol` is built on a uvicorn `Config` with a recording ASGI app
and connected to an in-memory transport; bytes go in through
`data_received`, and the tests read what was written back. Every rejection
must be a complete JSON response, close the connection, and leave the app
unrun.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

import fluxgate.protocol
from fluxgate.client_response import (
    ClientBody,
    client_body,
    send_head,
    take_body,
)
from fluxgate.exchange import EXCHANGE_SCOPE_KEY
from fluxgate.limits import ConnectionGate, ConnectionTable
from fluxgate.protocol import MAX_HEAD_BYTES, FluxgateProtocol

GET = b"GET /openai/v1/models HTTP/1.1\r\nHost: example.com\r\n\r\n"


class MockTransport:
    def __init__(self) -> None:
        self.buffer = b""
        self.writes: list[bytes] = []  # one entry per write or writelines call
        self.closed = asyncio.Event()
        self.read_paused = False
        self.strict = True  # a write after close fails the test (a real one drops it)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        info = {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}
        return info.get(name, default)

    def write(self, data: bytes) -> None:
        assert not (self.strict and self.closed.is_set()), "write after close"
        self.buffer += data
        self.writes.append(data)

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(parts))  # one system call (writev) on a real transport

    def close(self) -> None:
        self.closed.set()

    def is_closing(self) -> bool:
        return self.closed.is_set()

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False

    def set_protocol(self, protocol: Any) -> None:
        pass


class Connection:
    """One protocol instance on a mock transport, driven on its own event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, gate: ConnectionGate | None, app: Any = None
    ) -> None:
        self.loop = loop
        self.app_calls: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.lost = False

        async def answer_204(scope: dict[str, Any], receive: Any, send: Any) -> None:
            self.app_calls.append(scope)
            while True:
                message = await receive()
                self.received.append(message)
                if not message.get("more_body"):
                    break
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        config = Config(app=app or answer_204, http="httptools", ws="none", lifespan="off",
                        log_config=None, server_header=False, date_header=False,
                        access_log=False)  # fmt: skip
        config.load()
        self.protocol = FluxgateProtocol(
            config=config, server_state=ServerState(), app_state={}, _loop=loop, gate=gate
        )
        self.transport = MockTransport()
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]

    def feed(self, *chunks: bytes) -> Connection:
        for chunk in chunks:
            self.protocol.data_received(chunk)
        self.settle()
        return self

    def lose(self) -> None:
        """What the transport does once it has closed: tell the protocol."""
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)
            self.settle()

    def settle(self) -> None:
        """Let any task the protocol started run to its end."""
        for _ in range(5):
            self.loop.run_until_complete(asyncio.sleep(0))

    def wait_closed(self, timeout: float = 5.0) -> None:
        self.loop.run_until_complete(asyncio.wait_for(self.transport.closed.wait(), timeout))

    @property
    def status(self) -> int:
        return int(self.transport.buffer.split(b" ", 2)[1])

    def error(self) -> dict[str, Any]:
        head, _, body = self.transport.buffer.partition(b"\r\n\r\n")
        headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
        assert headers[b"content-type"] == b"application/json"
        assert int(headers[b"content-length"]) == len(body)
        assert headers[b"connection"] == b"close"
        error: dict[str, Any] = json.loads(body)["error"]
        return error

    def assert_rejected(self, status: int) -> dict[str, Any]:
        """A complete JSON error with `status`, the connection closed, the app never run."""
        assert self.transport.buffer.startswith(b"HTTP/1.1 %d " % status), self.transport.buffer
        assert self.transport.is_closing()
        assert self.app_calls == []
        error = self.error()
        assert error["type"] and error["message"]
        return error


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def conn(loop: asyncio.AbstractEventLoop) -> Iterator[Connection]:
    connection = Connection(loop, gate=None)
    yield connection
    connection.lose()


def test_what_the_protocol_adds_to_a_connection_stays_out_of_its_instance_dict(
    loop: asyncio.AbstractEventLoop, conn: Connection
) -> None:
    """Every open connection has one: uvicorn's attributes alone keep it a compact
    (split) dict, about 1.3 KiB smaller per connection than with ours added."""
    plain = HttpToolsProtocol(
        config=conn.protocol.config, server_state=ServerState(), app_state={}, _loop=loop
    )
    plain.connection_made(MockTransport())  # type: ignore[arg-type]
    plain.data_received(GET)
    conn.feed(GET)
    assert set(conn.protocol.__dict__) == set(plain.__dict__)
    plain.connection_lost(None)


# The baseline: a well-formed request reaches the app


def test_valid_request_reaches_the_app(conn: Connection) -> None:
    conn.feed(GET)
    assert conn.transport.buffer.startswith(b"HTTP/1.1 204 ")
    assert not conn.transport.is_closing()
    [scope] = conn.app_calls
    ex = scope[EXCHANGE_SCOPE_KEY]
    assert (ex.method, ex.target, ex.request_length, ex.has_body) == (
        "GET", b"/openai/v1/models", None, False
    )  # fmt: skip
    assert ex.connection_tokens is None


@pytest.mark.parametrize(
    ("head", "length", "has_body", "tokens"),
    [
        (b"Content-Length: 5\r\n", 5, True, None),
        (b"Content-Length: 0\r\n", 0, False, None),
        (b"Transfer-Encoding: chunked\r\n", None, True, None),
        (
            b"Connection: keep-alive, X-Foo\r\nConnection: x-bar\r\nContent-Length: 0\r\n",
            0,
            False,
            frozenset({b"keep-alive", b"x-foo", b"x-bar"}),
        ),
    ],
)
def test_one_scan_of_the_head_gives_the_exchange_what_later_steps_need(
    conn: Connection,
    head: bytes,
    length: int | None,
    has_body: bool,
    tokens: frozenset[bytes] | None,
) -> None:
    body = b"hello" if length == 5 else b"5\r\nhello\r\n0\r\n\r\n" if length is None else b""
    conn.feed(b"POST /openai/v1/x HTTP/1.1\r\nHost: h\r\n" + head + b"\r\n" + body)
    [scope] = conn.app_calls
    ex = scope[EXCHANGE_SCOPE_KEY]
    assert (ex.method, ex.request_length, ex.has_body) == ("POST", length, has_body)
    assert ex.connection_tokens == tokens


def body_arrived_at_start(loop: asyncio.AbstractEventLoop, *reads: bytes) -> bool:
    """What `Exchange.body_arrived` said when the app began, for a request fed as `reads`
    (the app starts between reads)."""
    seen: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope[EXCHANGE_SCOPE_KEY].body_arrived)
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    conn = Connection(loop, gate=None, app=app)
    for data in reads:
        conn.feed(data)
    conn.lose()
    assert len(seen) == 1 and b"HTTP/1.1 204 " in conn.transport.buffer
    return seen[0]


def test_a_body_that_came_with_its_head_is_whole_when_the_app_starts(
    loop: asyncio.AbstractEventLoop,
) -> None:
    head = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n"
    assert body_arrived_at_start(loop, head + b"hello")


def test_a_body_still_to_come_when_the_app_starts_is_not_whole(
    loop: asyncio.AbstractEventLoop,
) -> None:
    head = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n"
    assert not body_arrived_at_start(loop, head + b"he", b"llo")


def test_a_body_sent_with_expect_100_continue_is_never_taken_whole(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Its first `receive` writes the 100 Continue: it stays on the streamed path,
    where that happens only once the upstream has the request head."""
    head = b"POST /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    assert not body_arrived_at_start(loop, head + b"hello")


def test_head_and_body_sent_back_to_back_go_out_in_one_write(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"ok"})

    conn = Connection(loop, gate=None, app=app).feed(GET)
    [write] = conn.transport.writes
    assert write.startswith(b"HTTP/1.1 200 ") and write.endswith(b"\r\n\r\nok")


def test_head_whose_body_is_not_ready_is_written_within_the_loop_turn(
    loop: asyncio.AbstractEventLoop,
) -> None:
    body_ready = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        await body_ready.wait()  # an SSE stream whose first event is not there yet
        await send({"type": "http.response.body", "body": b"data: 1\n\n"})

    conn = Connection(loop, gate=None, app=app).feed(GET)
    [head] = conn.transport.writes
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    body_ready.set()
    conn.settle()
    assert conn.transport.writes[1:] == [b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"]


def test_app_sees_a_copy_of_the_headers_that_trailers_do_not_extend(conn: Connection) -> None:
    conn.feed(
        b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\na\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    assert conn.transport.buffer.startswith(b"HTTP/1.1 204 ")
    [scope] = conn.app_calls
    assert [name for name, _ in scope["headers"]] == [b"host", b"transfer-encoding"]


# §4.1 HTTP version


def test_http_1_0_is_505(conn: Connection) -> None:
    conn.feed(b"GET / HTTP/1.0\r\nHost: example.com\r\n\r\n").assert_rejected(505)


def test_http_0_9_request_line_is_505(conn: Connection) -> None:
    conn.feed(b"GET /\r\n\r\n").assert_rejected(505)


def test_http_2_0_request_line_is_505(conn: Connection) -> None:
    conn.feed(b"GET / HTTP/2.0\r\nHost: example.com\r\n\r\n").assert_rejected(505)


# §4.2 CONNECT and Upgrade


def test_connect_is_501(conn: Connection) -> None:
    conn.feed(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    conn.assert_rejected(501)


def test_websocket_upgrade_is_501(conn: Connection) -> None:
    conn.feed(
        b"GET /openai HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).assert_rejected(501)


def test_h2c_upgrade_is_501(conn: Connection) -> None:
    conn.feed(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    ).assert_rejected(501)


def test_upgrade_header_without_connection_upgrade_is_501(conn: Connection) -> None:
    conn.feed(b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n").assert_rejected(501)


def test_upgrade_request_with_a_body_is_501_and_nothing_is_read_on(conn: Connection) -> None:
    conn.feed(
        b"POST / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 4\r\n\r\nbody" + GET
    ).assert_rejected(501)


# §4.3 Malformed requests and smuggling


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n0\r\n\r\n",
            id="content-length-and-transfer-encoding",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
            id="duplicate-content-length",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            id="conflicting-content-length",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 2\r\n\r\nab",
            id="content-length-list",
        ),
        pytest.param(b"GET / HTTP/1.1\nHost: h\n\n", id="bare-lf"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\nX-B: 2\r\n\r\n", id="bare-lf-in-head"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n 2\r\n\r\n", id="obs-fold"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="missing-host"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", id="two-hosts"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", id="two-identical-hosts"),
        pytest.param(b"GET http://h/openai HTTP/1.1\r\nHost: h\r\n\r\n", id="absolute-form"),
        pytest.param(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", id="asterisk-form"),
    ],
)
def test_malformed_or_smuggling_request_is_400(conn: Connection, request_bytes: bytes) -> None:
    conn.feed(request_bytes).assert_rejected(400)


def test_rejection_is_logged_at_warning(conn: Connection, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fluxgate"):
        conn.feed(b"GET / HTTP/1.1\r\n\r\n")
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage() == "request rejected"
    assert record.fields["status"] == 400  # type: ignore[attr-defined]


def test_bad_chunk_size_is_400_and_closes(conn: Connection) -> None:
    # The head is fine, so the app has started and waits for the body; the body
    # is not: the client gets 400 and the app sees the connection go away.
    conn.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert len(conn.app_calls) == 1
    conn.feed(b"zz\r\n")
    assert conn.transport.buffer.startswith(b"HTTP/1.1 400 ")
    assert conn.transport.is_closing()
    conn.lose()
    assert conn.received[-1]["type"] == "http.disconnect"


def test_bad_pipelined_request_does_not_take_the_place_of_the_earlier_response(
    conn: Connection,
) -> None:
    # Answering 400 at once would be read by the client as the response to the
    # first request, which the app is still serving: finish it, then close.
    conn.feed(GET + b"GET / HTTP/1.1\r\n\r\n")
    assert conn.transport.buffer.startswith(b"HTTP/1.1 204 ")
    assert b"connection: close" in conn.transport.buffer.lower()
    assert b" 400 " not in conn.transport.buffer
    assert conn.transport.is_closing()
    assert len(conn.app_calls) == 1


def test_data_after_a_rejection_is_ignored(conn: Connection) -> None:
    conn.feed(b"GET / HTTP/1.1\r\n\r\n")
    written = conn.transport.buffer
    conn.feed(GET)
    assert conn.transport.buffer == written
    assert conn.app_calls == []


# Head size


def test_100kb_header_is_431(conn: Connection) -> None:
    conn.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    conn.assert_rejected(431)


def test_header_trickled_over_many_reads_is_431_once_over_the_cap(conn: Connection) -> None:
    conn.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: ")
    piece = b"a" * 1000
    for _ in range(MAX_HEAD_BYTES // len(piece) + 2):
        conn.feed(piece)
        if conn.transport.is_closing():
            break
    conn.assert_rejected(431)


def test_many_small_headers_over_the_cap_are_431(conn: Connection) -> None:
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(1000))
    conn.feed(b"GET / HTTP/1.1\r\nHost: h\r\n" + headers + b"\r\n").assert_rejected(431)


def test_oversized_request_line_is_431(conn: Connection) -> None:
    conn.feed(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: h\r\n\r\n").assert_rejected(431)


def test_head_just_under_the_cap_is_served(conn: Connection) -> None:
    value = b"a" * (MAX_HEAD_BYTES - 1024)
    conn.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + value + b"\r\n\r\n")
    assert conn.transport.buffer.startswith(b"HTTP/1.1 204 ")


def test_large_body_is_not_counted_as_head(conn: Connection) -> None:
    body = b"x" * (2 * MAX_HEAD_BYTES)
    conn.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body), body)
    assert conn.transport.buffer.startswith(b"HTTP/1.1 204 ")


# Head deadline


@pytest.fixture
def short_head_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fluxgate.protocol, "HEAD_TIMEOUT", 0.05)


@pytest.mark.usefixtures("short_head_timeout")
def test_incomplete_head_is_408_when_the_timer_fires(loop: asyncio.AbstractEventLoop) -> None:
    conn = Connection(loop, gate=None)
    conn.feed(b"GET / HTTP/1.1\r\nHost: h\r\n")
    conn.wait_closed()
    conn.assert_rejected(408)


@pytest.mark.usefixtures("short_head_timeout")
def test_connection_that_sends_nothing_is_408(loop: asyncio.AbstractEventLoop) -> None:
    conn = Connection(loop, gate=None)
    conn.wait_closed()
    conn.assert_rejected(408)


@pytest.mark.usefixtures("short_head_timeout")
def test_byte_trickling_does_not_reset_the_head_deadline(loop: asyncio.AbstractEventLoop) -> None:
    conn = Connection(loop, gate=None)
    conn.feed(b"GET / HTTP/1.1\r\n")

    async def trickle() -> None:
        while not conn.transport.is_closing():
            conn.protocol.data_received(b"X")
            await asyncio.sleep(0.005)

    loop.run_until_complete(asyncio.wait_for(trickle(), 5))
    conn.assert_rejected(408)


@pytest.mark.usefixtures("short_head_timeout")
def test_complete_head_cancels_the_deadline(loop: asyncio.AbstractEventLoop) -> None:
    conn = Connection(loop, gate=None)
    conn.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n")
    loop.run_until_complete(asyncio.sleep(0.2))  # well past the (patched) head timeout
    assert not conn.transport.is_closing()
    conn.feed(b"body")
    assert conn.transport.buffer.startswith(b"HTTP/1.1 204 ")


# §4.4 Connection limit


def connection_table() -> ConnectionTable:
    """Two worker slots, set up as the master does before forking each worker."""
    table = ConnectionTable(size=2)
    table.reset_slot(0)
    table.reset_slot(1)
    return table


def test_connection_over_the_limit_gets_503(loop: asyncio.AbstractEventLoop) -> None:
    table = connection_table()
    assert ConnectionGate(table, slot=0, limit=1).acquire()  # one connection already admitted
    conn = Connection(loop, gate=ConnectionGate(table, slot=1, limit=1))
    conn.feed(GET).assert_rejected(503)
    conn.lose()
    assert table.total() == 1  # a refused connection never held a slot


def test_admitted_connection_holds_a_slot_until_it_is_lost(loop: asyncio.AbstractEventLoop) -> None:
    table = connection_table()
    conn = Connection(loop, gate=ConnectionGate(table, slot=0, limit=1))
    conn.feed(GET)
    assert conn.transport.buffer.startswith(b"HTTP/1.1 204 ")
    assert table.total() == 1
    conn.lose()
    assert table.total() == 0
    Connection(loop, gate=ConnectionGate(table, slot=1, limit=1)).feed(GET)
    assert table.total() == 1


@pytest.mark.usefixtures("short_head_timeout")
def test_incomplete_second_head_on_a_keep_alive_connection_is_408(
    loop: asyncio.AbstractEventLoop,
) -> None:
    conn = Connection(loop, gate=None)
    conn.feed(GET)
    assert conn.transport.buffer.startswith(b"HTTP/1.1 204 ")
    answered = len(conn.transport.buffer)
    conn.feed(b"GET / HTTP/1.1\r\nHost: h\r\n")
    conn.wait_closed()
    assert conn.transport.buffer[answered:].startswith(b"HTTP/1.1 408 ")


# Methods no LLM API uses


@pytest.mark.parametrize("method", [b"TRACE", b"PROPFIND", b"MOVE", b"PURGE", b"LINK"])
def test_method_outside_the_forwarded_set_is_405_with_allow(
    conn: Connection, method: bytes
) -> None:
    # TRACE would travel with the provider key; an upstream that reflects it
    # would hand the key to the client.
    conn.feed(method + b" /openai/v1/models HTTP/1.1\r\nHost: h\r\n\r\n").assert_rejected(405)
    head = conn.transport.buffer.partition(b"\r\n\r\n")[0]
    assert b"\r\nallow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS" in head


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE",
                                    b"OPTIONS"])  # fmt: skip
def test_methods_an_api_may_use_reach_the_app(conn: Connection, method: bytes) -> None:
    conn.feed(method + b" /openai/v1/x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert conn.transport.buffer.startswith(b"HTTP/1.1 204 ")
    assert len(conn.app_calls) == 1


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"GET / HTTP/1.0\r\nHost: h\r\n\r\n", 505, id="http-1.0"),
        pytest.param(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 501, id="connect"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\n\r\n", 501, id="upgrade"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
            id="foreign-coding",
        ),
        pytest.param(b"TRACE / HTTP/1.1\r\nHost: h\r\n\r\n", 405, id="trace"),
    ],
)
def test_every_refusal_is_logged_at_warning_without_header_values(
    conn: Connection, caplog: pytest.LogCaptureFixture, request_bytes: bytes, status: int
) -> None:
    with caplog.at_level(logging.WARNING, logger="fluxgate"):
        conn.feed(request_bytes)
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage() == "request rejected"
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["status"] == status
    assert fields["client_ip"] == "127.0.0.1" and fields["reason"]
    assert not {"h2c", "gzip", "h:443"} & set(str(fields).split("'"))


# Answers that must not leave bytes behind, nor land in the middle of a response


def test_early_answer_to_expect_100_continue_closes_the_connection(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # The client waits for 100 Continue before sending its body; the 401 came
    # first, so the body may never come. Kept open, the connection would read
    # the client's next request as that body.
    async def unauthorized(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-length", b"2")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"no"})

    conn = Connection(loop, gate=None, app=unauthorized)
    conn.feed(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 60\r\n\r\n")
    head = conn.transport.buffer.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 401 ")
    assert b"\r\nconnection: close" in head.lower()
    assert b"100 Continue" not in conn.transport.buffer
    assert conn.transport.is_closing()


def test_expect_100_continue_with_the_body_read_keeps_the_connection(conn: Connection) -> None:
    conn.feed(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    assert conn.transport.buffer == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.feed(b"body")
    assert b"HTTP/1.1 204 " in conn.transport.buffer
    assert not conn.transport.is_closing()
    conn.feed(GET)
    assert conn.transport.buffer.count(b"HTTP/1.1 204 ") == 2


def test_bad_chunk_while_the_response_streams_cuts_the_connection(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # An error response written now would land inside the 200's body.
    async def streams_back(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass

    conn = Connection(loop, gate=None, app=streams_back)
    conn.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\na\r\n")
    assert conn.transport.buffer.startswith(b"HTTP/1.1 200 ")
    written = conn.transport.buffer
    conn.feed(b"zz\r\n")
    assert conn.transport.buffer == written
    assert conn.transport.is_closing()
    conn.lose()  # the app hears the disconnect and ends (not left pending for the GC)


def test_bad_chunk_after_an_early_complete_answer_writes_nothing_more(conn: Connection) -> None:
    # The 204 is complete; the rest of the body is being dropped. A 400 now
    # would be read as the answer to the client's next request.
    async def answers_at_once(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    conn = Connection(conn.loop, gate=None, app=answers_at_once)
    conn.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    written = conn.transport.buffer
    assert written.startswith(b"HTTP/1.1 204 ")
    conn.feed(b"zz\r\n")
    assert conn.transport.buffer == written
    assert conn.transport.is_closing()


# A relayed body written straight to the transport (fluxgate.relay's path)

CHUNKS = (b"data: 1\n\n", b"", b"data: 22\n\n")


def relaying_app(headers: list[tuple[bytes, bytes]], direct: bool) -> Any:
    """Sends `CHUNKS` between a head and an end sent through `send`: each
    through `send` too, or through the `ClientBody` the relay uses."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        body = client_body(send) if direct else None
        for chunk in CHUNKS:
            if direct and chunk:
                assert body is not None
                body.write(chunk)
            elif not direct:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


@pytest.mark.parametrize(
    ("request_head", "headers"),
    [
        (GET, []),  # no length: chunked
        (GET, [(b"transfer-encoding", b"chunked")]),
        (GET, [(b"content-length", b"19")]),
        (b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n", [(b"content-length", b"19")]),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            [],
        ),
    ],
    ids=["chunked by uvicorn", "chunked upstream", "content-length", "HEAD", "expect 100"],
)
def test_a_relayed_body_goes_out_byte_for_byte_as_sends_would_write_it(
    loop: asyncio.AbstractEventLoop, request_head: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    wire = []
    for direct in (False, True):
        conn = Connection(loop, gate=None, app=relaying_app(headers, direct)).feed(request_head)
        wire.append(conn.transport.buffer)
        assert not conn.transport.is_closing()  # complete: the connection is kept
        conn.lose()
    assert wire[0] == wire[1]
    assert wire[0].startswith(b"HTTP/1.1 200 ")


# A request body that arrived whole, taken from the cycle (fluxgate.forward's path)

POST_HELLO = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n"


@pytest.mark.parametrize("take", [False, True], ids=["receive", "take_body"])
def test_a_whole_body_is_taken_as_receive_gives_it(
    loop: asyncio.AbstractEventLoop, take: bool
) -> None:
    bodies: list[bytes | None] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = take_body(receive) if take else (await receive())["body"]
        bodies.append(body)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    conn = Connection(loop, gate=None, app=app).feed(POST_HELLO + b"hello")
    assert bodies == [b"hello"]
    assert conn.transport.buffer.startswith(b"HTTP/1.1 204 ")
    assert not conn.transport.is_closing()


@pytest.mark.parametrize(
    ("request_head", "rest"),
    [
        (POST_HELLO + b"he", b"llo"),
        (POST_HELLO.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"), b"hello"),
    ],
    ids=["body still to come", "100 Continue owed"],
)
def test_a_body_receive_must_answer_for_is_left_to_it(
    loop: asyncio.AbstractEventLoop, request_head: bytes, rest: bytes
) -> None:
    taken: list[bytes | None] = []
    received: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        taken.append(take_body(receive))
        message = await receive()
        while True:
            received.append(message["body"])
            if not message["more_body"]:
                break
            message = await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    conn = Connection(loop, gate=None, app=app).feed(request_head)
    conn.feed(rest)
    assert taken == [None]
    assert b"".join(received) == b"hello"


# The relayed response's head written straight to the transport (fluxgate.forward's path)


def head_app(
    status: int, headers: list[tuple[bytes, bytes]], direct: bool, taken: list[bool]
) -> Any:
    """Answers with `status`, `headers` and a body: the head by `send_head`, the
    body and the end by the `ClientBody` it returns when `direct` (whether each
    did it in `taken`), else all through `send`."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b"" if status in (204, 304) else b"hello"
        if direct:
            client = send_head(send, status, headers)
            taken.append(client is not None)
            assert client is not None
            if body:
                client.write(body)
            taken.append(client.end())
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


HEAD = b"HEAD /openai/v1/models HTTP/1.1\r\nHost: example.com\r\n\r\n"
LENGTH_5 = (b"content-length", b"5")


@pytest.mark.parametrize(
    ("request_head", "status", "headers"),
    [
        (GET, 200, [(b"content-type", b"application/json"), LENGTH_5]),
        (GET, 200, [(b"content-type", b"text/event-stream")]),
        (HEAD, 200, [LENGTH_5]),
        (HEAD, 200, []),
        (GET, 204, []),
        (GET, 304, [(b"etag", b'"v1"')]),
        (GET, 429, [(b"retry-after", b"7"), (b"x-note", b"tab\there"), LENGTH_5]),
        (GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), 200, [LENGTH_5]),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            200,
            [LENGTH_5],
        ),
    ],
    ids=["length", "chunked by uvicorn", "HEAD with length", "HEAD without", "204", "304",
         "429 with a tab in a value", "client asked to close", "answered before 100 Continue"],
)  # fmt: skip
def test_a_relayed_head_goes_out_byte_for_byte_as_send_would_write_it(
    loop: asyncio.AbstractEventLoop,
    request_head: bytes,
    status: int,
    headers: list[tuple[bytes, bytes]],
) -> None:
    wire, closing, taken = [], [], []
    for direct in (False, True):
        conn = Connection(loop, gate=None, app=head_app(status, headers, direct, taken))
        conn.feed(request_head)
        wire.append(conn.transport.buffer)
        closing.append(conn.transport.is_closing())
        conn.lose()
    assert taken == [True, True]
    assert wire[0] == wire[1]
    assert closing[0] == closing[1]


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (200, [(b"x-a", b"1\r\nx-smuggled: 1")]),
        (200, [(b"x-a", b"1\nx-b: 2")]),
        (200, [(b"x-a", b"1\rx-b: 2")]),
        (200, [(b"x-a", b"nul\x00")]),
        (200, [(b"x a", b"1")]),
        (200, [(b"x:a", b"1")]),
        (200, [(b"content-length", b"five")]),
        (200, [(b"transfer-encoding", b"chunked")]),
        (200, [(b"connection", b"close")]),
        (999, []),
    ],
    ids=["crlf in a value", "lf in a value", "cr in a value", "nul in a value",
         "space in a name", "colon in a name", "length not a number",
         "transfer-encoding", "connection", "unknown status"],
)  # fmt: skip
def test_a_head_send_would_refuse_or_decide_on_is_left_to_send(
    loop: asyncio.AbstractEventLoop, status: int, headers: list[tuple[bytes, bytes]]
) -> None:
    untouched: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        cycle = send.__self__
        before = (cycle.keep_alive, cycle.chunked_encoding, cycle.expected_content_length)
        declined = send_head(send, status, headers) is None
        after = (cycle.keep_alive, cycle.chunked_encoding, cycle.expected_content_length)
        untouched.append(declined and not cycle.response_started and before == after)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    conn = Connection(loop, gate=None, app=app).feed(GET)
    assert untouched == [True]
    assert conn.transport.buffer.startswith(b"HTTP/1.1 204 ")


def test_a_response_ended_without_send_leaves_the_connection_to_the_next_request(
    loop: asyncio.AbstractEventLoop,
) -> None:
    taken: list[bool] = []
    # Pipelined: the second waits for the first to complete.
    conn = Connection(loop, gate=None, app=head_app(200, [LENGTH_5], True, taken)).feed(GET + GET)
    assert conn.protocol.timeout_keep_alive_task is not None  # idle again: its timer armed
    assert taken == [True, True, True, True]
    assert conn.transport.buffer.count(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello") == 2
    assert not conn.transport.is_closing()


@pytest.mark.parametrize("ended", [False, True], ids=["short of its length", "already complete"])
def test_an_end_send_would_refuse_is_left_to_send(
    loop: asyncio.AbstractEventLoop, ended: bool
) -> None:
    ends: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [LENGTH_5]})
        client = client_body(send)
        assert client is not None
        client.write(b"hel")
        if ended:
            client.write(b"lo")
            await send({"type": "http.response.body", "body": b""})
        ends.append(client.end())  # refused: nothing changes
        if not ended:
            client.write(b"lo")
            ends.append(client.end())

    conn = Connection(loop, gate=None, app=app).feed(GET)
    assert ends == ([False] if ended else [False, True])
    assert conn.transport.buffer.endswith(b"\r\n\r\nhello")
    assert conn.transport.buffer.count(b"HTTP/1.1 200 ") == 1
    assert not conn.transport.is_closing()


def test_a_relayed_body_writes_nothing_once_the_client_is_gone(
    loop: asyncio.AbstractEventLoop,
) -> None:
    bodies: list[ClientBody] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        body = client_body(send)
        assert body is not None
        body.write(b"first")
        bodies.append(body)

    conn = Connection(loop, gate=None, app=app).feed(GET)
    written = conn.transport.buffer
    assert written.endswith(b"5\r\nfirst\r\n")
    conn.transport.close()
    conn.lose()
    bodies[0].write(b"late")  # MockTransport asserts on a write after close
    assert conn.transport.buffer == written


def test_a_relayed_body_with_a_length_ends_cleanly_when_the_client_hangs_up_mid_way(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # The transport is closing (the client's FIN) before the protocol hears of
    # it: the end of the response must not find the body short of its length.
    errors: list[BaseException] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"10")]})  # fmt: skip
            body = client_body(send)
            assert body is not None
            body.write(b"12345")
            conn.transport.close()
            body.write(b"67890")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except BaseException as exc:
            errors.append(exc)
            raise

    conn = Connection(loop, gate=None, app=app)
    conn.transport.strict = False  # uvicorn's own end writes b"" to a closing transport
    conn.feed(GET)
    conn.lose()
    assert errors == []
    assert conn.transport.buffer.endswith(b"\r\n\r\n12345")


class FlowRecorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


def test_a_response_sent_while_the_client_buffer_is_full_waits_for_it_to_drain(
    loop: asyncio.AbstractEventLoop,
) -> None:
    sent: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        sent.append("head")
        await send({"type": "http.response.body", "body": b"done", "more_body": False})
        sent.append("body")

    conn = Connection(loop, gate=None, app=app)
    conn.protocol.pause_writing()  # what the transport calls over its high-water mark
    conn.feed(GET)
    assert (sent, conn.transport.buffer) == ([], b"")
    conn.protocol.resume_writing()
    conn.settle()
    assert sent == ["head", "body"]
    assert conn.transport.buffer.endswith(b"4\r\ndone\r\n0\r\n\r\n")
    conn.lose()


def test_a_connection_whose_writes_never_wait_holds_no_event_of_its_own(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # uvicorn's flow control made one per connection, with a 64-slot deque in it.
    conn = Connection(loop, gate=None).feed(GET)
    assert conn.transport.buffer.startswith(b"HTTP/1.1 204 ")
    held = gc.get_referents(conn.protocol.flow)  # what its attributes hold
    assert not [o for o in held if isinstance(o, asyncio.Event)]
    conn.lose()


def test_a_full_client_buffer_pauses_the_running_relay_and_a_drained_one_resumes_it(
    loop: asyncio.AbstractEventLoop,
) -> None:
    paused: list[bool] = []
    later = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        body = client_body(send)
        assert body is not None
        paused.append(body.paused)
        await later.wait()
        paused.append(body.paused)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    conn = Connection(loop, gate=None, app=app).feed(GET)
    flow = FlowRecorder()
    conn.protocol.link.flow = flow
    conn.protocol.pause_writing()  # what the transport calls over its high-water mark
    later.set()
    conn.settle()
    assert (paused, flow.calls) == ([False, True], ["pause"])
    conn.protocol.resume_writing()
    assert flow.calls == ["pause", "resume"]
    conn.protocol.link.flow = None  # the relay has ended
    conn.protocol.pause_writing()
    assert flow.calls == ["pause", "resume"]
    conn.protocol.resume_writing()
    conn.settle()
    assert conn.transport.buffer.endswith(b"0\r\n\r\n")
    conn.lose()
