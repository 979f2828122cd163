"""Per-key limits and token budgets: the policy model, the limiter interface, and the outage rule.

README "Limits and budgets". A policy (`limits.policies` in the YAML) bounds
a bucket: one static key, one JWT kid, or one JWT subject (`limit_by: sub`).
Every request of a bucket with a policy is admitted by the worker's
`Limiter` before anything is sent upstream, and finished when it ends:

- requests per minute and concurrent requests are counted at admission;
- tokens (input + output, as the provider reported them) are charged at the
  end, so a request is refused once its bucket's minute window or UTC day is
  already spent (one request may overshoot by its own size);
- a minute window starts with a bucket's first request and lasts 60 s; the
  day is the UTC calendar day.

Two backends implement `Limiter` with the same semantics:
`fluxgate.ratelimit_local` (shared memory among the workers of one machine,
no infrastructure) and `fluxgate.ratelimit_redis` (counts shared by several
machines in an existing Redis). When the backend cannot answer, the
configured `on_backend_error` decides (`BackendHealth`).
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Final, TypeAlias

from .logs import log_fields

if TYPE_CHECKING:
    from .usage import Tap

log = logging.getLogger("fluxgate.limits")

# The four limits, as the 429's headers, the log line and the metrics name them.
REQUESTS: Final = "requests"  # requests_per_minute
TOKENS: Final = "tokens"  # tokens_per_minute
CONCURRENT: Final = "concurrent"  # concurrent_requests
BUDGET: Final = "budget"  # tokens_per_day
WINDOW_SECONDS: Final = 60.0
# A policy's settings, as the YAML names them.
POLICY_LIMITS: Final = (
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent_requests",
    "tokens_per_day",
)


@dataclass(frozen=True, slots=True)
class Policy:
    """One `limits.policies` entry; None where the policy sets no such limit."""

    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None
    tokens_per_day: int | None = None


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """The `limits:` section."""

    backend: str = "local"  # local | redis
    redis_url: str | None = field(default=None, repr=False)  # may carry a password
    on_backend_error: str = "allow"  # allow | deny


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is over its bucket's limit: what the 429 says."""

    limit: str  # REQUESTS, TOKENS, CONCURRENT or BUDGET
    maximum: int  # the policy's value for that limit
    remaining: int  # what is left in the window (0 when refused)
    reset: float  # seconds until the window starts anew (the day: until UTC midnight)


# A request's tokens, or a function that counts them (`finish_soon`).
Tokens: TypeAlias = "int | Callable[[], int]"


def tokens_used(usage: Tap) -> int:
    """What a request charges: input + output tokens, as the provider reported them."""
    found = usage.result()
    return (found.input_tokens or 0) + (found.output_tokens or 0) if found else 0


class LimitBackendError(Exception):
    """The backend could not answer (Redis unreachable, a timeout)."""


class Limiter(abc.ABC):
    """One worker's view of the counts. Methods are coroutines so that a
    network backend fits; the local one never waits."""

    @abc.abstractmethod
    async def admit(self, bucket: str, policy: Policy) -> Refusal | None:
        """Count one request of `bucket` against `policy`.

        Refuses (returns a `Refusal`, counting nothing) when the bucket is at
        its concurrency limit, has used its requests of the current minute
        window, or has already spent its tokens of the minute window or the
        UTC day; checked in that order. Otherwise counts the request and takes
        a concurrency place, and returns None: `finish` must then be called
        exactly once. Raises `LimitBackendError` when it cannot tell.
        """

    # True for a backend that answers without waiting (the local one): the
    # proxy then calls `admit_now`, and no coroutine is made per request.
    immediate: ClassVar[bool] = False

    def admit_now(self, bucket: str, policy: Policy) -> Refusal | None:
        """`admit`, without a coroutine, where `immediate`."""
        raise NotImplementedError

    @abc.abstractmethod
    async def finish(self, bucket: str, policy: Policy, tokens: int) -> None:
        """An admitted request ended: give its concurrency place back and charge
        `tokens` to the bucket's minute window and UTC day. Raises
        `LimitBackendError` when it cannot."""

    def finish_soon(
        self,
        bucket: str,
        policy: Policy,
        tokens: Tokens,
        on_error: Callable[[LimitBackendError], None],
    ) -> None:
        """`finish` for a request that has nothing left to wait for: done in the
        background (a backend sends it with other calls), `on_error` hearing of
        its `LimitBackendError`. `tokens` may be a function that counts them (it
        parses the usage): called once, later, off the request's path. Call it
        inside the event loop. Here, `finish` in a task; the backends do better."""
        task = asyncio.get_running_loop().create_task(self._finish_later(bucket, policy, tokens))
        _background.add(task)
        task.add_done_callback(lambda done: _finished(done, on_error))

    async def _finish_later(self, bucket: str, policy: Policy, tokens: Tokens) -> None:
        await self.finish(bucket, policy, tokens if isinstance(tokens, int) else tokens())

    async def close(self) -> None:  # noqa: B027 - optional: most backends hold nothing
        """Release connections (a network backend); the local one has none."""


_background: set[asyncio.Task[None]] = set()  # finish_soon's tasks, kept until done


def _finished(task: asyncio.Task[None], on_error: Callable[[LimitBackendError], None]) -> None:
    _background.discard(task)
    error = None if task.cancelled() else task.exception()
    if isinstance(error, LimitBackendError):
        on_error(error)
    elif error is not None:
        raise error  # a bug, not an outage: the loop's exception handler logs it


class BackendHealth:
    """The outage rule shared by the backends' callers: one WARNING when the
    backend starts failing, one INFO when it answers again, and the count of
    failures for `fluxgate_limit_backend_errors_total`."""

    __slots__ = ("down", "errors")

    def __init__(self) -> None:
        self.down = False
        self.errors = 0

    def failed(self, backend: str, error: BaseException, decision: str) -> None:
        self.errors += 1
        if not self.down:
            self.down = True
            log_fields(
                log,
                logging.WARNING,
                "limit backend unreachable",
                backend=backend,
                error=type(error).__name__,
                on_backend_error=decision,
            )

    def answered(self, backend: str) -> None:
        if self.down:
            self.down = False
            log_fields(log, logging.INFO, "limit backend answering again", backend=backend)
