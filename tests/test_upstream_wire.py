"""A request Fluxgate writes itself, and its response (fluxgate.upstream_wire).

The head is checked byte for byte; the response against a scripted upstream
on a real socket: interim answers passed over, an unsolicited 101 and an
unparsable head refused, and the connection back in the pool only when the
exchange left it clean.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from yarl import URL

from fluxgate.upstream import UpstreamClient
from fluxgate.upstream_wire import request_head
from tests.scripted_upstream import ScriptedUpstream, Step, run

HEADERS = [("Host", "api.example"), ("Content-Type", "application/json"), ("X-A", "1")]


def test_the_head_is_the_request_line_and_the_headers_in_order() -> None:
    assert request_head("POST", "/v1/chat?x=1", HEADERS) == (
        b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: api.example\r\n"
        b"Content-Type: application/json\r\nX-A: 1\r\n\r\n"
    )


def test_repeated_headers_and_a_bare_query_mark_go_as_given() -> None:
    headers = [("Host", "h"), ("X-Dup", "a"), ("x-dup", "b")]
    assert request_head("GET", "/m?", headers) == (
        b"GET /m? HTTP/1.1\r\nHost: h\r\nX-Dup: a\r\nx-dup: b\r\n\r\n"
    )


def test_a_utf8_value_goes_up_as_the_client_sent_its_bytes() -> None:
    raw = "café ✓".encode()
    head = request_head("GET", "/", [("Host", "h"), ("X-Name", raw.decode())])
    assert b"\r\nX-Name: " + raw + b"\r\n" in head


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/a HTTP/1.1\r\nX-Smuggled: 1", [("Host", "h")]),
        ("/", [("Host", "h"), ("X-A", "1\r\nX-Smuggled: 1")]),
        ("/", [("Host", "h"), ("X-A", "1\nX-Smuggled: 1")]),
        ("/", [("Host", "h"), ("X-A", "1\rX-Smuggled: 1")]),
        ("/", [("Host", "h"), ("X-A\r\nX-Smuggled", "1")]),
    ],
    ids=["target", "crlf-in-value", "lf-in-value", "cr-in-value", "crlf-in-name"],
)
def test_a_line_break_anywhere_in_the_head_is_refused(
    target: str, headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValueError):
        request_head("GET", target, headers)


async def _get(client: UpstreamClient, url: URL) -> tuple[int, bytes]:
    response = await client.request(
        "GET", url.origin(), url.raw_path_qs, [("Host", "h")], None, 5.0
    )
    body = await response.content.read()
    response.release()
    return response.status, body


def test_interim_answers_are_passed_over_to_the_final_response() -> None:
    async def test(client: UpstreamClient) -> None:
        script: list[Step] = [
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ]
        async with ScriptedUpstream(script) as url:
            assert await _get(client, url) == (200, b"ok")

    run(test)


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", b"HTTP/1.1 2000 Nope\r\n\r\n"],
    ids=["unsolicited-101", "unparsable-status"],
)
def test_a_head_that_is_not_a_response_to_relay_fails_as_a_bad_response(answer: bytes) -> None:
    async def test(client: UpstreamClient) -> None:
        async with ScriptedUpstream([answer]) as url:
            with pytest.raises(aiohttp.ClientResponseError):
                await _get(client, url)

    run(test)


def test_a_body_read_to_its_end_leaves_the_connection_for_the_next_request() -> None:
    async def test(client: UpstreamClient) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        upstream = ScriptedUpstream([answer], [answer])
        async with upstream as url:
            assert await _get(client, url) == (200, b"ok")
            assert await _get(client, url) == (200, b"ok")
        assert upstream.connections == 1

    run(test)


def test_a_response_closed_before_its_end_takes_its_connection_with_it() -> None:
    async def test(client: UpstreamClient) -> None:
        rest = asyncio.Event()
        first: list[Step] = [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok", rest, b"ok"]
        second: list[Step] = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        upstream = ScriptedUpstream(first, second)
        async with upstream as url:
            response = await client.request(
                "GET", url.origin(), url.raw_path_qs, [("Host", "h")], None, 5.0
            )
            assert response.connection is not None
            response.release()  # not read to its end: never reused
            with pytest.raises(aiohttp.ClientConnectionError):
                await response.content.read()
            rest.set()
            assert await _get(client, url) == (200, b"ok")
        assert upstream.connections == 2

    run(test)


def test_an_answer_that_came_before_the_whole_body_went_leaves_the_connection_unused() -> None:
    # An early refusal of a large body, the upstream reading no more: the rest of
    # the body still waits to be written, and must not precede the next request.
    async def test(client: UpstreamClient) -> None:
        hold = asyncio.Event()
        refusal = b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n"
        upstream = ScriptedUpstream(
            [refusal, hold], [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]
        )
        async with upstream as url:
            body = b"x" * (32 << 20)  # beyond what the socket buffers take
            headers = [("Host", "h"), ("Content-Length", str(len(body)))]
            response = await client.request(
                "POST", url.origin(), url.raw_path_qs, headers, body, 5.0
            )
            assert response.status == 413
            response.release()
            assert await _get(client, url) == (200, b"")
            assert upstream.connections == 2
            hold.set()

    run(test)


def test_a_worker_keeps_max_idle_connections_per_origin_and_closes_the_rest() -> None:
    # After a burst, the connections given back beyond the bound close at once
    # rather than waiting out the keep-alive timeout; those kept serve the next.
    burst = 5

    async def test(client: UpstreamClient) -> None:
        answered, closed = asyncio.Event(), asyncio.Queue[None]()
        connections: list[asyncio.StreamWriter] = []
        in_flight = 0

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal in_flight
            connections.append(writer)
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    in_flight += 1
                    if in_flight == burst:  # all on connections of their own
                        answered.set()
                    await answered.wait()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                closed.put_nowait(None)
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x")
        try:
            answers = await asyncio.gather(*(_get(client, url) for _ in range(burst)))
            assert answers == [(200, b"ok")] * burst
            for _ in range(burst - 2):
                await closed.get()
            assert [await _get(client, url) for _ in range(2)] == [(200, b"ok")] * 2
            assert (len(connections), closed.qsize()) == (burst, 0)
        finally:
            server.close()

    run(test, max_idle=2)
