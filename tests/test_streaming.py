"""Streaming through the proxy (README "Request handling", steps 8 and 11): events are
never held back,
an abandoned stream is cancelled upstream at once, and big bodies move in
bounded memory.

Clients are raw sockets, so arrival times and closes are the test's own; the
fake provider runs in this process and reports when the proxy closed its
upstream connection on the same monotonic clock.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from demo.fake_responses import download_sha256
from demo.fake_upstream import FakeUpstreamThread
from tests import rawhttp
from tests.conftest import CLIENT_KEY, proxy_config
from tests.supervisor_process import Supervisor

MiB = 1 << 20
BIG = 64 * MiB
pytestmark = pytest.mark.usefixtures("fresh")  # each test sees only its own requests


@pytest.fixture(scope="module")
def sup(up: FakeUpstreamThread, module_supervisor: Callable[..., Supervisor]) -> Supervisor:
    return module_supervisor(proxy_config(up.url))


def headers(sup: Supervisor, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY), *extra]


# --- SSE: each event as it is emitted ----------------------------------------------------


def test_sse_events_arrive_one_by_one_as_the_upstream_emits_them(sup: Supervisor) -> None:
    arrivals: list[tuple[bytes, float]] = []
    with rawhttp.Conn(sup.port) as conn:
        conn.send(
            rawhttp.build_request("GET", "/openai/sse?events=5&interval_ms=300", headers(sup))
        )
        resp = conn.read_head()
        assert resp.status == 200
        assert resp.header_values("content-type")[0].startswith(b"text/event-stream")
        arrivals += conn.iter_events(resp)
        assert resp.complete
    assert [event for event, _ in arrivals] == [b"data: event %d" % i for i in range(1, 6)]
    times = [t for _, t in arrivals]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap > 0.15 for gap in gaps), gaps
    assert times[-1] - times[0] > 1.0


# --- the client goes away: the upstream exchange stops at once ------------------------


def test_client_leaving_during_a_silent_upstream_closes_the_upstream_connection(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    mark = sup.mark()
    with rawhttp.Conn(sup.port) as conn:
        conn.send(rawhttp.build_request("GET", "/openai/stall", headers(sup)))
        up.wait_for_requests(1)  # the proxy is now waiting for response headers
        closed = time.monotonic()
    upstream_closed = up.wait_for_disconnect("/stall", timeout=2)
    assert upstream_closed - closed < 1.0
    line = sup.wait_for_log(r"request .*request_url=/openai/stall ", start=mark)
    assert "outcome=client_disconnected" in line
    assert "status=499" in line


def test_client_leaving_mid_stream_closes_the_upstream_connection(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    mark = sup.mark()
    with rawhttp.Conn(sup.port) as conn:
        conn.send(
            rawhttp.build_request("GET", "/openai/stream-forever?interval_ms=50", headers(sup))
        )
        resp = conn.read_head()
        assert resp.status == 200
        first = next(conn.iter_chunks(resp))
        assert first.startswith(b"data: event 1")
        closed = time.monotonic()
    upstream_closed = up.wait_for_disconnect("/stream-forever", timeout=2)
    assert upstream_closed - closed < 1.0
    line = sup.wait_for_log(r"request .*request_url=\S*/openai/stream-forever", start=mark)
    assert "outcome=client_disconnected" in line
    assert "status=200" in line


def test_client_resetting_mid_stream_closes_the_upstream_connection(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    with rawhttp.Conn(sup.port) as conn:
        conn.send(rawhttp.build_request("GET", "/openai/stream-forever?interval_ms=50",
                                        headers(sup)))  # fmt: skip
        resp = conn.read_head()
        next(conn.iter_chunks(resp))
        closed = time.monotonic()
        conn.reset()
    assert up.wait_for_disconnect("/stream-forever", timeout=2) - closed < 1.0


def test_client_leaving_mid_upload_closes_the_upstream_connection(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    mark = sup.mark()
    with rawhttp.Conn(sup.port) as conn:
        conn.send(rawhttp.build_request("POST", "/openai/upload", headers(
            sup, ("Content-Length", str(10 * MiB)), ("Expect", "100-continue"),
        )))  # fmt: skip
        # 100 Continue comes when the proxy first reads the body: it is connected upstream.
        assert conn.read_head().status == 100
        conn.send(b"x" * MiB)
        closed = time.monotonic()
    assert up.wait_for_disconnect("/upload", timeout=2) - closed < 1.0
    assert not up.requests[-1].complete  # the upstream never saw a whole request
    line = sup.wait_for_log(r"request .*request_url=/openai/upload ", start=mark)
    assert "outcome=client_disconnected" in line


# --- big bodies in bounded memory --------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class MemoryWatch:
    """Peak RSS growth of the worker over a block: VmHWM after minus VmRSS before,
    with the high-water mark reset first (clear_refs 5)."""

    def __init__(self, sup: Supervisor) -> None:
        (self.pid,) = sup.worker_pids()

    def __enter__(self) -> MemoryWatch:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self.before = _status_kib(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth_mib = (_status_kib(self.pid, "VmHWM") - self.before) / 1024
        print(
            f"worker {self.pid}: RSS {self.before / 1024:.1f} MiB, peak +{self.growth_mib:.1f} MiB"
        )


def pattern_blocks(total: int, block: int = MiB) -> Iterator[bytes]:
    for i in range(total // block):
        yield bytes([i % 251]) * block


def test_large_upload_streams_through_in_bounded_memory(sup: Supervisor) -> None:
    sha = hashlib.sha256()
    with MemoryWatch(sup) as mem, rawhttp.Conn(sup.port, timeout=30) as conn:
        conn.send(rawhttp.build_request(
            "POST", "/openai/upload", headers(sup, ("Content-Length", str(BIG)))
        ))  # fmt: skip
        for block in pattern_blocks(BIG):
            sha.update(block)
            conn.send(block)
        resp = conn.read_response()
    assert resp.status == 200
    assert json.loads(resp.body) == {"body_length": BIG, "body_sha256": sha.hexdigest()}
    assert mem.growth_mib < 32


def test_large_chunked_upload_streams_through_in_bounded_memory(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    sha = hashlib.sha256()
    with MemoryWatch(sup) as mem, rawhttp.Conn(sup.port, timeout=30) as conn:
        conn.send(rawhttp.build_request(
            "POST", "/openai/upload", headers(sup, ("Transfer-Encoding", "chunked"))
        ))  # fmt: skip
        for block in pattern_blocks(BIG):
            sha.update(block)
            conn.send(b"%x\r\n%b\r\n" % (len(block), block))
        conn.send(b"0\r\n\r\n")
        resp = conn.read_response()
    assert resp.status == 200
    assert json.loads(resp.body) == {"body_length": BIG, "body_sha256": sha.hexdigest()}
    assert up.requests[-1].chunked
    assert mem.growth_mib < 32


def test_large_download_streams_through_in_bounded_memory(sup: Supervisor) -> None:
    sha = hashlib.sha256()
    received = 0
    with MemoryWatch(sup) as mem, rawhttp.Conn(sup.port, timeout=30) as conn:
        conn.send(rawhttp.build_request("GET", f"/openai/download?bytes={BIG}", headers(sup)))
        resp = conn.read_head()
        assert resp.status == 200
        assert resp.header_values("content-length") == [str(BIG).encode()]
        while received < BIG:
            data = conn.rfile.read1(MiB)
            assert data, f"connection closed after {received} bytes"
            received += len(data)
            sha.update(data)
    assert received == BIG
    assert sha.hexdigest() == download_sha256(BIG)
    assert mem.growth_mib < 32
