"""The Redis limit backend: counts shared by several machines in an existing Redis.

`RedisLimiter` implements `fluxgate.ratelimit.Limiter` with the semantics of
its docstring. Each worker builds its own, inside its running event loop,
from `limits.redis_url` (`redis://[[user]:password@]host:port/db` or
`rediss://`).

- Batches: the calls a worker makes while a batch is out (or within one
  turn of its event loop when none is) go out together as ONE `EVALSHA` of
  a Lua script: one round trip, one reply, however many (at most
  `MAX_BATCH`). A script runs atomically, so each check is atomic (the
  whole batch is). Per bucket, the script first gives back the places and
  charges the tokens of the batch's finishes, then admits, in the order
  they came, the batch's requests of each policy, as many as the limits
  allow; the others are refused for the limit the first of them meets.
  That is what admitting them one by one gives: the calls of one batch were
  all in flight together, so any order among them is one they could have
  had, and this one never refuses a request for a place already given
  back. Each bucket's keys are read once and written once per batch, so
  the cost of a call (Python's and Redis's) is shared by the requests in
  flight. A lone request still makes one round trip to be admitted and one
  when it ends; `finish_soon` (what the proxy uses) sends the second with
  the next batch and counts its tokens then, without making the request
  wait. There is one batch out at a time; a second goes beside it (on
  another connection of the pool) only when a whole batch waits. A busy
  worker, whose last batch had `BUSY` calls or more, lets its event loop run
  `HOLD_TURNS` turns (within `HOLD`, a millisecond) before the next, so
  that more calls join it; a loop with nothing else to do runs them at once,
  so the worker never sits idle while its requests wait to be admitted.
- After a Redis restart has emptied the script cache, the NOSCRIPT reply
  (nothing ran) makes the batch go again behind a `SCRIPT LOAD`, in one
  round trip.
- Time is Redis's own (`TIME` inside the script, once per batch), never the
  caller's: every Fluxgate machine counts in the same windows and the same
  UTC day whatever its clock says. (Redis 5+ replicates scripts by their
  effects, so reading the time before writing is allowed.)
- A bucket's keys, `fluxgate:{<sha256 of the bucket>}:<kind>`: the bucket
  (a config id or a JWT subject) is hashed, so no subject can name another
  bucket's keys; the braces are a Redis Cluster hash tag that puts a
  bucket's keys in one slot. Every key expires by itself:
  - `…:c`, the requests in flight: a sorted set of request ids scored by the
    time their place expires (`concurrency_ttl`), so the places of a worker
    that died are given back; expired ids are dropped before a refusal;
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
  bucket are alike, and the oldest is the first to expire anyway. An
  `admit` cancelled while its batch was out gives its place back if the
  batch admitted it.
- Errors (refused connection, timeout, any Redis error) raise
  `LimitBackendError` in every call of the batch (or, from a bucket's keys,
  in that bucket's calls only), naming the error's type and the server's
  host and port, never the URL's password; the caller applies
  `on_backend_error`, and `finish_soon` hands its errors to its `on_error`.
  A batch that met a dead connection goes again once at once, on a new
  connection (after a Redis restart), on a connection error only: a
  timeout is not retried. The next batch connects again by itself.
- Each worker has its own pool of at most `max_connections` (16).
  `socket_timeout` (0.5 s) bounds a connect, and a batch's send and reply.
  So a call takes at most about three times `socket_timeout` (the batch
  out before it, connect, reply) before `LimitBackendError`.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import os
import time
from collections.abc import Callable
from typing import Any, Final

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from . import ratelimit_redis_batch as batch
from .ratelimit import (
    BUDGET,
    CONCURRENT,
    REQUESTS,
    TOKENS,
    LimitBackendError,
    Limiter,
    Policy,
    Refusal,
    Tokens,
)
from .ratelimit_redis_batch import ADMITTED, FAILED, Admission, Finish, Waiter, bulk, integer

DEFAULT_PREFIX: Final = "fluxgate:"
# Longer than any request may last (streams included); a place held longer is
# given back by expiry even though its request is still running.
DEFAULT_CONCURRENCY_TTL: Final = 900.0
DEFAULT_MAX_CONNECTIONS: Final = 16
DEFAULT_SOCKET_TIMEOUT: Final = 0.5  # seconds: a connect; a batch's send and reply
# Calls in one script run: Redis serves nothing else while a script runs.
MAX_BATCH: Final = 128
# A busy worker's wait before its next batch (the module's docstring, `_hold`):
# its last batch had BUSY calls or more; HOLD_TURNS turns of its event loop,
# within HOLD seconds.
BUSY: Final = 4
HOLD_TURNS: Final = 16
HOLD: Final = 0.001

_LIMITS: Final = {b"1": CONCURRENT, b"2": REQUESTS, b"3": TOKENS, b"4": BUDGET}


class RedisLimiter(Limiter):
    """One worker's limiter on a Redis shared by every Fluxgate machine.

    `url`: `redis://` or `rediss://`, with the password (if any) in it.
    `max_connections`: this worker's pool (see the module's docstring).
    `socket_timeout` bounds a connect, and a batch's send and reply.
    `concurrency_ttl` (seconds): how long a place is held when its `finish`
    never comes (a worker crashed). `clock`, for tests only: a Unix time in
    seconds used instead of Redis's `TIME` for the day and the places' expiry.
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
            # A factory of connections (the URL, TLS, AUTH, SELECT); the limiter keeps
            # the ones it made. No socket timeout of redis-py's: its wait_for costs a
            # task per send, and the limiter bounds each batch's round trip itself.
            self._pool: ConnectionPool = ConnectionPool.from_url(
                url,
                max_connections=max_connections,
                socket_timeout=None,
                socket_connect_timeout=socket_timeout,
                retry=Retry(NoBackoff(), 0),  # the limiter retries a whole batch itself
            )
        except ValueError:
            # Its message may quote the URL, password included.
            raise ValueError("not a redis:// or rediss:// URL") from None
        kwargs = self._pool.connection_kwargs
        self.where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        self._timeout = socket_timeout
        self._max_connections = max(1, max_connections)
        self._idle: list[AbstractConnection] = []  # the connections no sender holds
        self._ttl_arg = integer(max(1, round(concurrency_ttl * 1000)))
        self._prefix = prefix
        self._clock = clock
        self._ids = itertools.count()
        self._id_prefix = os.urandom(8).hex().encode() + b":"
        self._in_flight: dict[str, collections.deque[bytes]] = {}
        self._keys: dict[str, tuple[tuple[str, str, str], bytes]] = {}
        self._limits: dict[Policy, bytes | None] = {}
        self._admissions: list[Admission] = []
        self._finishes: list[Finish] = []
        self._scheduled = False
        self._senders: set[asyncio.Task[None]] = set()  # each with a batch out
        # Admissions whose caller was cancelled: their place, if they got one, goes back.
        self._abandoned: dict[asyncio.Future[bytes], tuple[bytes, bytes]] = {}

    def keys(self, bucket: str) -> tuple[str, str, str]:
        """The bucket's three keys: in flight, minute window, day."""
        return self._bucket(bucket)[0]

    def _bucket(self, bucket: str) -> tuple[tuple[str, str, str], bytes]:
        """The bucket's keys, and as the script's arguments (made once)."""
        entry = self._keys.get(bucket)
        if entry is None:
            if len(self._keys) >= 10_000:
                self._keys.clear()
            tag = hashlib.sha256(bucket.encode("utf-8", "surrogatepass")).hexdigest()[:32]
            base = f"{self._prefix}{{{tag}}}:"
            keys = (base + "c", base + "w", base + "d")
            entry = self._keys[bucket] = (keys, b"".join(bulk(k.encode()) for k in keys))
        return entry

    def _policy(self, policy: Policy) -> bytes | None:
        """The policy's four limits as the script's arguments (made once); None
        for a policy that sets none."""
        try:
            return self._limits[policy]
        except KeyError:
            pass
        limits = (
            policy.concurrent_requests,
            policy.requests_per_minute,
            policy.tokens_per_minute,
            policy.tokens_per_day,
        )
        packed = None
        if any(limit is not None for limit in limits):
            packed = b"".join(integer(-1 if limit is None else limit) for limit in limits)
        if len(self._limits) >= 1_000:  # policies are few, but each reload makes new ones
            self._limits.clear()
        self._limits[policy] = packed
        return packed

    # The calls

    async def admit(self, bucket: str, policy: Policy) -> Refusal | None:
        limits = self._policy(policy)
        if limits is None:
            return None
        request_id = b""
        if policy.concurrent_requests is not None:
            request_id = b"%s%d" % (self._id_prefix, next(self._ids))
        keys = self._bucket(bucket)[1]
        waiter = asyncio.get_running_loop().create_future()
        self._admissions.append((keys, limits, request_id, waiter))
        self._wake()
        try:
            answer = await waiter
        except asyncio.CancelledError:
            if request_id:
                self._abandoned[waiter] = (keys, request_id)
            raise
        if answer == ADMITTED:
            if request_id:
                ids = self._in_flight.get(bucket)
                if ids is None:
                    ids = self._in_flight[bucket] = collections.deque()
                ids.append(request_id)
            return None
        if answer == FAILED:
            raise LimitBackendError(f"redis at {self.where}: ResponseError")
        limit, _, reset = answer.partition(b":")
        name = _LIMITS[limit]
        maximum = {
            CONCURRENT: policy.concurrent_requests,
            REQUESTS: policy.requests_per_minute,
            TOKENS: policy.tokens_per_minute,
            BUDGET: policy.tokens_per_day,
        }[name]
        assert maximum is not None, "the script checks only the limits the policy sets"
        return Refusal(name, maximum, 0, max(0.0, int(reset) / 1000))

    async def finish(self, bucket: str, policy: Policy, tokens: int) -> None:
        waiter = asyncio.get_running_loop().create_future()
        if self._finish(bucket, policy, tokens, waiter) and await waiter == FAILED:
            raise LimitBackendError(f"redis at {self.where}: ResponseError")

    def finish_soon(
        self,
        bucket: str,
        policy: Policy,
        tokens: Tokens,
        on_error: Callable[[LimitBackendError], None],
    ) -> None:
        """`finish`, sent with the next batch (its tokens counted then); nothing
        waits for its answer."""
        self._finish(bucket, policy, tokens, on_error)

    def _finish(self, bucket: str, policy: Policy, tokens: Tokens, waiter: Waiter) -> bool:
        """Queue a finish; False when there is nothing to tell Redis."""
        request_id = b""
        ids = self._in_flight.get(bucket)
        if ids:
            request_id = ids.popleft()
            if not ids:
                del self._in_flight[bucket]
        per_minute = policy.tokens_per_minute is not None
        per_day = policy.tokens_per_day is not None
        if isinstance(tokens, int) and tokens <= 0:
            per_minute = per_day = False
        if not (request_id or per_minute or per_day):
            return False
        keys = self._bucket(bucket)[1]
        self._finishes.append((keys, request_id, tokens, per_minute, per_day, waiter))
        self._wake()
        return True

    # The batches

    def _wake(self) -> None:
        if not self._scheduled and self._sender_wanted():
            # Not at once: the calls made in the rest of this loop turn join the batch.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _sender_wanted(self) -> bool:
        """One batch out at a time, so that the calls made meanwhile make the
        next one; another beside it only when a whole batch waits."""
        senders = len(self._senders)
        return not senders or (
            senders < self._max_connections
            and len(self._admissions) + len(self._finishes) >= MAX_BATCH
        )

    def _start(self) -> None:
        self._scheduled = False
        if (self._admissions or self._finishes) and self._sender_wanted():
            self._senders.add(asyncio.get_running_loop().create_task(self._sender()))

    async def _sender(self) -> None:
        """Send batches on one connection, one after the other, while calls wait."""
        connection = self._idle.pop() if self._idle else self._new_connection()
        try:
            while self._admissions or self._finishes:
                finishes, admissions = self._finishes, self._admissions
                if len(finishes) + len(admissions) <= MAX_BATCH:
                    self._finishes, self._admissions = [], []
                else:
                    self._finishes, finishes = finishes[MAX_BATCH:], finishes[:MAX_BATCH]
                    room = MAX_BATCH - len(finishes)
                    self._admissions, admissions = admissions[room:], admissions[:room]
                await self._send(connection, admissions, finishes)
                await _hold(len(admissions) + len(finishes) >= BUSY)
        finally:
            self._idle.append(connection)
            # At once, not in a done callback: a call made before that runs would
            # see a sender that sends nothing more.
            self._senders.discard(asyncio.current_task())
            if (self._admissions or self._finishes) and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._start)

    def _new_connection(self) -> AbstractConnection:
        connection: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        return connection

    async def _send(
        self, connection: AbstractConnection, admissions: list[Admission], finishes: list[Finish]
    ) -> None:
        try:
            buckets = batch.group(admissions, finishes)
            now = b"" if self._clock is None else b"%d" % round(self._clock() * 1000)
            reply = await self._call(connection, batch.payload(buckets, now, self._ttl_arg))
            answered = list(batch.answers(buckets, reply))
        except asyncio.CancelledError:
            for *_, future in admissions:
                future.cancel()
            raise
        except Exception as error:  # RedisError, OSError, TimeoutError; any other alike
            failure = f"redis at {self.where}: {type(error).__name__}"
            for *_, future in admissions:
                self._answer(future, FAILED, failure)
            for *_, waiter in finishes:
                self._answer(waiter, FAILED, failure)
            return
        failure = f"redis at {self.where}: ResponseError"  # from a bucket's keys
        for waiter, answer in answered:
            self._answer(waiter, answer, failure)

    def _answer(self, waiter: Waiter, answer: bytes, failure: str) -> None:
        """Tell a waiter its answer (FAILED: `failure`, a LimitBackendError)."""
        if not isinstance(waiter, asyncio.Future):
            if answer == FAILED:
                waiter(LimitBackendError(failure))
        elif not waiter.done():
            if answer == FAILED:
                waiter.set_exception(LimitBackendError(failure))
            else:
                waiter.set_result(answer)
        elif waiter in self._abandoned:  # cancelled: a place it got goes back
            keys, request_id = self._abandoned.pop(waiter)
            if answer == ADMITTED:
                self._finishes.append((keys, request_id, 0, False, False, _ignore))
                self._wake()

    async def _call(self, connection: AbstractConnection, payload: bytes) -> Any:
        """One batch's round trip."""
        try:
            try:
                return await self._round_trip(connection, payload)
            except (RedisConnectionError, OSError) as error:
                if isinstance(error, TimeoutError):
                    raise
            # A connection found dead (Redis restarted): once more, on a new one.
            await connection.disconnect(nowait=True)
            return await self._round_trip(connection, payload)
        except BaseException:
            # Whatever failed (a handshake cut short, a reply still on its way), the
            # next batch starts on a new connection.
            await connection.disconnect(nowait=True)
            raise

    async def _round_trip(self, connection: AbstractConnection, payload: bytes) -> Any:
        if not connection.is_connected:
            async with asyncio.timeout(self._timeout):  # the handshake's replies too
                await connection.connect()  # type: ignore[no-untyped-call]
        async with asyncio.timeout(self._timeout):
            await connection.send_packed_command(payload, check_health=False)
            try:
                return await connection.read_response()
            except NoScriptError:
                pass  # nothing ran: load the script, and the same batch again behind it
            await connection.send_packed_command(batch.LOAD + payload, check_health=False)
            await connection.read_response()
            return await connection.read_response()

    async def close(self) -> None:
        """Send what is still queued (`finish_soon`s), wait for the batches out,
        then close the connections."""
        while self._admissions or self._finishes or self._senders:
            if self._senders:
                await asyncio.wait(set(self._senders))
            else:
                self._start()
        for connection in self._idle:
            await connection.disconnect()
        self._idle.clear()
        await self._pool.aclose()


async def _hold(busy: bool) -> None:
    """Between two batches: a turn of the loop at least, so that the callers just
    answered, and the requests that come meanwhile, add their calls to the next;
    a busy worker's HOLD_TURNS turns, or as many as come within HOLD."""
    await asyncio.sleep(0)
    if busy:
        until = time.monotonic() + HOLD
        for _ in range(HOLD_TURNS - 1):
            if time.monotonic() >= until:
                break
            await asyncio.sleep(0)


def _ignore(error: LimitBackendError) -> None:
    """A place given back for a cancelled admission: it expires anyway if this fails."""
