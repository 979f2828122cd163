"""`Limiter.finish_soon` (fluxgate/ratelimit.py), what the proxy ends a request with: the
interface's default (finish in a task, its backend error to `on_error`), the local backend's
(the place back at once, tokens counted and charged within TOKEN_DELAY, off the request's
path), and what a request charges (`tokens_used`).
"""

from __future__ import annotations

import asyncio
import os

from fluxgate.ratelimit import (
    TOKENS,
    LimitBackendError,
    Limiter,
    Policy,
    Refusal,
    tokens_used,
)
from fluxgate.ratelimit_local import TOKEN_DELAY, LocalLimiter, LocalTable
from fluxgate.usage import Tap, open_tap


class Unreachable(Limiter):
    """A backend that cannot finish anything: what the default does with its error."""

    def __init__(self) -> None:
        self.finished: list[int] = []

    async def admit(self, bucket: str, policy: Policy) -> Refusal | None:
        return None

    async def finish(self, bucket: str, policy: Policy, tokens: int) -> None:
        self.finished.append(tokens)
        raise LimitBackendError("unreachable")


def test_the_default_finish_soon_finishes_in_a_task_and_tells_its_error() -> None:
    errors: list[LimitBackendError] = []

    async def body() -> list[int]:
        limiter = Unreachable()
        limiter.finish_soon("b", Policy("p", tokens_per_minute=10), lambda: 7, errors.append)
        assert limiter.finished == []  # not on the caller's path
        await asyncio.sleep(0.01)
        return limiter.finished

    assert asyncio.run(body()) == [7]
    assert [str(error) for error in errors] == ["unreachable"]


def test_the_local_finish_soon_gives_the_place_back_and_counts_tokens_later() -> None:
    table = LocalTable(capacity=64, slots=2)
    table.reset_slot(0)
    policy = Policy("p", concurrent_requests=1, tokens_per_minute=100)
    counted: list[int] = []

    def count() -> int:  # what parsing the response's usage gives
        counted.append(150)
        return 150

    async def body() -> tuple[Refusal | None, Refusal | None]:
        limiter = LocalLimiter(table, 0)
        assert limiter.admit_now("b", policy) is None
        limiter.finish_soon("b", policy, count, lambda error: None)
        in_its_place = limiter.admit_now("b", policy)  # the place is back at once
        assert counted == []  # the usage not parsed on the request's path
        limiter.finish_soon("b", policy, 0, lambda error: None)
        await asyncio.sleep(TOKEN_DELAY * 3)
        assert counted == [150]
        over = limiter.admit_now("b", policy)
        await limiter.close()
        return in_its_place, over

    in_its_place, over = asyncio.run(body())
    assert in_its_place is None
    assert over is not None and over.limit == TOKENS
    os.close(table.fd)


def test_the_local_close_counts_and_charges_what_waits() -> None:
    table = LocalTable(capacity=64, slots=2)
    table.reset_slot(0)
    policy = Policy("p", tokens_per_minute=100)

    async def body() -> None:
        limiter = LocalLimiter(table, 0)
        assert limiter.admit_now("b", policy) is None
        limiter.finish_soon("b", policy, lambda: 100, lambda error: None)
        await limiter.close()  # the worker's shutdown, before the timer

    asyncio.run(body())
    refusal = LocalLimiter(table, 1).admit_now("b", policy)
    assert refusal is not None and refusal.limit == TOKENS
    os.close(table.fd)


def answered(body: bytes) -> Tap:
    """The usage tap of a JSON response with `body`, fed as a relay feeds it."""
    tap = open_tap("openai", 200, {"content-type": "application/json"}, len(body))
    assert tap is not None
    tap.feed(body)
    return tap


def test_a_request_charges_its_input_and_output_tokens() -> None:
    usage = b'{"usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21,'
    usage += b' "prompt_tokens_details": {"cached_tokens": 5}}}'
    assert tokens_used(answered(usage)) == 21
    assert tokens_used(answered(b'{"usage": {"prompt_tokens": 12}}')) == 12
    assert tokens_used(answered(b'{"id": "no usage"}')) == 0
