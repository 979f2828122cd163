"""The Redis limit backend (fluxgate/ratelimit_redis.py) against a real redis-server: each
limit refuses at its count with the right `Refusal`, several limiters ("machines") share one
count exactly, places come back on finish and after a crash, the day rolls over, and an
outage is a `LimitBackendError` that heals without a new limiter and never shows the password.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from fluxgate.ratelimit import (
    BUDGET,
    CONCURRENT,
    REQUESTS,
    TOKENS,
    LimitBackendError,
    Policy,
    Refusal,
)
from fluxgate.ratelimit_redis import RedisLimiter
from tests.conftest import RedisServer, redis_admin

T = TypeVar("T")
DAY_MS = 86_400_000


def run(body: Callable[[], Awaitable[T]]) -> T:
    """Run one test body in a fresh event loop (a worker's limiter lives in its loop)."""

    async def main() -> T:
        return await body()

    return asyncio.run(main())


@pytest.fixture
def server(empty_redis: RedisServer) -> RedisServer:
    return empty_redis


def bucket() -> str:
    return f"key-{uuid.uuid4().hex[:8]}"


async def admit_n(limiter: RedisLimiter, name: str, policy: Policy, n: int) -> list[Refusal | None]:
    return [await limiter.admit(name, policy) for _ in range(n)]


def test_requests_per_minute_refuses_the_request_after_the_limit(server: RedisServer) -> None:
    policy = Policy("p", requests_per_minute=3)
    name = bucket()

    async def body() -> list[Refusal | None]:
        limiter = RedisLimiter(server.url)
        try:
            answers = await admit_n(limiter, name, policy, 5)
            for _ in range(3):
                await limiter.finish(name, policy, 0)
            return answers
        finally:
            await limiter.close()

    answers = run(body)
    assert answers[:3] == [None, None, None]
    for refusal in answers[3:]:
        assert refusal is not None
        assert (refusal.limit, refusal.maximum, refusal.remaining) == (REQUESTS, 3, 0)
        assert 55 < refusal.reset <= 60
    window = redis_admin(server).hgetall(RedisLimiter(server.url).keys(name)[1])
    assert window == {"r": "3"}  # the refused ones counted nothing


def test_the_minute_window_starts_at_the_first_request_and_is_not_extended(
    server: RedisServer,
) -> None:
    policy = Policy("p", requests_per_minute=10)
    name = bucket()
    window_key = RedisLimiter(server.url).keys(name)[1]
    db = redis_admin(server)

    async def body() -> tuple[int, int]:
        limiter = RedisLimiter(server.url)
        try:
            assert await limiter.admit(name, policy) is None
            first = db.pttl(window_key)
            await asyncio.sleep(0.2)
            assert await limiter.admit(name, policy) is None
            return first, db.pttl(window_key)
        finally:
            await limiter.close()

    first, second = run(body)
    assert 59_000 < first <= 60_000
    assert second <= first - 150


def test_tokens_per_minute_refuses_once_the_window_is_spent(server: RedisServer) -> None:
    policy = Policy("p", tokens_per_minute=100)
    name = bucket()

    async def body() -> Refusal | None:
        limiter = RedisLimiter(server.url)
        try:
            assert await limiter.admit(name, policy) is None
            await limiter.finish(name, policy, 60)
            assert await limiter.admit(name, policy) is None  # 60 < 100
            await limiter.finish(name, policy, 50)  # one request may overshoot
            return await limiter.admit(name, policy)
        finally:
            await limiter.close()

    refusal = run(body)
    assert refusal is not None
    assert (refusal.limit, refusal.maximum, refusal.remaining) == (TOKENS, 100, 0)
    assert 55 < refusal.reset <= 60
    assert redis_admin(server).hgetall(RedisLimiter(server.url).keys(name)[1]) == {
        "r": "2",
        "t": "110",
    }


def test_finish_after_the_window_ended_charges_a_new_window(server: RedisServer) -> None:
    """A request longer than its window (a long stream) still counts against tokens_per_minute."""
    policy = Policy("p", tokens_per_minute=100)
    name = bucket()
    window_key = RedisLimiter(server.url).keys(name)[1]
    db = redis_admin(server)

    async def body() -> Refusal | None:
        limiter = RedisLimiter(server.url)
        try:
            assert await limiter.admit(name, policy) is None
            db.delete(window_key)  # the window ended while the request ran
            await limiter.finish(name, policy, 150)
            return await limiter.admit(name, policy)
        finally:
            await limiter.close()

    refusal = run(body)
    assert refusal is not None and refusal.limit == TOKENS
    assert db.hgetall(window_key) == {"t": "150"}
    assert 59_000 < db.pttl(window_key) <= 60_000


def test_tokens_per_day_refuses_until_utc_midnight(server: RedisServer) -> None:
    policy = Policy("p", tokens_per_day=1000)
    name = bucket()
    day_key = RedisLimiter(server.url).keys(name)[2]
    db = redis_admin(server)

    async def body() -> Refusal | None:
        limiter = RedisLimiter(server.url)
        try:
            assert await limiter.admit(name, policy) is None
            await limiter.finish(name, policy, 999)
            assert await limiter.admit(name, policy) is None
            await limiter.finish(name, policy, 1)
            return await limiter.admit(name, policy)
        finally:
            await limiter.close()

    refusal = run(body)
    seconds, micros = db.time()
    now_ms = seconds * 1000 + micros // 1000
    until_midnight_ms = DAY_MS - now_ms % DAY_MS
    assert refusal is not None
    assert (refusal.limit, refusal.maximum, refusal.remaining) == (BUDGET, 1000, 0)
    assert abs(refusal.reset * 1000 - until_midnight_ms) < 2000
    assert db.hget(day_key, "t") == "1000"
    # The key expires by itself one second after midnight.
    assert abs(db.pttl(day_key) - (until_midnight_ms + 1000)) < 2000


def test_the_day_rolls_over_at_utc_midnight_and_its_key_expires(server: RedisServer) -> None:
    policy = Policy("p", tokens_per_day=100)
    name = bucket()
    day_key = RedisLimiter(server.url).keys(name)[2]
    db = redis_admin(server)
    midnight = (time.time() // 86_400 + 1) * 86_400
    now = [midnight - 0.3]

    async def body() -> tuple[Refusal | None, Refusal | None]:
        limiter = RedisLimiter(server.url, clock=lambda: now[0])
        try:
            assert await limiter.admit(name, policy) is None
            await limiter.finish(name, policy, 100)
            before = await limiter.admit(name, policy)
            now[0] = midnight + 0.01
            after = await limiter.admit(name, policy)
            return before, after
        finally:
            await limiter.close()

    before, after = run(body)
    assert before is not None and before.limit == BUDGET
    assert 0.2 < before.reset <= 0.3
    assert after is None  # a new day counts from 0, whether or not the old key is gone yet
    assert 0 < db.pttl(day_key) <= 1300
    deadline = time.monotonic() + 5
    while db.exists(day_key):
        assert time.monotonic() < deadline, "the day key did not expire"
        time.sleep(0.05)


def test_concurrency_refuses_at_the_limit_and_finish_gives_places_back(
    server: RedisServer,
) -> None:
    policy = Policy("p", concurrent_requests=2)
    name = bucket()

    async def body() -> None:
        limiter = RedisLimiter(server.url, concurrency_ttl=30)
        try:
            assert await admit_n(limiter, name, policy, 2) == [None, None]
            refusal = await limiter.admit(name, policy)
            assert refusal is not None
            assert (refusal.limit, refusal.maximum, refusal.remaining) == (CONCURRENT, 2, 0)
            assert 29 < refusal.reset <= 30  # until the oldest place expires at the latest
            await limiter.finish(name, policy, 0)
            assert await limiter.admit(name, policy) is None
            assert await limiter.admit(name, policy) is not None
            for _ in range(2):
                await limiter.finish(name, policy, 0)
            assert redis_admin(server).exists(limiter.keys(name)[0]) == 0  # nothing left in flight
            assert await admit_n(limiter, name, policy, 2) == [None, None]
        finally:
            await limiter.close()

    run(body)


def test_a_crashed_limiters_places_expire_after_the_ttl(server: RedisServer) -> None:
    policy = Policy("p", concurrent_requests=2)
    name = bucket()

    async def body() -> None:
        crashed = RedisLimiter(server.url, concurrency_ttl=0.5)
        assert await admit_n(crashed, name, policy, 2) == [None, None]
        await crashed.close()  # and never calls finish
        other = RedisLimiter(server.url)
        try:
            refusal = await other.admit(name, policy)
            assert refusal is not None and refusal.limit == CONCURRENT
            assert 0 < refusal.reset <= 0.5
            await asyncio.sleep(refusal.reset + 0.05)
            assert await admit_n(other, name, policy, 2) == [None, None]
            assert await other.admit(name, policy) is not None
        finally:
            await other.close()

    run(body)


def test_the_limits_are_checked_in_order_concurrency_requests_tokens_day(
    server: RedisServer,
) -> None:
    policy = Policy(
        "p", concurrent_requests=1, requests_per_minute=2, tokens_per_minute=10, tokens_per_day=10
    )
    name = bucket()

    async def body() -> list[str]:
        limiter = RedisLimiter(server.url)
        seen = []
        try:
            assert await limiter.admit(name, policy) is None
            refusal = await limiter.admit(name, policy)  # every limit but concurrency is fine
            seen.append(refusal.limit if refusal else "admitted")
            await limiter.finish(name, policy, 10)  # tokens and day now spent too
            assert await limiter.admit(name, policy) is not None
            seen.append(refusal.limit if (refusal := await limiter.admit(name, policy)) else "")
            redis_admin(server).delete(limiter.keys(name)[1])  # a new minute: day still spent
            seen.append(refusal.limit if (refusal := await limiter.admit(name, policy)) else "")
            return seen
        finally:
            await limiter.close()

    assert run(body) == [CONCURRENT, TOKENS, BUDGET]


def test_a_refusal_counts_nothing(server: RedisServer) -> None:
    policy = Policy("p", concurrent_requests=1, requests_per_minute=5)
    name = bucket()

    async def body() -> None:
        limiter = RedisLimiter(server.url)
        try:
            assert await limiter.admit(name, policy) is None
            for _ in range(10):
                assert await limiter.admit(name, policy) is not None
            keys = limiter.keys(name)
            assert redis_admin(server).hget(keys[1], "r") == "1"
            assert redis_admin(server).zcard(keys[0]) == 1
        finally:
            await limiter.close()

    run(body)


def share(server: RedisServer, policy: Policy, name: str, machines: int, each: int) -> int:
    """`machines` limiters, each in its own thread and event loop, admit `each` requests of
    one bucket at once (none finishes): how many were admitted in all."""
    barrier = threading.Barrier(machines)
    admitted = [0] * machines

    def machine(index: int) -> None:
        async def body() -> int:
            limiter = RedisLimiter(server.url, max_connections=8)
            try:
                await limiter.admit(bucket(), Policy("warm-up", requests_per_minute=1))
                barrier.wait()
                answers = await asyncio.gather(*(limiter.admit(name, policy) for _ in range(each)))
                return sum(answer is None for answer in answers)
            finally:
                await limiter.close()

        admitted[index] = run(body)

    threads = [threading.Thread(target=machine, args=(i,)) for i in range(machines)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return sum(admitted)


def test_two_machines_share_one_buckets_requests_exactly(server: RedisServer) -> None:
    name = bucket()
    assert share(server, Policy("p", requests_per_minute=100), name, 2, 150) == 100
    assert redis_admin(server).hget(RedisLimiter(server.url).keys(name)[1], "r") == "100"


def test_two_machines_share_one_buckets_places_exactly(server: RedisServer) -> None:
    assert share(server, Policy("p", concurrent_requests=10), bucket(), 2, 40) == 10


def test_buckets_have_keys_of_their_own_whatever_their_names(server: RedisServer) -> None:
    policy = Policy("p", requests_per_minute=1)
    limiter = RedisLimiter(server.url)
    names = ["ci", "ci:w", "ci}:w", "{ci}", "sub with spaces", "ü-subject", ""]
    keys = [k for name in names for k in limiter.keys(name)]
    assert len(set(keys)) == len(keys)
    assert all(k.startswith("fluxgate:{") for k in keys)
    assert not any(name and name in k for name in names[1:] for k in keys)

    async def body() -> list[Refusal | None]:
        other = RedisLimiter(server.url)
        try:
            return [await other.admit(name, policy) for name in names]
        finally:
            await other.close()

    assert run(body) == [None] * len(names)  # one request each: no bucket counted another's


def test_a_policy_without_limits_needs_no_round_trip() -> None:
    async def body() -> Refusal | None:
        limiter = RedisLimiter("redis://127.0.0.1:1/0")  # nothing listens there
        try:
            refusal = await limiter.admit("ci", Policy("none"))
            await limiter.finish("ci", Policy("none"), 100)
            return refusal
        finally:
            await limiter.close()

    assert run(body) is None


def leaked(error: BaseException, secret: str) -> bool:
    text = "".join(traceback.format_exception(error)) + repr(error) + str(error)
    return secret in text


def test_redis_stopped_is_a_backend_error_and_its_return_heals_the_same_limiter(
    server: RedisServer,
) -> None:
    policy = Policy("p", concurrent_requests=5, requests_per_minute=100, tokens_per_day=10**6)
    name = bucket()
    errors: list[LimitBackendError] = []

    async def expect_error(call: Awaitable[Any]) -> float:
        started = time.monotonic()
        with pytest.raises(LimitBackendError) as caught:
            await call
        errors.append(caught.value)
        return time.monotonic() - started

    async def body() -> None:
        limiter = RedisLimiter(server.url)
        try:
            assert await limiter.admit(name, policy) is None  # a pooled connection exists
            server.stop()
            try:
                assert await expect_error(limiter.admit(name, policy)) < 2
                assert await expect_error(limiter.finish(name, policy, 10)) < 2
            finally:
                server.start()  # empty: no data, no scripts (NOSCRIPT reloads them)
            assert await limiter.admit(name, policy) is None
            await limiter.finish(name, policy, 10)
            assert redis_admin(server).hget(limiter.keys(name)[1], "r") == "1"
        finally:
            await limiter.close()

    run(body)
    assert len(errors) == 2
    for error in errors:
        assert "ConnectionError" in str(error)
        assert f"127.0.0.1:{server.port}" in str(error)
        assert not leaked(error, server.password)


def test_a_flushed_script_cache_is_filled_again(server: RedisServer) -> None:
    policy = Policy("p", requests_per_minute=10)

    async def body() -> None:
        limiter = RedisLimiter(server.url)
        try:
            assert await limiter.admit("a", policy) is None
            redis_admin(server).script_flush()
            assert await limiter.admit("a", policy) is None
            await limiter.finish("a", policy, 5)
        finally:
            await limiter.close()

    run(body)


def test_the_password_never_shows_in_an_error(server: RedisServer) -> None:
    wrong = "wrong-password-51e7d2"
    urls = [
        f"redis://:{wrong}@127.0.0.1:{server.port}/0",  # refused by AUTH
        f"redis://user:{wrong}@127.0.0.1:{server.port}/0",
        f"redis://:{wrong}@127.0.0.1:1/0",  # nothing listens
    ]

    async def body() -> list[LimitBackendError]:
        errors = []
        for url in urls:
            limiter = RedisLimiter(url)
            try:
                with pytest.raises(LimitBackendError) as caught:
                    await limiter.admit("ci", Policy("p", requests_per_minute=1))
                errors.append(caught.value)
            finally:
                await limiter.close()
        return errors

    for error in run(body):
        assert not leaked(error, wrong), error
    with pytest.raises(ValueError) as bad:
        RedisLimiter(f"http://:{wrong}@127.0.0.1:{server.port}/0")
    assert not leaked(bad.value, wrong)


def test_one_round_trip_per_admit_and_one_per_finish(server: RedisServer) -> None:
    policy = Policy(
        "p", requests_per_minute=100, tokens_per_minute=10**6, concurrent_requests=5,
        tokens_per_day=10**6,
    )  # fmt: skip
    db = redis_admin(server)

    async def body() -> None:
        limiter = RedisLimiter(server.url)
        try:
            # The connection's own commands (AUTH…), each script's first NOSCRIPT and load.
            await limiter.admit("warm", policy)
            await limiter.finish("warm", policy, 1)
            db.config_resetstat()
            for _ in range(10):
                assert await limiter.admit("a", policy) is None
                await limiter.finish("a", policy, 7)
        finally:
            await limiter.close()

    run(body)
    calls = {name: stats["calls"] for name, stats in db.info("commandstats").items()}
    assert calls.pop("cmdstat_evalsha") == 20
    assert calls.pop("cmdstat_info", None) is None
    called_by_client = {"cmdstat_evalsha", "cmdstat_auth", "cmdstat_client|setinfo"}
    assert called_by_client.isdisjoint(calls)  # all else ran inside the scripts


def test_many_tasks_queue_for_a_small_pool_without_errors(server: RedisServer) -> None:
    policy = Policy("p", requests_per_minute=10**6, concurrent_requests=10**6)

    async def body() -> None:
        limiter = RedisLimiter(server.url, max_connections=4)

        async def task() -> None:
            for _ in range(50):
                assert await limiter.admit("q", policy) is None
                await limiter.finish("q", policy, 1)

        try:
            await asyncio.gather(*(task() for _ in range(64)))
        finally:
            await limiter.close()

    run(body)
    assert redis_admin(server).hget(RedisLimiter(server.url).keys("q")[1], "r") == str(64 * 50)


def test_round_trip_cost_per_request_on_loopback(server: RedisServer) -> None:
    """One admit and one finish (two round trips) with all four limits, timed in a loop."""
    policy = Policy(
        "p",
        requests_per_minute=10**9,
        tokens_per_minute=10**9,
        concurrent_requests=10**6,
        tokens_per_day=10**12,
    )
    n = 2000

    async def body() -> float:
        limiter = RedisLimiter(server.url)
        try:
            for _ in range(100):  # warm up: the connection, the scripts
                await limiter.admit("bench", policy)
                await limiter.finish("bench", policy, 10)
            started = time.perf_counter()
            for _ in range(n):
                await limiter.admit("bench", policy)
                await limiter.finish("bench", policy, 10)
            return (time.perf_counter() - started) / n
        finally:
            await limiter.close()

    per_request = run(body)
    print(f"\nadmit+finish on loopback: {per_request * 1e6:.0f} µs per request")
    assert per_request < 0.02  # a loose bound: two shared cores
