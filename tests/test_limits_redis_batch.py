"""The Redis limit backend's batches (fluxgate/ratelimit_redis.py, ratelimit_redis_batch.py)
against a real redis-server: the calls made together go out as one EVALSHA and are answered
as if made one by one (a refused call beside an admitted one, places given back before
admitting, one bucket under two policies, more calls than one batch holds), a script cache
emptied under a batch, an outage that fails every call of a batch, a bucket whose keys raise
failing its own calls only, tokens counted when the batch goes, and a cancelled admission's
place given back.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from fluxgate.ratelimit import CONCURRENT, REQUESTS, TOKENS, LimitBackendError, Policy, Refusal
from fluxgate.ratelimit_redis import MAX_BATCH, RedisLimiter
from tests.conftest import RedisServer, redis_admin
from tests.test_limits_redis import bucket, run


@pytest.fixture
def server(empty_redis: RedisServer) -> RedisServer:
    return empty_redis


def evalsha_calls(db: redis.Redis) -> int:
    return int(db.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


async def warm(limiter: RedisLimiter) -> None:
    """A connection made and the script loaded, so that what follows is one EVALSHA a batch."""
    await limiter.admit(bucket(), Policy("warm-up", requests_per_minute=1))


def refused(answer: Refusal | BaseException | None, limit: str) -> bool:
    return isinstance(answer, Refusal) and answer.limit == limit


def test_a_batch_admits_the_first_calls_the_limit_allows_and_refuses_the_rest(
    server: RedisServer,
) -> None:
    policy = Policy("p", requests_per_minute=4)
    name = bucket()
    db = redis_admin(server)

    async def body() -> tuple[list[Refusal | None], int]:
        limiter = RedisLimiter(server.url)
        try:
            await warm(limiter)
            before = evalsha_calls(db)
            answers = await asyncio.gather(*(limiter.admit(name, policy) for _ in range(10)))
            return answers, evalsha_calls(db) - before
        finally:
            await limiter.close()

    answers, round_trips = run(body)
    assert round_trips == 1
    assert answers[:4] == [None] * 4
    for refusal in answers[4:]:
        assert refusal is not None
        assert (refusal.limit, refusal.maximum, refusal.remaining) == (REQUESTS, 4, 0)
        assert 55 < refusal.reset <= 60  # the window this batch opened
    assert db.hgetall(RedisLimiter(server.url).keys(name)[1]) == {"r": "4"}


def test_one_batch_refuses_a_bucket_at_its_limit_and_admits_another(server: RedisServer) -> None:
    policy = Policy("p", concurrent_requests=1)
    full, free = bucket(), bucket()
    db = redis_admin(server)

    async def body() -> tuple[list[Refusal | None], int]:
        limiter = RedisLimiter(server.url, concurrency_ttl=30)
        try:
            assert await limiter.admit(full, policy) is None
            before = evalsha_calls(db)
            answers = await asyncio.gather(limiter.admit(full, policy), limiter.admit(free, policy))
            return answers, evalsha_calls(db) - before
        finally:
            await limiter.close()

    (first, second), round_trips = run(body)
    assert round_trips == 1
    assert first is not None and first.limit == CONCURRENT and 29 < first.reset <= 30
    assert second is None


def test_a_batch_gives_places_back_and_charges_tokens_before_it_admits(
    server: RedisServer,
) -> None:
    name = bucket()
    db = redis_admin(server)
    policy = Policy("p", concurrent_requests=1, tokens_per_minute=100)

    async def body() -> tuple[Refusal | None, Refusal | None]:
        limiter = RedisLimiter(server.url)
        errors: list[LimitBackendError] = []
        try:
            assert await limiter.admit(name, policy) is None
            before = evalsha_calls(db)
            # In one loop turn: a request ends, and another comes for its place.
            limiter.finish_soon(name, policy, 60, errors.append)
            in_its_place = await limiter.admit(name, policy)
            assert evalsha_calls(db) - before == 1
            limiter.finish_soon(name, policy, 50, errors.append)
            over_tokens = await limiter.admit(name, policy)
            assert errors == []
            return in_its_place, over_tokens
        finally:
            await limiter.close()

    in_its_place, over_tokens = run(body)
    assert in_its_place is None  # the place given back, 60 tokens of 100
    assert over_tokens is not None and over_tokens.limit == TOKENS  # 110 charged first


def test_one_bucket_under_two_policies_in_one_batch_counts_as_one_by_one(
    server: RedisServer,
) -> None:
    """A reload that lowers a limit while calls of the old policy wait: each call is
    checked against its own policy, on the counts the calls before it made."""
    name = bucket()
    old, new = Policy("p", requests_per_minute=5), Policy("p", requests_per_minute=3)

    async def body() -> list[Refusal | None]:
        limiter = RedisLimiter(server.url)
        try:
            await warm(limiter)
            calls = [limiter.admit(name, old) for _ in range(2)]
            calls += [limiter.admit(name, new) for _ in range(2)]
            calls += [limiter.admit(name, old) for _ in range(3)]
            return await asyncio.gather(*calls)
        finally:
            await limiter.close()

    answers = run(body)
    # The old policy's five calls first, all within its 5 a minute; then the new
    # policy's two, refused: 5 requests counted already, over its 3.
    assert answers[:2] == [None, None]
    assert answers[4:] == [None, None, None]
    assert all(refused(answer, REQUESTS) for answer in answers[2:4])
    assert answers[2] is not None and answers[2].maximum == 3


def test_more_calls_than_one_batch_holds_are_counted_exactly(server: RedisServer) -> None:
    policy = Policy("p", requests_per_minute=MAX_BATCH + 50)
    name = bucket()

    async def body() -> list[Refusal | None]:
        limiter = RedisLimiter(server.url)
        try:
            return await asyncio.gather(*(limiter.admit(name, policy) for _ in range(300)))
        finally:
            await limiter.close()

    answers = run(body)
    assert answers.count(None) == MAX_BATCH + 50
    assert all(refused(answer, REQUESTS) for answer in answers if answer is not None)


def test_many_tasks_share_round_trips_and_their_counts_are_exact(server: RedisServer) -> None:
    policy = Policy("p", requests_per_minute=10**6, tokens_per_minute=10**9, concurrent_requests=64)
    name = bucket()
    db = redis_admin(server)

    async def body() -> int:
        limiter = RedisLimiter(server.url)
        errors: list[LimitBackendError] = []

        async def task() -> None:
            for _ in range(20):
                assert await limiter.admit(name, policy) is None
                await asyncio.sleep(0)  # the request, forwarded
                limiter.finish_soon(name, policy, 3, errors.append)

        await warm(limiter)
        before = evalsha_calls(db)
        try:
            await asyncio.gather(*(task() for _ in range(64)))
        finally:
            await limiter.close()  # sends the last finishes
        assert errors == []
        return evalsha_calls(db) - before

    round_trips = run(body)
    calls = 64 * 20 * 2
    assert round_trips < calls / 8, round_trips
    keys = RedisLimiter(server.url).keys(name)
    assert db.hgetall(keys[1]) == {"r": str(64 * 20), "t": str(64 * 20 * 3)}
    assert db.exists(keys[0]) == 0  # every place given back


def test_a_flushed_script_cache_under_a_batch_is_filled_again(server: RedisServer) -> None:
    policy = Policy("p", requests_per_minute=10)
    name = bucket()
    db = redis_admin(server)

    async def body() -> list[Refusal | None]:
        limiter = RedisLimiter(server.url)
        try:
            assert await limiter.admit(name, policy) is None
            db.script_flush()
            return await asyncio.gather(*(limiter.admit(name, policy) for _ in range(5)))
        finally:
            await limiter.close()

    assert run(body) == [None] * 5
    assert db.hget(RedisLimiter(server.url).keys(name)[1], "r") == "6"  # each counted once


def test_redis_stopped_fails_every_call_of_a_batch_and_heals(server: RedisServer) -> None:
    policy = Policy("p", concurrent_requests=100, requests_per_minute=1000, tokens_per_day=10**6)
    name = bucket()
    finish_errors: list[LimitBackendError] = []

    async def body() -> tuple[list[Refusal | BaseException | None], float]:
        limiter = RedisLimiter(server.url)
        try:
            for _ in range(3):
                assert await limiter.admit(name, policy) is None
            server.stop()
            try:
                started = time.monotonic()
                for _ in range(3):
                    limiter.finish_soon(name, policy, 10, finish_errors.append)
                calls = (limiter.admit(name, policy) for _ in range(6))
                answers = await asyncio.gather(*calls, return_exceptions=True)
                seconds = time.monotonic() - started
            finally:
                server.start()
            assert await limiter.admit(name, policy) is None  # the same limiter, healed
            return answers, seconds
        finally:
            await limiter.close()

    answers, seconds = run(body)
    assert seconds < 2
    assert len(answers) == 6 and all(isinstance(a, LimitBackendError) for a in answers)
    assert len(finish_errors) == 3
    for error in [*answers, *finish_errors]:
        assert "ConnectionError" in str(error)
        assert server.password not in str(error)


def test_a_bucket_whose_keys_raise_fails_its_own_calls_only(server: RedisServer) -> None:
    policy = Policy("p", concurrent_requests=5, requests_per_minute=10)
    broken, sound = bucket(), bucket()
    db = redis_admin(server)
    db.set(RedisLimiter(server.url).keys(broken)[0], "not a sorted set")

    async def body() -> list[Refusal | BaseException | None]:
        limiter = RedisLimiter(server.url)
        try:
            calls = [limiter.admit(broken, policy), limiter.admit(sound, policy)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await limiter.close()

    broken_answer, sound_answer = run(body)
    assert isinstance(broken_answer, LimitBackendError)
    assert sound_answer is None
    assert db.hget(RedisLimiter(server.url).keys(broken)[1], "r") is None  # nothing counted


def test_finish_soon_counts_its_tokens_when_its_batch_goes(server: RedisServer) -> None:
    policy = Policy("p", tokens_per_minute=1000, tokens_per_day=10**6)
    name = bucket()
    db = redis_admin(server)
    counted: list[int] = []

    def count() -> int:  # what parsing the response's usage gives
        counted.append(42)
        return 42

    async def body() -> None:
        limiter = RedisLimiter(server.url)
        errors: list[LimitBackendError] = []
        try:
            assert await limiter.admit(name, policy) is None
            limiter.finish_soon(name, policy, count, errors.append)
            assert counted == []  # not on the request's path
            assert await limiter.admit(name, policy) is None  # the next batch
            assert counted == [42] and errors == []
        finally:
            await limiter.close()

    run(body)
    keys = RedisLimiter(server.url).keys(name)
    assert db.hget(keys[1], "t") == "42" and db.hget(keys[2], "t") == "42"


def test_close_sends_the_finishes_still_queued(server: RedisServer) -> None:
    policy = Policy("p", concurrent_requests=2)
    name = bucket()

    async def body() -> None:
        limiter = RedisLimiter(server.url)
        assert await limiter.admit(name, policy) is None
        limiter.finish_soon(name, policy, 0, lambda error: None)
        await limiter.close()

    run(body)
    assert redis_admin(server).exists(RedisLimiter(server.url).keys(name)[0]) == 0


def test_a_cancelled_admission_gives_its_place_back(server: RedisServer) -> None:
    policy = Policy("p", concurrent_requests=1)
    name = bucket()
    db = redis_admin(server)
    places = RedisLimiter(server.url).keys(name)[0]

    async def body() -> Refusal | None:
        limiter = RedisLimiter(server.url)
        try:
            await warm(limiter)
            waiting = asyncio.get_running_loop().create_task(limiter.admit(name, policy))
            await asyncio.sleep(0)  # its call is queued, not yet answered
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await asyncio.sleep(0.1)  # its batch admits it; the next gives its place back
            assert db.exists(places) == 0
            return await limiter.admit(name, policy)
        finally:
            await limiter.close()

    assert run(body) is None
