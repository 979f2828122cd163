"""Upstream resilience (README "Upstream resilience"): provider key pools, failover before
the first byte, and the deadlines shaped for LLMs (connect, first byte, idle, total).

End to end through a real supervisor and the fake provider, which answers a key
listed in its `key_answers` with that key's status (401, 429 + Retry-After…)
whatever the route, and records which key every request carried. The pool's
algorithm and the Retry-After forms are unit-tested at the bottom.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import openai
import pytest

from demo.fake_upstream import FakeUpstreamThread
from fluxgate.config import ProviderKey, build_config
from fluxgate.exchange import Exchange
from fluxgate.forward import RequestBody
from fluxgate.keypool import BACKOFF_CAP, KeyPool, retry_after
from fluxgate.validation import validate
from tests import rawhttp
from tests.conftest import CLIENT_KEY, POOL_KEYS, proxy_config
from tests.promtext import value, wait_for
from tests.supervisor_process import Supervisor

LIMITED, REFUSED, GOOD = POOL_KEYS  # secrets: the suite's log scan looks for each


def pool_config(upstream: FakeUpstreamThread, **settings: Any) -> dict[str, Any]:
    doc = proxy_config(upstream.url)
    doc["upstreams"]["pooled"] = {
        "request_path": "/pooled",
        "target_url": upstream.url,
        "api_keys": [
            {"id": "limited", "key": LIMITED},
            {"id": "refused", "key": REFUSED},
            {"id": "good", "key": GOOD},
        ],
        **settings,
    }
    return doc


@pytest.fixture
def pooled(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> Iterator[Supervisor]:
    upstream.key_answers[LIMITED] = (429, [("Retry-After", "30")])
    upstream.key_answers[REFUSED] = (401, [])
    yield make_supervisor(pool_config(upstream))
    upstream.key_answers.clear()


AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


def keys_used(upstream: FakeUpstreamThread) -> list[str | None]:
    return [r.provider_key() for r in upstream.requests]


def test_a_pool_answers_the_client_once_with_the_key_that_works(
    pooled: Supervisor, upstream: FakeUpstreamThread
) -> None:
    mark = pooled.mark()
    status, _, body = pooled.request("GET", "/pooled/v1/models", AUTH)
    assert status == 200 and json.loads(body)["object"] == "list"
    assert keys_used(upstream) == [LIMITED, REFUSED, GOOD]
    line = pooled.wait_for_log(r"request .*request_url=/pooled/v1/models", start=mark)
    assert " provider_key=good " in line and " attempts=3 " in line and " status=200 " in line
    warning = pooled.wait_for_log(r"provider refused a key", start=mark)
    assert "provider_key=refused" in warning and REFUSED not in warning


def test_benched_keys_rest_and_the_working_key_takes_the_requests(
    pooled: Supervisor, upstream: FakeUpstreamThread
) -> None:
    pooled.request("GET", "/pooled/v1/models", AUTH)  # benches limited (429) and refused (401)
    upstream.clear()
    for _ in range(6):
        assert pooled.request("GET", "/pooled/v1/models", AUTH)[0] == 200
    assert keys_used(upstream) == [GOOD] * 6  # limited's Retry-After is 30 s


def test_attempts_and_benched_keys_are_in_the_metrics(
    pooled: Supervisor, upstream: FakeUpstreamThread
) -> None:
    pooled.request("GET", "/pooled/v1/models", AUTH)
    answered = {"upstream": "pooled", "provider_key": "good", "result": "answered"}
    samples = wait_for(pooled.url, "fluxgate_upstream_attempts_total", 1, **answered)

    def attempts(key: str, result: str) -> float:
        return value(samples, "fluxgate_upstream_attempts_total", upstream="pooled",
                     provider_key=key, result=result)  # fmt: skip

    assert (attempts("limited", "retried"), attempts("refused", "retried")) == (1, 1)
    assert attempts("good", "answered") == 1
    for key, benched in (("limited", 1), ("refused", 1), ("good", 0)):
        labels = {"upstream": "pooled", "provider_key": key}
        assert value(samples, "fluxgate_provider_key_benched", **labels) == benched


def test_keys_share_the_requests_by_weight(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    doc = pool_config(upstream)
    doc["upstreams"]["pooled"]["api_keys"][0]["weight"] = 2
    sup = make_supervisor(doc)
    for _ in range(8):
        assert sup.request("GET", "/pooled/v1/models", AUTH)[0] == 200
    assert Counter(keys_used(upstream)) == {LIMITED: 4, REFUSED: 2, GOOD: 2}


def test_a_body_larger_than_the_retry_limit_is_sent_once_and_its_answer_returned(
    pooled: Supervisor, upstream: FakeUpstreamThread
) -> None:
    body = b"x" * (2 << 20)  # 2 MiB, over the 1 MiB default
    headers = [
        rawhttp.host(pooled.port),
        rawhttp.bearer(CLIENT_KEY),
        ("Content-Length", str(len(body))),
    ]
    resp = rawhttp.request(pooled.port, "POST", "/pooled/v1/chat/completions", headers, body)
    assert resp.status == 429
    assert keys_used(upstream) == [LIMITED]


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_small_body_is_replayed_byte_for_byte_on_the_next_key(
    pooled: Supervisor, upstream: FakeUpstreamThread, framing: str
) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers: list[tuple[str, str]] = [rawhttp.host(pooled.port), rawhttp.bearer(CLIENT_KEY)]
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
        sent = body
    else:
        headers.append(("Transfer-Encoding", "chunked"))
        sent = rawhttp.chunked(body[:10], body[10:])
    resp = rawhttp.request(pooled.port, "POST", "/pooled/v1/chat/completions", headers, sent)
    assert resp.status == 200, resp.body
    assert keys_used(upstream) == [LIMITED, REFUSED, GOOD]
    first = upstream.requests[0].raw_body
    assert body in first or body == first
    assert [r.raw_body for r in upstream.requests] == [first] * 3


def test_a_client_that_leaves_during_the_backoff_stops_further_attempts(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    upstream.key_answers[LIMITED] = (503, [])
    sup = make_supervisor(pool_config(upstream, retry_backoff_ms=5000))
    mark = sup.mark()
    with rawhttp.Conn(sup.port) as conn:
        head = [rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY)]
        conn.send(rawhttp.build_request("GET", "/pooled/v1/models", head))
        upstream.wait_for_requests(1)
    line = sup.wait_for_log(r"request .*request_url=/pooled/v1/models", start=mark)
    assert " outcome=client_disconnected " in line and " attempts=1 " in line
    assert keys_used(upstream) == [LIMITED]


def test_the_openai_sdk_works_through_a_pool(
    pooled: Supervisor, upstream: FakeUpstreamThread
) -> None:
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{pooled.port}/pooled/v1", api_key=CLIENT_KEY, max_retries=0
    )
    reply = client.chat.completions.create(
        model="fake-gpt", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content
    assert keys_used(upstream)[-1] == GOOD


# --- deadlines ---------------------------------------------------------------------------


def timeout_config(upstream_url: str, **timeouts: int) -> dict[str, Any]:
    doc = proxy_config(upstream_url)
    doc["upstreams"]["openai"].update(timeouts)
    return doc


def test_first_byte_timeout_is_a_504_that_names_it(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(timeout_config(upstream.url, first_byte_timeout_ms=300))
    mark = sup.mark()
    status, _, body = sup.request("GET", "/openai/slow-headers?delay_ms=3000", AUTH)
    assert status == 504
    error = json.loads(body)["error"]
    assert error["type"] == "upstream_timeout" and "first_byte_timeout_ms" in error["message"]
    line = sup.wait_for_log(r"request .*slow-headers", start=mark)
    assert " outcome=upstream_first_byte_timeout " in line


def test_idle_timeout_cuts_a_stream_that_goes_silent(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(timeout_config(upstream.url, idle_timeout_ms=500))
    mark = sup.mark()
    with rawhttp.Conn(sup.port) as conn:
        head = [rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY)]
        conn.send(rawhttp.build_request("GET", "/openai/sse?events=3&interval_ms=2000", head))
        resp = conn.read_head()
        assert resp.status == 200
        received = b"".join(conn.iter_chunks(resp))
    assert not resp.complete and received.count(b"data: ") == 1
    line = sup.wait_for_log(r"request .*request_url=\"/openai/sse", start=mark)
    assert " outcome=upstream_idle_timeout " in line


def test_a_stream_that_keeps_talking_is_not_idle(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(timeout_config(upstream.url, idle_timeout_ms=800))
    status, _, body = sup.request("GET", "/openai/sse?events=4&interval_ms=300", AUTH)
    assert status == 200 and body.count(b"data: event") == 4


@pytest.fixture
def never_accepts() -> Iterator[int]:
    """A port whose listen queue is full, so a new connection's SYN goes unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for s in [*fillers, listener]:
        s.close()


def test_connect_timeout_is_a_504_and_a_retryable_failure(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], never_accepts: int
) -> None:
    doc = proxy_config(upstream.url)
    doc["upstreams"]["openai"]["target_url"] = f"http://127.0.0.1:{never_accepts}"
    doc["upstreams"]["openai"]["connect_timeout_ms"] = 300
    sup = make_supervisor(doc)
    mark = sup.mark()
    started = time.monotonic()
    status, _, body = sup.request("GET", "/openai/v1/models", AUTH)
    assert status == 504 and "connect_timeout_ms" in json.loads(body)["error"]["message"]
    assert time.monotonic() - started < 3
    line = sup.wait_for_log(r"request .*request_url=/openai/v1/models", start=mark)
    assert " outcome=upstream_connect_timeout " in line


# --- units -------------------------------------------------------------------------------


def key(name: str, weight: int = 1) -> ProviderKey:
    return ProviderKey(name, weight, ("authorization", f"Bearer {name}"))


def test_smooth_weighted_round_robin_interleaves_by_weight() -> None:
    pool = KeyPool("u", (key("a", 5), key("b", 1), key("c", 1)))
    picks = [pool.keys[i].id for i in (pool.choose(0.0) for _ in range(7)) if i is not None]
    assert picks == ["a", "a", "b", "a", "c", "a", "a"]


def test_a_benched_key_is_skipped_until_its_bench_ends() -> None:
    pool = KeyPool("u", (key("a"), key("b")))
    pool.answered(0, 429, {"retry-after": "10"}, now=100.0)
    assert {pool.choose(105.0) for _ in range(4)} == {1}
    assert 0 in {pool.choose(110.5) for _ in range(4)}


def test_when_every_key_is_benched_the_soonest_free_still_gets_the_request() -> None:
    pool = KeyPool("u", (key("a"), key("b")))
    pool.answered(0, 429, {"retry-after": "20"}, now=0.0)
    pool.answered(1, 429, {"retry-after": "5"}, now=0.0)
    assert pool.choose(1.0) == 1
    assert pool.choose(1.0, frozenset({1})) == 0
    assert pool.choose(1.0, frozenset({0, 1})) is None


def test_a_429_without_retry_after_backs_off_exponentially_to_a_cap() -> None:
    pool = KeyPool("u", (key("a"),))
    benches = []
    for _ in range(9):
        pool.answered(0, 429, {}, now=0.0)
        benches.append(pool.benched_until[0])
    assert benches[:4] == [1.0, 2.0, 4.0, 8.0] and benches[-1] == BACKOFF_CAP
    pool.answered(0, 200, {}, now=0.0)
    pool.answered(0, 429, {}, now=0.0)
    assert pool.benched_until[0] == 1.0


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after-ms": "1500", "retry-after": "7"}, 1.5),
        ({"retry-after": "soon"}, None),
        ({}, None),
        ({"retry-after": "99999999"}, 3600.0),
    ],
)
def test_retry_after_in_seconds_or_milliseconds(headers: dict[str, str], seconds: float) -> None:
    assert retry_after(headers, wall_clock=0.0) == seconds


def test_retry_after_as_an_http_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert retry_after({"retry-after": date}, wall_clock=now.timestamp()) == 90.0


def body_of(*chunks: bytes, length: int | None = None, limit: int = 10) -> RequestBody:
    """A body as the app's receive() hands it over, kept up to `limit` bytes."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]  # fmt: skip

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    return RequestBody(receive, Exchange("POST", b"/", length, True), limit)


async def drain(body: RequestBody) -> bytes:
    return b"".join([chunk async for chunk in body.stream()])


@pytest.mark.parametrize(
    ("chunks", "length", "replayable"),
    [
        ((b"abc", b"def"), 6, True),
        ((b"abc", b"def"), None, True),  # chunked, within the limit
        ((b"abcdefgh", b"ijkl"), None, False),  # chunked, grew past the limit: dropped
        ((b"abcdefghijkl",), 12, False),  # announced past the limit: never kept
    ],
)
def test_only_a_body_within_the_limit_is_kept_for_a_replay(
    chunks: tuple[bytes, ...], length: int | None, replayable: bool
) -> None:
    body = body_of(*chunks, length=length)
    assert asyncio.run(drain(body)) == b"".join(chunks)
    assert body.replayable is replayable
    if replayable:
        assert asyncio.run(drain(body)) == b"".join(chunks)
    else:
        assert body.kept is None


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"api_key": "k", "api_keys": [{"id": "a", "key": "k2"}]}, "upstreams.u.api_keys"),
        ({"api_keys": []}, "upstreams.u.api_keys"),
        (
            {"api_keys": [{"id": "a", "key": "k"}, {"id": "a", "key": "k2"}]},
            "upstreams.u.api_keys[1].id",
        ),
        ({"api_keys": [{"id": "a", "key": "k", "weight": 0}]}, "upstreams.u.api_keys[0].weight"),
        ({"api_keys": [{"key": "k"}]}, "upstreams.u.api_keys[0].id"),
        ({"api_keys": [{"id": "a", "key": "k", "colour": 1}]}, "upstreams.u.api_keys[0].colour"),
        ({"retry_on": [200]}, "upstreams.u.retry_on[0]"),
        ({"max_attempts": 0}, "upstreams.u.max_attempts"),
        ({"retry_body_limit": -1}, "upstreams.u.retry_body_limit"),
        ({"idle_timeout_ms": 0}, "upstreams.u.idle_timeout_ms"),
        ({"connect_timeout_ms": 10**12}, "upstreams.u.connect_timeout_ms"),
    ],
)
def test_pool_and_failover_settings_are_validated_with_their_path(
    spec: dict[str, Any], path: str
) -> None:
    doc = {"version": 1, "upstreams": {"u": {"request_path": "/u",
                                             "target_url": "https://h", **spec}}}  # fmt: skip
    errors = validate(doc)
    assert path in [e.split(": ")[0] for e in errors], errors
    assert not [e for e in errors if "k2" in e]


def test_global_timeout_defaults_apply_unless_an_upstream_sets_its_own() -> None:
    doc = {
        "version": 1,
        "upstreams": {
            "request_timeout_ms": 9000, "connect_timeout_ms": 700, "idle_timeout_ms": 800,
            "a": {"request_path": "/a", "target_url": "https://h"},
            "b": {"request_path": "/b", "target_url": "https://h", "idle_timeout_ms": 100,
                  "first_byte_timeout_ms": 50},
        },
    }  # fmt: skip
    assert validate(doc) == []
    a, b = build_config(doc).upstreams
    assert (a.timeouts.request, a.timeouts.connect, a.timeouts.first_byte, a.timeouts.idle) == (
        9.0, 0.7, 9.0, 0.8)  # fmt: skip
    assert (b.timeouts.first_byte, b.timeouts.idle) == (0.05, 0.1)


def test_a_body_is_never_kept_where_no_replay_can_happen() -> None:
    body = body_of(b"abc", limit=-1)
    assert asyncio.run(drain(body)) == b"abc"
    assert body.kept is None and not body.replayable
