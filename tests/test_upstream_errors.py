"""Upstream failures (README "Request handling", step 10): 502 for anything that prevents
a response,
504 when the deadline passes before one starts, a cut connection when the
exchange fails after the response started; always a small JSON error body,
never a secret, and the proxy goes on serving.
"""

from __future__ import annotations

import json
import re
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from demo.fake_responses import BAD_CHUNK_HOLD_S
from demo.fake_upstream import FakeUpstreamThread
from tests import rawhttp
from tests.conftest import CLIENT_KEY, OPENAI_KEY, SECRETS, proxy_config
from tests.supervisor_process import Supervisor, free_port

DEADLINE_MS = 300
pytestmark = pytest.mark.usefixtures("fresh")  # each test sees only its own requests


class _PlainHttpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(4096)  # a TLS ClientHello, read as if it were a request
        self.request.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")  # fmt: skip


@pytest.fixture(scope="module")
def plain_http_port() -> Iterator[int]:
    """A plain-HTTP server: what a TLS client meets when the target says https by mistake."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _PlainHttpHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def sup(
    up: FakeUpstreamThread, plain_http_port: int, module_supervisor: Callable[..., Supervisor]
) -> Supervisor:
    """The standard config plus upstreams that cannot be reached."""
    config = proxy_config(up.url)
    config["upstreams"].update(
        {
            "refused": {"request_path": "/refused", "api_key": OPENAI_KEY,
                        "target_url": f"http://127.0.0.1:{free_port()}"},
            "dns": {"request_path": "/dns", "api_key": OPENAI_KEY,
                    "target_url": "http://does-not-exist.invalid"},
            "tls": {"request_path": "/tls", "api_key": OPENAI_KEY,
                    "target_url": f"https://127.0.0.1:{plain_http_port}"},
        }
    )  # fmt: skip
    return module_supervisor(config)


@pytest.fixture(scope="module")
def short(up: FakeUpstreamThread, module_supervisor: Callable[..., Supervisor]) -> Supervisor:
    """The standard config with a short deadline."""
    config = proxy_config(up.url)
    config["upstreams"]["request_timeout_ms"] = DEADLINE_MS
    return module_supervisor(config)


def headers(proc: Supervisor, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [rawhttp.host(proc.port), rawhttp.bearer(CLIENT_KEY), *extra]


def get(proc: Supervisor, target: str) -> rawhttp.Response:
    return rawhttp.request(proc.port, "GET", target, headers(proc))


def request_line(proc: Supervisor, target: str, mark: int) -> str:
    """The request log line for `target` logged after `mark`."""
    url = re.escape(target)
    return proc.wait_for_log(rf'request .*request_url=("{url}"|{url}) ', start=mark)


def assert_json_error(resp: rawhttp.Response, status: int, error_type: str) -> None:
    assert resp.status == status
    assert resp.header_values("content-type") == [b"application/json"]
    assert resp.header_values("content-length") == [str(len(resp.body)).encode()]
    error = json.loads(resp.body)["error"]
    assert set(error) == {"type", "message"}
    assert error["type"] == error_type
    assert isinstance(error["message"], str) and error["message"]


FAILURES = [
    pytest.param("/refused/v1/chat/completions", "upstream_unreachable", id="refused"),
    pytest.param("/openai/reset", "upstream_connection_error", id="reset-before-response"),
    pytest.param("/openai/garbage", "upstream_bad_response", id="garbage-response"),
    # Relayed, a 101 would turn the client connection into a tunnel to the upstream.
    pytest.param("/openai/switching-protocols", "upstream_bad_response", id="unsolicited-101"),
    pytest.param("/dns/v1/chat/completions", "upstream_dns_error", id="dns-failure"),
    pytest.param("/tls/v1/chat/completions", "upstream_tls_error", id="tls-failure"),
]


# --- 502 --------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "error_type"), FAILURES)
def test_upstream_failure_before_a_response_is_a_502_json_error(
    sup: Supervisor, target: str, error_type: str
) -> None:
    assert_json_error(get(sup, target), 502, error_type)


@pytest.mark.parametrize(("target", "error_type"), FAILURES)
def test_upstream_failure_body_reveals_no_secret(
    sup: Supervisor, target: str, error_type: str
) -> None:
    body = get(sup, target).body.decode()
    assert not [secret for secret in SECRETS if secret in body]
    assert "does-not-exist" not in body and "127.0.0.1" not in body


@pytest.mark.parametrize(("target", "error_type"), FAILURES)
def test_proxy_keeps_serving_after_an_upstream_failure(
    sup: Supervisor, target: str, error_type: str
) -> None:
    with rawhttp.Conn(sup.port) as conn:
        assert conn.request("GET", target, headers(sup)).status == 502
        # the same client connection, then a fresh one, both still served
        assert conn.request("GET", "/openai/echo", headers(sup)).status == 200
    assert get(sup, "/openai/echo").status == 200


@pytest.mark.parametrize(("target", "error_type"), FAILURES)
def test_upstream_failure_is_logged_with_its_outcome(
    sup: Supervisor, target: str, error_type: str
) -> None:
    mark = sup.mark()
    get(sup, target)
    line = request_line(sup, target, mark)
    assert "status=502" in line
    assert f"outcome={error_type}" in line


# --- a pooled upstream connection that went stale ----------------------------------------
# The fake upstream answers /hang-up-next, then closes the connection unanswered when the
# next request arrives on it: what a provider's load balancer does to an idle keep-alive
# connection just as the proxy reuses it. One client connection keeps both requests on
# one worker, whose pool hands back the connection it just released.


def test_stale_pooled_connection_is_retried_once_for_a_bodiless_get(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    with rawhttp.Conn(sup.port) as conn:
        assert conn.request("GET", "/openai/hang-up-next", headers(sup)).status == 200
        resp = conn.request("GET", "/openai/echo?stale", headers(sup))
    assert resp.status == 200
    seen = [r for r in up.requests if r.target == b"/echo?stale"]
    assert len(seen) == 2  # the one hung up on, and the replay on a new connection
    assert seen[0].connection_id != seen[1].connection_id


def test_stale_pooled_connection_is_not_replayed_for_a_post(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    body = b'{"model": "m"}'
    with rawhttp.Conn(sup.port) as conn:
        assert conn.request("GET", "/openai/hang-up-next", headers(sup)).status == 200
        post_headers = headers(sup, ("Content-Type", "application/json"),
                               ("Content-Length", str(len(body))))  # fmt: skip
        resp = conn.request("POST", "/openai/echo?stale", post_headers, body)
    assert_json_error(resp, 502, "upstream_connection_error")
    assert len([r for r in up.requests if r.target == b"/echo?stale"]) == 1


# --- 504: the deadline passes before a response starts ----------------------------------


def test_upstream_silent_past_the_deadline_is_a_504(short: Supervisor) -> None:
    started = time.monotonic()
    resp = get(short, "/openai/stall")
    elapsed = time.monotonic() - started
    assert_json_error(resp, 504, "upstream_timeout")
    assert DEADLINE_MS / 1000 <= elapsed < 2.0


def test_upstream_timeout_is_logged(short: Supervisor) -> None:
    mark = short.mark()
    get(short, "/openai/slow-headers?delay_ms=3000")
    line = request_line(short, "/openai/slow-headers?delay_ms=3000", mark)
    assert "status=504" in line
    assert "outcome=upstream_timeout" in line


def test_timed_out_upstream_exchange_is_aborted(short: Supervisor, up: FakeUpstreamThread) -> None:
    resp = get(short, "/openai/stall")
    answered = time.monotonic()
    assert resp.status == 504
    assert up.wait_for_disconnect("/stall", timeout=2) - answered < 1.0


def test_response_within_the_deadline_is_not_cut(short: Supervisor) -> None:
    resp = get(short, f"/openai/slow-headers?delay_ms={DEADLINE_MS // 3}")
    assert resp.status == 200
    assert json.loads(resp.body) == {"delayed_ms": DEADLINE_MS // 3}


def test_deadline_covers_sending_the_request_body(short: Supervisor) -> None:
    started = time.monotonic()
    with rawhttp.Conn(short.port) as conn:
        conn.send(rawhttp.build_request(
            "POST", "/openai/upload", headers(short, ("Content-Length", "10")), b"12345"
        ))  # fmt: skip
        resp = conn.read_response()  # the other 5 bytes never come
    assert_json_error(resp, 504, "upstream_timeout")
    assert time.monotonic() - started < 2.0


# --- the response has started: the connection is cut, never completed ------------------


def test_deadline_cuts_a_stream_that_has_started(short: Supervisor) -> None:
    started = time.monotonic()
    with rawhttp.Conn(short.port) as conn:
        conn.send(rawhttp.build_request("GET", "/openai/stream-forever?interval_ms=50",
                                        headers(short)))  # fmt: skip
        resp = conn.read_head()
        assert resp.status == 200
        events = b"".join(conn.iter_chunks(resp))
        elapsed = time.monotonic() - started
    assert events.startswith(b"data: event 1\n\n")
    assert not resp.complete  # cut: no terminating zero-size chunk
    assert DEADLINE_MS / 1000 <= elapsed < 2.0


def test_stream_cut_by_the_deadline_is_logged(short: Supervisor) -> None:
    mark = short.mark()
    with rawhttp.Conn(short.port) as conn:
        conn.send(rawhttp.build_request("GET", "/openai/stream-forever?interval_ms=50",
                                        headers(short)))  # fmt: skip
        resp = conn.read_head()
        b"".join(conn.iter_chunks(resp))
    line = request_line(short, "/openai/stream-forever?interval_ms=50", mark)
    assert "status=200" in line
    assert "outcome=upstream_timeout" in line


def test_stream_cut_by_the_deadline_stops_the_upstream(
    short: Supervisor, up: FakeUpstreamThread
) -> None:
    with rawhttp.Conn(short.port) as conn:
        conn.send(rawhttp.build_request("GET", "/openai/stream-forever?interval_ms=50",
                                        headers(short)))  # fmt: skip
        resp = conn.read_head()
        b"".join(conn.iter_chunks(resp))
        cut = time.monotonic()
    assert up.wait_for_disconnect("/stream-forever", timeout=2) - cut < 1.0


@pytest.mark.parametrize(
    ("target", "promised", "sent"),
    [("/openai/close-early", 100, 10), ("/openai/reset-mid-body", 1000, 100)],
    ids=["fin", "rst"],
)
def test_upstream_closing_mid_body_cuts_the_client_connection(
    sup: Supervisor, target: str, promised: int, sent: int
) -> None:
    with rawhttp.Conn(sup.port) as conn:
        resp = conn.request("GET", target, headers(sup))
        assert resp.status == 200
        assert resp.header_values("content-length") == [str(promised).encode()]
        assert not resp.complete
        assert len(resp.body) == sent
        assert conn.at_eof()


def test_a_malformed_chunk_mid_body_cuts_the_client_connection_at_once(sup: Supervisor) -> None:
    # The upstream keeps its connection open after the bad chunk: the body must
    # fail there and then, not wait for a deadline or for the upstream to close.
    mark = sup.mark()
    started = time.monotonic()
    with rawhttp.Conn(sup.port) as conn:
        resp = conn.request("GET", "/openai/bad-chunk-mid-body", headers(sup))
        assert resp.status == 200
        assert not resp.complete
        assert resp.body == b"data: event 1\n"
        assert conn.at_eof()
    assert time.monotonic() - started < BAD_CHUNK_HOLD_S / 2
    line = request_line(sup, "/openai/bad-chunk-mid-body", mark)
    assert "outcome=upstream_body_error" in line


@pytest.mark.parametrize("target", ["/openai/close-early", "/openai/reset-mid-body"])
def test_upstream_closing_mid_body_is_logged(sup: Supervisor, target: str) -> None:
    mark = sup.mark()
    get(sup, target)
    line = request_line(sup, target, mark)
    assert "status=200" in line
    assert "outcome=upstream_body_error" in line


@pytest.mark.parametrize("target", ["/openai/close-early", "/openai/reset-mid-body"])
def test_cut_response_is_not_logged_as_an_application_crash(sup: Supervisor, target: str) -> None:
    mark = sup.mark()
    get(sup, target)
    # A later request's line: everything the worker logged about the cut one is in by then.
    get(sup, "/openai/echo/after")
    request_line(sup, "/openai/echo/after", mark)
    problems = [line for line in sup.lines[mark:] if "ERROR" in line or "Traceback" in line]
    assert problems == []
