"""The Redis limit backend: counts shared by several machines in an existing Redis.

`RedisLimiter` implements `fluxgate.ratelimit.Limiter` with the semantics of
its docstring. Each worker builds its own, inside its running event loop,
from `limits.redis_url` (`redis://[[user]:password@]host:port/db` or
`rediss://`).

- One round trip per `admit` and one per `finish`: each is one Lua script,
  run with EVALSHA (`register_script`; after a Redis restart has emptied the
  script cache, redis-py's script object loads it again on NOSCRIPT).
- Time is Redis's own (`TIME` inside the script), never the caller's: every
  Fluxgate machine counts in the same windows and the same UTC day whatever
  its clock says. (Redis 5+ replicates scripts by their effects, so reading
  the time before writing is allowed.)
- A bucket's keys, `fluxgate:{<sha256 of the bucket>}:<kind>`: the bucket
  (a config id or a JWT subject) is hashed, so no subject can name another
  bucket's keys; the braces are a Redis Cluster hash tag that puts a
  bucket's keys in one slot. Every key expires by itself:
  - `…:c`, the requests in flight: a sorted set of request ids scored by the
    time their place expires (`concurrency_ttl`), so the places of a worker
    that died are given back; expired ids are dropped before counting;
  - `…:w`, the minute window: a hash (`r` requests, `t` tokens) created with
    a 60 s expiry by the bucket's first request (or a `finish` that finds no
    window: see below);
  - `…:d`, the UTC day: a hash (`d` day number, `t` tokens) that expires
    one second after the next UTC midnight; a `d` other than today counts 0.
- `finish` charges tokens to the bucket's current minute window, starting
  one when there is none: a request that outlived its window (any stream
  longer than 60 s) would otherwise never count against
  `tokens_per_minute`.
- The request ids: the interface gives `finish` no handle to its `admit`, so
  each limiter keeps, per bucket, a FIFO of the ids it admitted and not yet
  finished; `finish` removes the oldest. All of one limiter's ids for a
  bucket are alike, and the oldest is the first to expire anyway.
- Errors (refused connection, timeout, any Redis error) raise
  `LimitBackendError` naming the error's type and the server's host and
  port, never the URL's password; the caller applies `on_backend_error`.
  A pooled connection found dead is retried once at once, on a new
  connection (after a Redis restart), on a connection error only: a timeout
  is not retried. redis-py reconnects by itself once Redis answers again.
- Each worker has its own pool of at most `max_connections` (16) with
  `socket_timeout` (0.5 s) for a connect and for each reply. Calls queue for
  a connection first come first served (an `asyncio.Semaphore`: redis-py's
  plain pool raises at once when every connection is busy, and its blocking
  pool let waiters starve past their timeout under a steady load), for at
  most `socket_timeout` too. So a call takes at most about three times
  `socket_timeout` (wait, connect, reply) before `LimitBackendError`.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import os
from collections.abc import Callable
from typing import Any, Final

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .ratelimit import (
    BUDGET,
    CONCURRENT,
    REQUESTS,
    TOKENS,
    LimitBackendError,
    Limiter,
    Policy,
    Refusal,
)

DEFAULT_PREFIX: Final = "fluxgate:"
# Longer than any request may last (streams included); a place held longer is
# given back by expiry even though its request is still running.
DEFAULT_CONCURRENCY_TTL: Final = 900.0
DEFAULT_MAX_CONNECTIONS: Final = 16
DEFAULT_SOCKET_TIMEOUT: Final = 0.5  # seconds: connect, and each reply

# Both scripts' clock, in ms: ARGV[1] when a test gives one, else Redis's own
# TIME, so that every Fluxgate machine agrees on windows and the UTC day.
_NOW: Final = """
local function clock()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: concurrency zset, minute window hash, day hash.
# ARGV: now in ms ('' = Redis's TIME), concurrent max (-1: none), request id,
#       id ttl ms, requests per minute (-1), tokens per minute (-1), tokens per day (-1).
# Returns {0} when admitted, else {limit (1-4), maximum, remaining, reset ms}.
_ADMIT: Final = (
    _NOW
    + """
local now = clock()
local cmax = tonumber(ARGV[2])
local ttl = tonumber(ARGV[4])
local rpm = tonumber(ARGV[5])
local tpm = tonumber(ARGV[6])
local tpd = tonumber(ARGV[7])
if cmax >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= cmax then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    local reset = 0
    if first[2] then reset = tonumber(first[2]) - now end
    return {1, cmax, 0, reset}
  end
end
local window = rpm >= 0 or tpm >= 0
local wttl = -2
if window then
  local v = redis.call('HMGET', KEYS[2], 'r', 't')
  wttl = redis.call('PTTL', KEYS[2])
  if rpm >= 0 and (tonumber(v[1]) or 0) >= rpm then return {2, rpm, 0, wttl} end
  if tpm >= 0 and (tonumber(v[2]) or 0) >= tpm then return {3, tpm, 0, wttl} end
end
if tpd >= 0 then
  local day = math.floor(now / 86400000)
  local v = redis.call('HMGET', KEYS[3], 'd', 't')
  local spent = 0
  if tonumber(v[1]) == day then spent = tonumber(v[2]) or 0 end
  if spent >= tpd then return {4, tpd, 0, (day + 1) * 86400000 - now} end
end
if cmax >= 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if window then
  redis.call('HINCRBY', KEYS[2], 'r', 1)
  if wttl < 0 then redis.call('PEXPIRE', KEYS[2], 60000) end
end
return {0}
"""
)

# KEYS: as _ADMIT. ARGV: now in ms ('' = TIME), request id ('' = none), tokens,
# charge the minute window ('1'/'0'), charge the day ('1'/'0').
_FINISH: Final = (
    _NOW
    + """
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[1], ARGV[2]) end
local tokens = tonumber(ARGV[3])
if tokens <= 0 then return 0 end
if ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[2], 't', tokens)
  if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIRE', KEYS[2], 60000) end
end
if ARGV[5] == '1' then
  local now = clock()
  local day = math.floor(now / 86400000)
  if tonumber(redis.call('HGET', KEYS[3], 'd')) == day then
    redis.call('HINCRBY', KEYS[3], 't', tokens)
  else
    redis.call('HSET', KEYS[3], 'd', day, 't', tokens)
  end
  redis.call('PEXPIRE', KEYS[3], (day + 1) * 86400000 - now + 1000)
end
return 0
"""
)

_LIMITS: Final = {1: CONCURRENT, 2: REQUESTS, 3: TOKENS, 4: BUDGET}


def _limit_arg(value: int | None) -> int:
    return -1 if value is None else value


class RedisLimiter(Limiter):
    """One worker's limiter on a Redis shared by every Fluxgate machine.

    `url`: `redis://` or `rediss://`, with the password (if any) in it.
    `max_connections`: this worker's pool; a call waits up to
    `socket_timeout` for a free connection. `socket_timeout` bounds the
    connect and each reply. `concurrency_ttl` (seconds): how long a place
    is held when its `finish` never comes (a worker crashed). `clock`, for
    tests only: a Unix time in seconds used instead of Redis's `TIME` for
    the day and the places' expiry.
    """

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        concurrency_ttl: float = DEFAULT_CONCURRENCY_TTL,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] | None = None,
    ) -> None:
        try:
            pool: ConnectionPool = ConnectionPool.from_url(
                url,
                max_connections=max_connections,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
        except ValueError:
            # Its message may quote the URL, password included.
            raise ValueError("not a redis:// or rediss:// URL") from None
        kwargs = pool.connection_kwargs
        self.where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        self._redis: Redis = Redis.from_pool(pool)
        # Calls wait their turn here, first come first served, so the pool (which would
        # raise at once when all its connections are busy) never runs out.
        self._turns = asyncio.Semaphore(max_connections)
        self._wait = socket_timeout
        self._admit = self._redis.register_script(_ADMIT)
        self._finish = self._redis.register_script(_FINISH)
        self._ttl_ms = max(1, round(concurrency_ttl * 1000))
        self._prefix = prefix
        self._clock = clock
        self._ids = itertools.count()
        self._id_prefix = os.urandom(8).hex() + ":"
        self._in_flight: dict[str, collections.deque[str]] = {}
        self._keys: dict[str, tuple[str, str, str]] = {}

    def keys(self, bucket: str) -> tuple[str, str, str]:
        """The bucket's three keys: in flight, minute window, day."""
        keys = self._keys.get(bucket)
        if keys is None:
            if len(self._keys) >= 10_000:
                self._keys.clear()
            tag = hashlib.sha256(bucket.encode("utf-8", "surrogatepass")).hexdigest()[:32]
            base = f"{self._prefix}{{{tag}}}:"
            keys = self._keys[bucket] = (base + "c", base + "w", base + "d")
        return keys

    def _now(self) -> str:
        return "" if self._clock is None else str(round(self._clock() * 1000))

    async def _run(self, script: Any, keys: tuple[str, str, str], args: list[Any]) -> Any:
        try:
            async with asyncio.timeout(self._wait):
                await self._turns.acquire()
        except TimeoutError:
            raise LimitBackendError(f"redis at {self.where}: all connections busy") from None
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as error:
            raise LimitBackendError(f"redis at {self.where}: {type(error).__name__}") from error
        finally:
            self._turns.release()

    async def admit(self, bucket: str, policy: Policy) -> Refusal | None:
        concurrent = policy.concurrent_requests
        if (
            concurrent is None
            and policy.requests_per_minute is None
            and policy.tokens_per_minute is None
            and policy.tokens_per_day is None
        ):
            return None
        request_id = "" if concurrent is None else f"{self._id_prefix}{next(self._ids)}"
        args = [
            self._now(),
            _limit_arg(concurrent),
            request_id,
            self._ttl_ms,
            _limit_arg(policy.requests_per_minute),
            _limit_arg(policy.tokens_per_minute),
            _limit_arg(policy.tokens_per_day),
        ]
        answer = await self._run(self._admit, self.keys(bucket), args)
        code = int(answer[0])
        if code:
            return Refusal(
                limit=_LIMITS[code],
                maximum=int(answer[1]),
                remaining=int(answer[2]),
                reset=max(0.0, int(answer[3]) / 1000),
            )
        if request_id:
            self._in_flight.setdefault(bucket, collections.deque()).append(request_id)
        return None

    async def finish(self, bucket: str, policy: Policy, tokens: int) -> None:
        request_id = ""
        ids = self._in_flight.get(bucket)
        if ids:
            request_id = ids.popleft()
            if not ids:
                del self._in_flight[bucket]
        per_minute = tokens > 0 and policy.tokens_per_minute is not None
        per_day = tokens > 0 and policy.tokens_per_day is not None
        if not (request_id or per_minute or per_day):
            return
        args = [self._now(), request_id, tokens, int(per_minute), int(per_day)]
        await self._run(self._finish, self.keys(bucket), args)

    async def close(self) -> None:
        await self._redis.aclose()
