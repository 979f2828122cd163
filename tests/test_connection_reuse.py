"""Connections are reused only when nothing is left on them (docs/security.md).

A keep-alive connection to the upstream is shared by every client of the
worker. If the upstream sent anything while the connection sat in the pool
(a stray response, or the answer to a request smuggled in a GET's body that
the upstream did not read as a body), aiohttp would queue it as the next
response and hand it to the next client on that connection, shifting every
later exchange by one. Each test runs one worker, so the next request is
sure to meet the pooled connection.

On the client side, the same holds for a client connection answered before
its request body was read.
"""

from __future__ import annotations

import json

from demo.fake_responses import STRAY_BODY
from demo.fake_upstream import FakeUpstreamThread
from tests import rawhttp
from tests.conftest import CLIENT_KEY
from tests.supervisor_process import Supervisor


def headers(proxy: Supervisor, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [rawhttp.host(proxy.port), rawhttp.bearer(CLIENT_KEY), *extra]


def assert_own_echo(resp: rawhttp.Response, target: str) -> None:
    """The response is the upstream's echo of exactly this request."""
    assert resp.status == 200, resp.body
    assert resp.body != STRAY_BODY, "got the stray response of another exchange"
    assert json.loads(resp.body)["target"] == target


def test_response_sent_while_the_connection_was_idle_reaches_no_client(
    proxy: Supervisor, upstream: FakeUpstreamThread
) -> None:
    first = rawhttp.request(proxy.port, "GET", "/openai/stray", headers(proxy))
    assert json.loads(first.body) == {"answer": "the one asked for"}
    upstream.wait_for_replies(1)  # the stray response is on the pooled connection now

    # Another client, then the same one again: each gets its own answer.
    with rawhttp.Conn(proxy.port) as conn:
        assert_own_echo(conn.request("GET", "/openai/echo/b", headers(proxy)), "/echo/b")
        assert_own_echo(conn.request("GET", "/openai/echo/c", headers(proxy)), "/echo/c")
    assert_own_echo(rawhttp.request(proxy.port, "GET", "/openai/echo/d", headers(proxy)), "/echo/d")


def test_request_smuggled_in_a_get_body_does_not_answer_the_next_client(
    proxy: Supervisor, upstream: FakeUpstreamThread
) -> None:
    smuggled = f"GET /echo/smuggled HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n\r\n".encode()
    first = rawhttp.request(
        proxy.port,
        "GET",
        "/openai/ignores-body",
        headers(proxy, ("Content-Length", str(len(smuggled)))),
        smuggled,
    )
    assert json.loads(first.body) == {"answer": "body ignored"}
    # A GET with a body is never pooled: the upstream could read its body as
    # a request whose answer would come later on the same connection.
    upstream.wait_for_disconnect("/ignores-body")

    assert_own_echo(rawhttp.request(proxy.port, "GET", "/openai/echo/b", headers(proxy)), "/echo/b")
    assert_own_echo(rawhttp.request(proxy.port, "GET", "/openai/echo/c", headers(proxy)), "/echo/c")


def test_a_clean_keep_alive_connection_is_still_reused(
    proxy: Supervisor, upstream: FakeUpstreamThread
) -> None:
    for target in ("/echo/1", "/echo/2", "/echo/3"):
        assert_own_echo(
            rawhttp.request(proxy.port, "GET", "/openai" + target, headers(proxy)), target
        )
    assert len({r.connection_id for r in upstream.requests}) == 1


def test_connection_with_part_of_a_stray_response_is_not_reused(
    proxy: Supervisor, upstream: FakeUpstreamThread
) -> None:
    # A whole stray message is queued where aiohttp's own checks see it; the
    # first bytes of one sit in the parser, which the next exchange replaces.
    rawhttp.request(proxy.port, "GET", "/openai/stray?partial", headers(proxy))
    upstream.wait_for_replies(1)

    assert_own_echo(rawhttp.request(proxy.port, "GET", "/openai/echo/b", headers(proxy)), "/echo/b")
    first, second = upstream.requests
    assert second.connection_id != first.connection_id


def test_early_401_to_expect_100_continue_closes_the_client_connection(
    proxy: Supervisor, upstream: FakeUpstreamThread
) -> None:
    # The client waits for 100 Continue before sending its body and gets the 401
    # instead, so it never sends the body: the next request it would send on
    # this connection must not be read as that body (it would be swallowed).
    with rawhttp.Conn(proxy.port) as conn:
        conn.send(
            rawhttp.build_request(
                "POST",
                "/openai/echo",
                [rawhttp.host(proxy.port), ("Expect", "100-continue"), ("Content-Length", "64")],
            )
        )
        resp = conn.read_response()
        assert resp.status == 401
        assert resp.header("connection") == b"close"
        assert conn.at_eof()
    assert upstream.requests == []


def test_request_smuggled_in_a_get_body_and_answered_late_does_not_answer_the_next_client(
    proxy: Supervisor, upstream: FakeUpstreamThread
) -> None:
    # Nothing arrives while the connection is idle: the smuggled request's
    # answer is still being made when the next client's request goes up.
    smuggled = b"GET /slow-headers?delay_ms=300 HTTP/1.1\r\nHost: h\r\n\r\n"
    first = rawhttp.request(
        proxy.port,
        "GET",
        "/openai/ignores-body",
        headers(proxy, ("Content-Length", str(len(smuggled)))),
        smuggled,
    )
    assert json.loads(first.body) == {"answer": "body ignored"}

    assert_own_echo(rawhttp.request(proxy.port, "GET", "/openai/echo/b", headers(proxy)), "/echo/b")
