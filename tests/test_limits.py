"""Per-key limits and token budgets (README "Limits and budgets"), end to end with the
local backend: a real supervisor with two workers, the fake provider, raw sockets and
the official SDK. The backends themselves: test_limits_local.py, test_limits_redis.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from demo.fake_upstream import FakeUpstreamThread
from fluxgate.validation import validate
from tests import rawhttp
from tests.conftest import (
    CLIENT_KEY,
    JWT_SECRET,
    LIMITED_KEY,
    RedisServer,
    make_jwt,
    proxy_config,
)
from tests.promtext import value, wait_for
from tests.supervisor_process import Supervisor

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


def limited_config(upstream: FakeUpstreamThread, jwt_by: str = "kid", **policy: int) -> Any:
    doc = proxy_config(upstream.url)
    doc["limits"] = {"policies": {"team": policy}}
    doc["api_keys"]["static"][0]["limits"] = "team"  # id "ci"; "limited" has no policy
    doc["api_keys"]["jwt"][0].update({"limits": "team", "limit_by": jwt_by})
    doc["upstreams"]["openai"]["usage"] = "openai"
    return doc


def start(
    make_supervisor: Callable[..., Supervisor], doc: Any, tmp_path: Path, **kwargs: Any
) -> Supervisor:
    """A supervisor, two workers unless told otherwise, with its state directory."""
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    kwargs.setdefault("workers", 2)
    sup: Supervisor = make_supervisor(doc, env={"STATE_DIRECTORY": str(state)}, **kwargs)
    return sup


def chat(port: int, key: str = CLIENT_KEY) -> rawhttp.Response:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = [rawhttp.host(port), rawhttp.bearer(key), ("Content-Length", str(len(body)))]
    return rawhttp.request(port, "POST", "/openai/v1/chat/completions", headers, body)


def test_requests_per_minute_is_exact_across_two_workers(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    sup = start(make_supervisor, limited_config(upstream, requests_per_minute=20), tmp_path)
    headers = [rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(
            lambda _: rawhttp.request(sup.port, "GET", "/openai/v1/models", headers), range(50)
        ))  # fmt: skip
    assert Counter(r.status for r in responses) == {200: 20, 429: 30}
    assert len(upstream.requests) == 20  # nothing refused reached the provider
    refused = next(r for r in responses if r.status == 429)
    assert json.loads(refused.body)["error"]["type"] == "rate_limited"
    assert 1 <= int(refused.header("retry-after") or b"0") <= 60
    assert refused.header("x-ratelimit-limit-requests") == b"20"
    assert refused.header("x-ratelimit-remaining-requests") == b"0"
    assert (refused.header("x-ratelimit-reset-requests") or b"").endswith(b"s")
    line = sup.wait_for_log(r"request .*status=429")
    assert " outcome=rate_limited " in line and " limit=requests " in line
    labels = {"key_id": "ci", "limit": "requests"}
    samples = wait_for(sup.url, "fluxgate_rate_limited_total", 30, **labels)
    assert value(samples, "fluxgate_rate_limited_total", **labels) == 30


def test_concurrent_requests_are_bounded_and_given_back(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    sup = start(make_supervisor, limited_config(upstream, concurrent_requests=2), tmp_path)
    head = [rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY)]
    streams = [rawhttp.Conn(sup.port) for _ in range(2)]
    heads = []
    for conn in streams:
        conn.send(rawhttp.build_request("GET", "/openai/sse?events=2&interval_ms=700", head))
        heads.append(conn.read_head())
        assert heads[-1].status == 200
    refused = rawhttp.request(sup.port, "GET", "/openai/v1/models", head)
    assert refused.status == 429 and refused.header("x-ratelimit-limit-concurrent") == b"2"
    assert refused.header("retry-after") == b"1"
    for conn, resp in zip(streams, heads, strict=True):
        with conn:
            b"".join(conn.iter_chunks(resp))  # the rest of the stream, to its end
    sup.wait_for_log(r"request .*sse.*status=200")
    assert rawhttp.request(sup.port, "GET", "/openai/v1/models", head).status == 200


def test_tokens_per_minute_refuses_once_the_window_is_spent(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    sup = start(make_supervisor, limited_config(upstream, tokens_per_minute=2), tmp_path)
    first = chat(sup.port)
    assert first.status == 200 and json.loads(first.body)["usage"]["total_tokens"] > 2
    sup.wait_for_log(r"request .*chat/completions.*status=200")
    second = chat(sup.port)
    assert second.status == 429 and second.header("x-ratelimit-limit-tokens") == b"2"
    assert chat(sup.port, LIMITED_KEY).status in (200, 404)  # a key without a policy: free


def test_tokens_per_day_survive_a_restart_of_the_service(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    doc = limited_config(upstream, tokens_per_day=2)
    sup = start(make_supervisor, doc, tmp_path)
    assert chat(sup.port).status == 200
    sup.wait_for_log(r"request .*chat/completions.*status=200")
    sup.stop()
    again = start(make_supervisor, doc, tmp_path, port=sup.port)
    refused = chat(again.port)
    assert refused.status == 429 and refused.header("x-ratelimit-limit-budget") == b"2"


def test_a_lowered_limit_applies_at_once_and_a_reload_keeps_the_counts(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    doc = limited_config(upstream, requests_per_minute=100)
    sup = start(make_supervisor, doc, tmp_path)
    for _ in range(5):
        assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 200
    doc["limits"]["policies"]["team"]["requests_per_minute"] = 5
    sup.write_config(doc)
    sup.wait_for_generation(2)
    assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 429


def test_limit_by_sub_gives_each_token_subject_its_own_bucket(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    sup = start(make_supervisor, limited_config(upstream, "sub", requests_per_minute=1), tmp_path)

    def status(subject: str) -> int:
        token = make_jwt(sub=subject, jti=f"{subject}-{time.monotonic_ns()}")
        return sup.request("GET", "/openai/v1/models", {"Authorization": f"Bearer {token}"})[0]

    assert [status("alice"), status("alice"), status("bob")] == [200, 429, 200]


def test_a_forwarded_response_carries_no_rate_limit_header_of_ours(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    sup = start(make_supervisor, limited_config(upstream, requests_per_minute=10), tmp_path)
    status, headers, _ = sup.request("GET", "/openai/v1/models", AUTH)
    assert status == 200 and not [h for h in headers if h.lower().startswith("x-ratelimit")]


def test_the_openai_sdk_sees_the_429_and_retries_after_retry_after(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    sup = start(make_supervisor, limited_config(upstream, concurrent_requests=1), tmp_path)
    head = [rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY)]
    busy = rawhttp.Conn(sup.port)
    busy.send(rawhttp.build_request("GET", "/openai/sse?events=2&interval_ms=600", head))
    stream = busy.read_head()
    assert stream.status == 200

    def drain() -> None:
        with busy:
            b"".join(busy.iter_chunks(stream))

    threading.Thread(target=drain, daemon=True).start()
    mark = sup.mark()
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{sup.port}/openai/v1", api_key=CLIENT_KEY, max_retries=3
    )
    reply = client.chat.completions.create(
        model="fake-gpt", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content
    assert [x for x in sup.lines[mark:] if "status=429" in x and "limit=concurrent" in x]


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (
            {"api_keys": {"static": [{"id": "a", "key": "k", "limits": "nope"}]}},
            "api_keys.static[0].limits",
        ),
        ({"api_keys": {"static": [{"key": "k", "limits": "team"}]}}, "api_keys.static[0].id"),
        (
            {"api_keys": {"jwt": [{"id": "j", "key": JWT_SECRET, "limit_by": "ip"}]}},
            "api_keys.jwt[0].limit_by",
        ),
        (
            {"limits": {"backend": "redis", "policies": {"team": {"concurrent_requests": 1}}}},
            "limits.redis_url",
        ),
        ({"limits": {"backend": "memcached"}}, "limits.backend"),
        ({"limits": {"on_backend_error": "maybe"}}, "limits.on_backend_error"),
        ({"limits": {"redis_url": "http://:sekrit-pw@h:6379"}}, "limits.redis_url"),
        (
            {"limits": {"policies": {"team": {"requests_per_minute": 0}}}},
            "limits.policies.team.requests_per_minute",
        ),
        (
            {"limits": {"policies": {"team": {"requests_per_hour": 5}}}},
            "limits.policies.team.requests_per_hour",
        ),
        ({"limits": {"colour": "red"}}, "limits.colour"),
    ],
)
def test_limits_settings_are_validated_with_their_path(change: dict[str, Any], path: str) -> None:
    doc: dict[str, Any] = {
        "version": 1,
        "limits": {"policies": {"team": {"concurrent_requests": 1}}},
    }
    doc.update(change)
    errors = validate(doc)
    assert path in [e.split(": ")[0] for e in errors], errors
    assert not [e for e in errors if "sekrit-pw" in e]


# --- backend: redis ----------------------------------------------------------------------


def redis_config(
    upstream: FakeUpstreamThread, url: str, on_error: str = "allow", **policy: int
) -> Any:
    doc = limited_config(upstream, **policy)
    doc["limits"].update({"backend": "redis", "redis_url": url, "on_backend_error": on_error})
    return doc


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The suite's redis-server, emptied: each test's buckets start at zero."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


def test_two_instances_share_a_keys_limit_through_redis(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], redis_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    doc = redis_config(upstream, redis_url, requests_per_minute=10)
    first, second = (start(make_supervisor, doc, tmp_path) for _ in range(2))
    statuses = Counter(
        sup.request("GET", "/openai/v1/models", AUTH)[0]
        for _ in range(8)
        for sup in (first, second)
    )
    assert statuses == {200: 10, 429: 6}


def test_each_limit_kind_with_redis(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor], redis_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    sup = start(make_supervisor, redis_config(upstream, redis_url, tokens_per_minute=2,
                                              concurrent_requests=1), tmp_path)  # fmt: skip
    head = [rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY)]
    with rawhttp.Conn(sup.port) as busy:
        busy.send(rawhttp.build_request("GET", "/openai/sse?events=2&interval_ms=500", head))
        stream = busy.read_head()
        refused = rawhttp.request(sup.port, "GET", "/openai/v1/models", head)
        assert refused.status == 429 and refused.header("x-ratelimit-limit-concurrent") == b"1"
        b"".join(busy.iter_chunks(stream))
    sup.wait_for_log(r"request .*sse.*status=200")
    assert chat(sup.port).status == 200  # 3 tokens, over the 2 a minute
    sup.wait_for_log(r"request .*chat/completions.*status=200")
    refused = chat(sup.port)
    assert refused.status == 429 and refused.header("x-ratelimit-limit-tokens") == b"2"


def test_redis_down_allows_with_one_warning_and_recovers_without_a_restart(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor],
    redis_server: RedisServer, redis_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    doc = redis_config(upstream, redis_url, requests_per_minute=1000)
    sup = start(make_supervisor, doc, tmp_path, workers=1)
    assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 200
    redis_server.stop()
    try:
        mark = sup.mark()
        for _ in range(3):
            assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 200
        sup.wait_for_log(r"request .*status=200", start=mark)
        warnings = [x for x in sup.lines[mark:] if "limit backend unreachable" in x]
        assert len(warnings) == 1 and redis_server.password not in warnings[0]
        doc["limits"]["on_backend_error"] = "deny"
        sup.write_config(doc)
        sup.wait_for_generation(2)
        status, _, body = sup.request("GET", "/openai/v1/models", AUTH)
        assert status == 503 and json.loads(body)["error"]["type"] == "limit_backend_unavailable"
    finally:
        redis_server.start()
    mark = sup.mark()
    assert sup.request("GET", "/openai/v1/models", AUTH)[0] == 200
    sup.wait_for_log(r"limit backend answering again", start=mark)
    samples = wait_for(sup.url, "fluxgate_limit_backend_errors_total", 4)
    assert value(samples, "fluxgate_limit_backend_errors_total") >= 4


def test_redis_down_under_concurrent_requests_answers_each_as_on_backend_error_says(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor],
    redis_server: RedisServer, redis_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    """Calls of many requests in flight go to Redis together (one batch): each request gets
    the answer `on_backend_error` gives, and each worker warns once."""
    doc = redis_config(upstream, redis_url, "deny", requests_per_minute=10**6)
    sup = start(make_supervisor, doc, tmp_path)
    headers = [rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY)]

    def statuses(count: int) -> Counter[int]:
        with ThreadPoolExecutor(16) as pool:
            return Counter(pool.map(
                lambda _: rawhttp.request(sup.port, "GET", "/openai/v1/models", headers).status,
                range(count),
            ))  # fmt: skip

    assert statuses(8) == {200: 8}
    redis_server.stop()
    try:
        mark = sup.mark()
        assert statuses(48) == {503: 48}
        doc["limits"]["on_backend_error"] = "allow"
        sup.write_config(doc)
        sup.wait_for_generation(2)
        assert statuses(48) == {200: 48}
        sup.wait_for_log(r"request .*status=200", start=mark)
        warnings = [x for x in sup.lines[mark:] if "limit backend unreachable" in x]
        assert 1 <= len(warnings) <= 2  # one per worker
    finally:
        redis_server.start()
    assert statuses(8) == {200: 8}
