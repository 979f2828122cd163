"""server.shutdown_timeout_ms (README "Configuration"): how long SIGTERM and a
retiring worker let requests in flight finish. Validated like
request_timeout_ms, defaults to it, and bounds a real supervisor's drain."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from demo.fake_upstream import FakeUpstreamThread
from fluxgate.config import DEFAULT_REQUEST_TIMEOUT_MS, build_config
from fluxgate.validate_upstreams import MAX_REQUEST_TIMEOUT_MS
from fluxgate.validation import validate
from fluxgate.worker import drain_seconds
from tests import rawhttp
from tests.conftest import CLIENT_KEY, proxy_config
from tests.supervisor_process import Supervisor


def doc(server: dict[str, Any], upstreams: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"version": 1, "server": server, "upstreams": upstreams or {}}


@pytest.mark.parametrize("value", [0, -1, "1000", 1.5, True, None, MAX_REQUEST_TIMEOUT_MS + 1])
def test_shutdown_timeout_is_a_whole_number_of_ms_within_the_request_timeout_bound(
    value: object,
) -> None:
    errors = validate(doc({"shutdown_timeout_ms": value}))
    assert [e.split(": ", 1)[0] for e in errors] == ["server.shutdown_timeout_ms"], errors


def test_shutdown_timeout_defaults_to_the_request_timeout() -> None:
    assert validate(doc({"shutdown_timeout_ms": MAX_REQUEST_TIMEOUT_MS})) == []
    assert build_config(doc({})).server.shutdown_timeout_ms == DEFAULT_REQUEST_TIMEOUT_MS
    config = build_config(doc({}, {"request_timeout_ms": 7000}))
    assert config.server.shutdown_timeout_ms == 7000
    config = build_config(doc({"shutdown_timeout_ms": 1500}, {"request_timeout_ms": 7000}))
    assert config.server.shutdown_timeout_ms == 1500 and config.request_timeout_ms == 7000
    assert drain_seconds(config) == 2  # uvicorn counts whole seconds: rounded up


def test_sigterm_cuts_a_stream_longer_than_the_shutdown_timeout_and_exits_zero(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    config = proxy_config(upstream.url)  # request_timeout_ms: 5000
    config["server"] = {"shutdown_timeout_ms": 1000}
    sup = make_supervisor(config)
    assert sup.proc is not None
    headers = [rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY)]
    # 40 events over 4 s: longer than the drain, shorter than the request deadline.
    with rawhttp.Conn(sup.port, timeout=10) as conn:
        conn.send(rawhttp.build_request("GET", "/openai/sse?events=40&interval_ms=100", headers))
        resp = conn.read_head()
        assert resp.status == 200
        chunks = conn.iter_chunks(resp)
        received = next(chunks)  # the stream is flowing
        sup.signal(signal.SIGTERM)
        asked = time.monotonic()
        received += b"".join(chunks)  # until the proxy cuts it
        cut_after = time.monotonic() - asked
    assert sup.proc.wait(10) == 0
    assert not resp.complete
    assert 0 < received.count(b"data: event") < 40
    # The drain lasted about shutdown_timeout_ms, not the 4 s the stream wanted.
    assert 0.8 < cut_after < 3.0, cut_after
