"""Slow clients (hardening): a client that trickles its request head, sends nothing, or
never finishes its body is timed out, and the worker it sits on keeps serving everyone
else in the meantime.

What is already proven elsewhere and not repeated here:
- test_protocol.py proves the head deadline at unit level with a 50 ms timer
  (408 for a silent connection, a half head, byte trickling that does not reset
  the deadline, an incomplete second head on a keep-alive connection);
- test_upstream_errors.py::test_deadline_covers_sending_the_request_body proves
  that a stalled body gets 504 within request_timeout_ms.

Here: real `fluxgate-supervisor` processes with ONE worker, so that the slow
clients and the clients that must still be served share the same event loop,
the real 15 s head deadline (fluxgate.protocol.HEAD_TIMEOUT), the 15 s idle
keep-alive timeout, the 5 s bound on the rest of a body once the response has
been sent (fluxgate.protocol.DISCARD_TIMEOUT), and several slow clients at once.
Every wait is bounded; the only sleeps pace the slow clients.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from demo.fake_upstream import FakeUpstreamThread, RecordedRequest
from fluxgate.protocol import DISCARD_TIMEOUT, HEAD_TIMEOUT
from fluxgate_supervisor.app import KEEPALIVE_TIMEOUT
from tests import rawhttp
from tests.conftest import CLIENT_KEY, SECRETS, proxy_config
from tests.supervisor_process import Supervisor, wait_until

BODY_DEADLINE_MS = 1000
# How late a deadline may fire on a loaded CI machine (two xdist workers, 2 cores).
SLACK = 3.0
pytestmark = pytest.mark.usefixtures("fresh")  # each test sees only its own requests


@dataclass
class SlowClient:
    """A raw connection driven by its own thread: sends `first`, then the bytes of
    `drip` one per `interval` seconds (over and over with `repeat`) while the server
    stays silent, and reads until the server closes the connection. Records
    everything received and when the connection ended."""

    port: int
    first: bytes
    drip: bytes = b""
    interval: float = 1.0
    repeat: bool = False
    received: bytes = b""
    dripped: int = 0
    started: float = 0.0
    answered: float | None = None  # when the first byte of a response arrived
    ended: float | None = None
    error: BaseException | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> SlowClient:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                self.started = time.monotonic()
                if self.first:
                    sock.sendall(self.first)
                # recv's timeout paces the drip: one byte per `interval` while the
                # server stays silent; the loop ends when it closes the connection.
                sock.settimeout(self.interval)
                limit = self.started + HEAD_TIMEOUT + KEEPALIVE_TIMEOUT + 2 * SLACK
                while time.monotonic() < limit:
                    try:
                        data = sock.recv(65536)
                    except TimeoutError:
                        if self.drip and (self.repeat or self.dripped < len(self.drip)):
                            i = self.dripped % len(self.drip)
                            try:
                                sock.sendall(self.drip[i : i + 1])
                                self.dripped += 1
                            except OSError:  # closed between two drips
                                pass
                        continue
                    except ConnectionResetError:
                        break
                    if not data:
                        break
                    if self.answered is None:
                        self.answered = time.monotonic()
                    self.received += data
                self.ended = time.monotonic()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)

    def assert_ended(self) -> None:
        assert self._thread is not None and not self._thread.is_alive(), f"still open: {self}"
        assert self.error is None, self.error

    @property
    def lasted(self) -> float:
        assert self.ended is not None
        return self.ended - self.started

    def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        head, _, body = self.received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers, body


def assert_json_error(client: SlowClient, status: int, error_type: str) -> None:
    client.assert_ended()
    code, headers, body = client.response()
    assert code == status, client.received
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(body)).encode()
    assert json.loads(body)["error"]["type"] == error_type
    assert not [s for s in SECRETS if s.encode() in client.received]


class Prober:
    """Requests the one worker must keep serving while slow clients hold it: a fresh
    connection each time, so every one goes through accept, parse and the proxy."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.latencies: list[float] = []
        self.failures: list[object] = []

    def once(self) -> None:
        started = time.monotonic()
        try:
            resp = rawhttp.request(
                self.sup.port, "GET", "/openai/v1/models",
                [rawhttp.host(self.sup.port), rawhttp.bearer(CLIENT_KEY)], timeout=5,
            )  # fmt: skip
        except OSError as exc:
            self.failures.append(exc)
            return
        self.latencies.append(time.monotonic() - started)
        if resp.status != 200 or b'"object":"list"' not in resp.body:
            self.failures.append((resp.status, resp.body))

    def until(self, done: threading.Event, timeout: float, pause: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < deadline:
            self.once()
            done.wait(pause)  # pacing only: the probes are not the load under test

    def assert_served_promptly(self, at_least: int) -> None:
        assert self.failures == []
        assert len(self.latencies) >= at_least, len(self.latencies)
        worst = max(self.latencies)
        print(f"{len(self.latencies)} probes, worst latency {worst * 1000:.1f} ms")
        assert worst < 1.0, f"a probe waited {worst:.2f} s behind the slow clients"


def all_ended(clients: list[SlowClient], timeout: float) -> threading.Event:
    """An event set once every slow client's thread has ended (bounded by `timeout`)."""
    done = threading.Event()

    def wait() -> None:
        for client in clients:
            client.join(timeout)
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    return done


@pytest.fixture
def sup(up: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]) -> Supervisor:
    """A supervisor of its own for each test: one worker, which slow clients may tie up."""
    config = proxy_config(up.url)
    config["upstreams"]["request_timeout_ms"] = BODY_DEADLINE_MS
    return make_supervisor(config, workers=1)


def head_bytes(sup: Supervisor, target: str) -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{sup.port}\r\n"
        f"Authorization: Bearer {CLIENT_KEY}\r\n"
    ).encode()


def body_client(sup: Supervisor, *extra: tuple[str, str], key: str | None = CLIENT_KEY) -> bytes:
    headers = [rawhttp.host(sup.port), *extra]
    if key is not None:
        headers.append(rawhttp.bearer(key))
    return rawhttp.build_request("POST", "/openai/upload", headers)


# --- the request head: 15 s at most, whatever the client does ---------------------------


@pytest.mark.slow
def test_slow_heads_get_408_at_the_head_deadline_while_the_worker_serves_others(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    """Five slow clients on the only worker: one trickling its headers at one byte a
    second, one sending nothing, one stopping after half a head, one idle keep-alive
    connection after a served request, and one idle after a request answered (401)
    before its body was sent. Meanwhile fresh clients are served promptly."""
    (worker,) = sup.worker_pids()
    mark = sup.mark()
    trickler = SlowClient(sup.port, head_bytes(sup, "/openai/slow-trickle") + b"X-Pad: ",
                          drip=b"a", interval=1.0, repeat=True)  # fmt: skip
    silent = SlowClient(sup.port, b"", interval=1.0)
    half = SlowClient(sup.port, head_bytes(sup, "/openai/slow-half"), interval=1.0)
    idle = SlowClient(sup.port, head_bytes(sup, "/openai/v1/models") + b"\r\n", interval=1.0)
    # Before the fix, this one was never closed: the body's bytes, arriving after the
    # response, had cancelled the keep-alive timer and nothing re-armed it.
    idle_after_401 = SlowClient(sup.port, body_client(sup, ("Content-Length", "8"), key=None)
                                + b"part", drip=b"rest", interval=0.2)  # fmt: skip
    slow_heads = [trickler, silent, half]
    idlers = [idle, idle_after_401]
    for client in [*slow_heads, *idlers]:
        client.start()
    done = all_ended([*slow_heads, *idlers], timeout=HEAD_TIMEOUT + KEEPALIVE_TIMEOUT + 3 * SLACK)

    prober = Prober(sup)
    prober.until(done, timeout=HEAD_TIMEOUT + KEEPALIVE_TIMEOUT + 3 * SLACK)
    assert done.is_set()

    for client in slow_heads:
        assert_json_error(client, 408, "request_timeout")
        assert client.response()[1][b"connection"] == b"close"
        assert HEAD_TIMEOUT - 0.5 <= client.lasted < HEAD_TIMEOUT + SLACK, client.lasted
    # One byte a second: the deadline counts from the first byte, not the last one.
    assert trickler.dripped >= HEAD_TIMEOUT - 2
    # The idle keep-alive connections got their response, then were closed silently.
    idle.assert_ended()
    assert idle.response()[0] == 200 and idle.received.count(b"HTTP/1.1") == 1
    assert KEEPALIVE_TIMEOUT - 0.5 <= idle.lasted < KEEPALIVE_TIMEOUT + SLACK, idle.lasted
    assert_json_error(idle_after_401, 401, "unauthorized")
    assert idle_after_401.received.count(b"HTTP/1.1") == 1
    assert KEEPALIVE_TIMEOUT - 0.5 <= idle_after_401.lasted < KEEPALIVE_TIMEOUT + 1 + SLACK

    prober.assert_served_promptly(at_least=50)
    assert not [r for r in up.requests if r.path.startswith("/slow")]
    timeouts = [
        line for line in sup.lines[mark:]
        if line.startswith("WARN") and "request rejected" in line and "status=408" in line
    ]  # fmt: skip
    assert len(timeouts) == 3, timeouts
    assert sup.worker_pids() == [worker]


# --- the request body: request_timeout_ms, then DISCARD_TIMEOUT for the rest ---------


@pytest.mark.slow
def test_request_bodies_that_never_finish_are_answered_then_cut_while_the_worker_serves(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    """Three bodies that trickle forever, one byte every 200 ms.

    A declared-length and a chunked body on an authenticated request: the upstream
    exchange is bounded by request_timeout_ms and nothing of the response has started
    (the upstream waits for the whole body), so each gets a 504 JSON error and the
    upstream exchange is aborted. A body on a request without a credential: 401 at once.
    In all three the client keeps sending; the rest of the body is read and dropped for
    DISCARD_TIMEOUT, then the connection is closed. The same worker serves others."""
    (worker,) = sup.worker_pids()
    with_length = SlowClient(
        sup.port, body_client(sup, ("Content-Length", str(1 << 30))) + b"start",
        drip=b"x", interval=0.2, repeat=True,
    )  # fmt: skip
    chunked = SlowClient(
        sup.port, body_client(sup, ("Transfer-Encoding", "chunked")) + b"5\r\nstart\r\n",
        drip=b"1\r\nx\r\n", interval=0.2, repeat=True,
    )  # fmt: skip
    unauthenticated = SlowClient(
        sup.port, body_client(sup, ("Content-Length", "100000"), key=None) + b"part",
        drip=b"x", interval=0.2, repeat=True,
    )  # fmt: skip
    clients = [with_length, chunked, unauthenticated]
    for client in clients:
        client.start()
    bound = BODY_DEADLINE_MS / 1000 + DISCARD_TIMEOUT + 2 * SLACK
    done = all_ended(clients, timeout=bound)
    prober = Prober(sup)
    prober.until(done, timeout=bound)
    assert done.is_set()

    for client, status, error_type, answer_after in (
        (with_length, 504, "upstream_timeout", BODY_DEADLINE_MS / 1000),
        (chunked, 504, "upstream_timeout", BODY_DEADLINE_MS / 1000),
        (unauthenticated, 401, "unauthorized", 0.0),
    ):
        assert_json_error(client, status, error_type)
        assert client.answered is not None and client.ended is not None
        assert answer_after - 0.1 <= client.answered - client.started < answer_after + SLACK
        cut_after = client.ended - client.answered
        assert DISCARD_TIMEOUT - 0.5 <= cut_after < DISCARD_TIMEOUT + SLACK, cut_after
        assert client.dripped > DISCARD_TIMEOUT / 0.2 / 2  # it went on sending all along
    prober.assert_served_promptly(at_least=20)

    # The upstream saw two requests whose bodies never ended, and both were aborted.
    def uploads() -> list[RecordedRequest]:
        return [r for r in up.requests if r.path == "/upload"]

    assert wait_until(lambda: len(uploads()) == 2, timeout=5), uploads()
    assert not any(r.complete for r in uploads())
    assert sup.worker_pids() == [worker]


def test_a_body_sent_after_an_early_answer_leaves_the_connection_usable(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    """The common case the bound must not break: a client sends the head, then the
    body a moment later (separate writes, as http.client does), and the 401 comes in
    between. The body is dropped and the connection serves the next request."""
    with rawhttp.Conn(sup.port) as conn:
        conn.send(body_client(sup, ("Content-Length", "2"), key=None))
        assert conn.read_response().status == 401
        conn.send(b"{}")
        resp = conn.request("GET", "/openai/v1/models", [rawhttp.host(sup.port),
                                                         rawhttp.bearer(CLIENT_KEY)])  # fmt: skip
        assert resp.status == 200
    assert [r.path for r in up.requests] == ["/v1/models"]


def test_keepalive_from_gunicorn_conf_py_sets_how_long_an_idle_connection_stays_open(
    upstream: FakeUpstreamThread, tmp_path: Path
) -> None:
    """`keepalive` in the working directory's gunicorn.conf.py is what workers use."""
    (tmp_path / "gunicorn.conf.py").write_text("keepalive = 1\n")
    sup = Supervisor(tmp_path, proxy_config(upstream.url)).start()
    try:
        with rawhttp.Conn(sup.port) as conn:
            conn.send(rawhttp.build_request("GET", "/_fluxgate/health", [rawhttp.host(sup.port)]))
            assert conn.read_response().status == 200
            started = time.monotonic()
            assert conn.at_eof(timeout=1 + SLACK)
            assert time.monotonic() - started > 0.5
    finally:
        sup.stop()
