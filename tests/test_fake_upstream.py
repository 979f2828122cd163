"""Tests of the fake provider itself (demo/fake_upstream.py), without Fluxgate.

The proxy tests trust what the fake records and what it answers, so this file
proves both: the official SDKs, pointed directly at the fake, parse its
answers; and raw-socket requests are recorded byte for byte.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

import anthropic
import openai
import pytest

from demo.fake_responses import GZIP_PLAIN, download_sha256
from demo.fake_upstream import FakeUpstreamThread


@pytest.fixture
def up() -> Iterator[FakeUpstreamThread]:
    with FakeUpstreamThread() as server:
        yield server


def connect(up: FakeUpstreamThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", up.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(rfile: BinaryIO, *, head_only: bool = False) -> tuple[bytes, bytes]:
    """Read one response (Content-Length framed, or none) from a buffered socket file;
    return (head without the final CRLFCRLF, body)."""
    lines = []
    while (line := rfile.readline()) not in (b"\r\n", b""):
        lines.append(line)
    assert lines, "connection closed before the response head"
    head = b"".join(lines)[:-2]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    body = b"" if head_only else rfile.read(length)
    assert len(body) == (0 if head_only else length)
    return head, body


# --- the SDKs parse what the fake says ----------------------------------------------


def test_openai_chat_completion(up: FakeUpstreamThread) -> None:
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="x", max_retries=0, timeout=10)
    resp = client.chat.completions.create(
        model="fake-gpt", messages=[{"role": "user", "content": "hello there world"}]
    )
    assert resp.choices[0].message.content == "Echo: hello there world"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.total_tokens > 0
    (req,) = up.wait_for_requests(1)
    assert (req.method, req.target) == ("POST", b"/v1/chat/completions")
    assert req.header("AUTHORIZATION") == b"Bearer x"
    assert req.json()["model"] == "fake-gpt"


def test_openai_streamed_chat_completion(up: FakeUpstreamThread) -> None:
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="x", max_retries=0, timeout=10)
    stream = client.chat.completions.create(
        model="fake-gpt",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: one two three"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_openai_models_list(up: FakeUpstreamThread) -> None:
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="x", max_retries=0, timeout=10)
    ids = [m.id for m in client.models.list()]
    assert "fake-gpt" in ids


def test_anthropic_message(up: FakeUpstreamThread) -> None:
    client = anthropic.Anthropic(base_url=up.url, api_key="x", max_retries=0, timeout=10)
    msg = client.messages.create(
        model="fake-claude", max_tokens=50, messages=[{"role": "user", "content": "hi claude"}]
    )
    assert msg.content[0].type == "text" and msg.content[0].text == "Echo: hi claude"
    assert msg.stop_reason == "end_turn" and msg.usage.output_tokens == 3
    assert up.wait_for_requests(1)[0].path == "/v1/messages"


def test_anthropic_streamed_message(up: FakeUpstreamThread) -> None:
    client = anthropic.Anthropic(base_url=up.url, api_key="x", max_retries=0, timeout=10)
    with client.messages.stream(
        model="fake-claude", max_tokens=50, messages=[{"role": "user", "content": "a b c"}]
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == "Echo: a b c"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == len(pieces)


# --- recording is byte-exact -----------------------------------------------------------


def test_chunked_upload_recorded_with_framing_and_decoded(up: FakeUpstreamThread) -> None:
    head = b"POST /upload?x=%2F HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n"
    framed = b"5;name=val\r\nhello\r\nA\r\n, chunked!\r\n0\r\nX-Trailer: t1\r\n\r\n"
    with connect(up) as sock:
        sock.sendall(head + framed)
        _, body = read_response(sock.makefile("rb"))
    req = up.wait_for_requests(1)[0]
    assert req.raw_head == head and req.target == b"/upload?x=%2F"
    assert req.chunked and req.raw_body == framed
    assert req.body == b"hello, chunked!" and req.body_length == 15
    assert req.body_sha256 == hashlib.sha256(b"hello, chunked!").hexdigest()
    assert req.trailers == [(b"X-Trailer", b"t1")]
    assert b'"body_length":15' in body


def test_header_order_case_and_duplicates_kept(up: FakeUpstreamThread) -> None:
    head = (
        b"GET /echo/a%20b?q=1&q=2 HTTP/1.1\r\nhost: up\r\nX-Dup: one\r\nx-MiXeD: v\r\n"
        b"x-dup: two\r\nAccept:   spaced  \r\n\r\n"
    )
    with connect(up) as sock:
        sock.sendall(head)
        read_response(sock.makefile("rb"))
    req = up.wait_for_requests(1)[0]
    assert req.raw_head == head
    assert req.headers == [
        (b"host", b"up"),
        (b"X-Dup", b"one"),
        (b"x-MiXeD", b"v"),
        (b"x-dup", b"two"),
        (b"Accept", b"spaced"),
    ]
    assert req.header_values("x-dup") == [b"one", b"two"] and req.header("X-DUP") == b"one"
    assert req.path == "/echo/a%20b" and req.body_length == 0 and not req.chunked


def test_keep_alive_several_requests_one_connection(up: FakeUpstreamThread) -> None:
    with connect(up) as sock:
        rfile = sock.makefile("rb")
        for i in range(3):
            body = b"x" * i
            sock.sendall(
                b"POST /echo HTTP/1.1\r\nHost: up\r\nContent-Length: %d\r\n\r\n%b" % (i, body)
            )
            head, _ = read_response(rfile)
            assert head.startswith(b"HTTP/1.1 200 ")
    reqs = up.wait_for_requests(3)
    assert [r.body for r in reqs] == [b"", b"x", b"xx"]
    assert {r.connection_id for r in reqs} == {reqs[0].connection_id}
    assert up.connections_opened == 1


def test_sse_events_arrive_as_separate_reads(up: FakeUpstreamThread) -> None:
    with connect(up) as sock:
        sock.sendall(b"GET /sse?events=3&interval_ms=300 HTTP/1.1\r\nHost: up\r\n\r\n")
        arrivals: list[tuple[float, bytes]] = []
        buf = b""
        while not buf.endswith(b"0\r\n\r\n"):
            data = sock.recv(65536)
            assert data
            arrivals.append((time.monotonic(), data))
            buf += data
    assert b"Transfer-Encoding: chunked" in buf
    events = [(t, d) for t, d in arrivals if b"data: event" in d]
    assert [d.count(b"data: event") for _, d in events] == [1, 1, 1]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(events)]
    assert all(g >= 0.25 for g in gaps), gaps


# --- other routes and observability ----------------------------------------------------


def test_wait_for_disconnect_sees_client_leaving_a_stream(up: FakeUpstreamThread) -> None:
    sock = connect(up)
    sock.sendall(b"GET /stream-forever?interval_ms=20 HTTP/1.1\r\nHost: up\r\n\r\n")
    received = b""
    while b"data: event" not in received:  # the head may come as its own segment
        received += sock.recv(65536)
    up.wait_for_requests(1)
    with pytest.raises(TimeoutError):
        up.wait_for_disconnect("/stream-forever", timeout=0.1)
    closed_here = time.monotonic()
    sock.close()
    seen = up.wait_for_disconnect("/stream-forever", timeout=2)
    assert 0 <= seen - closed_here < 0.5
    assert up.closed_by(up.requests[0].connection_id) == "client"


def test_misc_routes(up: FakeUpstreamThread) -> None:
    with connect(up) as sock:
        rfile = sock.makefile("rb")
        sock.sendall(b"GET /status/204 HTTP/1.1\r\nHost: up\r\n\r\n")
        assert read_response(rfile) == (b"HTTP/1.1 204 No Content", b"")
        # Pipelined: HEAD gets headers only, so the /gzip response follows directly.
        sock.sendall(
            b"HEAD /download?bytes=5000 HTTP/1.1\r\nHost: up\r\n\r\n"
            b"GET /gzip HTTP/1.1\r\nHost: up\r\n\r\n"
        )
        head, _ = read_response(rfile, head_only=True)
        assert b"Content-Length: 5000" in head
        head, body = read_response(rfile)
        assert b"Content-Encoding: gzip" in head and gzip.decompress(body) == GZIP_PLAIN
        sock.sendall(b"GET /cookies HTTP/1.1\r\nHost: up\r\n\r\n")
        head, _ = read_response(rfile)
        assert head.count(b"\r\nSet-Cookie: ") == 3 and head.count(b"X-Custom-Header: a") == 2
        sock.sendall(b"GET /download?bytes=200000 HTTP/1.1\r\nHost: up\r\n\r\n")
        _, body = read_response(rfile)
        assert hashlib.sha256(body).hexdigest() == download_sha256(200000)
    with connect(up) as sock:
        sock.sendall(b"GET /reset HTTP/1.1\r\nHost: up\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass


def test_cut_short_upload_is_recorded_incomplete(up: FakeUpstreamThread) -> None:
    sock = connect(up)
    sock.sendall(b"POST /upload HTTP/1.1\r\nHost: up\r\nContent-Length: 1000\r\n\r\n" + b"x" * 300)
    sock.shutdown(socket.SHUT_WR)  # the FIN follows the 300 bytes: they are read first
    up.wait_for_disconnect("/upload", timeout=2)
    sock.close()
    (req,) = up.requests
    assert not req.complete and req.body_length == 300


def test_runs_as_a_program_and_exits_0_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo.fake_upstream", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fake upstream listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: up\r\n\r\n")
            head, body = read_response(sock.makefile("rb"))
            assert head.startswith(b"HTTP/1.1 200 ") and b'"object":"list"' in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
