"""One batch of the Redis limiter (fluxgate.ratelimit_redis): the Lua script
that runs it, how its calls are grouped and packed, and how its answer is read.

A batch holds the calls a worker made while its previous batch was out:
admissions, each waiting for its answer, and finishes. The script gets one
bucket's calls together: its finishes' request ids and tokens summed, then
its admissions grouped by policy, in the order they came. Each group is
answered with how many of its requests are admitted (the first ones) and,
if not all, why the next is refused; `answers` gives each call its own
answer: `ADMITTED`, `FAILED`, or `<limit 1-4>:<reset ms>`. The arguments go
out as RESP built here, with each bucket's keys and each policy's limits
packed once by the limiter, not per call.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeAlias

from .ratelimit import LimitBackendError, Tokens

# KEYS: three per bucket (concurrency zset, minute window hash, day hash).
# ARGV: now in ms ('' = Redis's TIME), a place's ttl in ms; then per bucket: its
# finishes (their count F, tokens for the minute window, tokens for the day, F
# request ids), its groups of admissions (their count G; per group: concurrent
# max, requests per minute, tokens per minute, tokens per day (-1: no limit), the
# group's count N, N request ids ('' without a concurrency limit)).
# Returns, joined by ',': per bucket, '0' for its finishes, then per group
# '<admitted>' or '<admitted>:<limit 1-4>:<reset ms>' (the rest refused); 'e'
# where the bucket's keys raised an error.
SCRIPT: Final = """
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local ttl = tonumber(ARGV[2])
local day = math.floor(now / 86400000)
local midnight = (day + 1) * 86400000

local function finish(b, first, count, wt, dt)
  if count > 0 then redis.call('ZREM', b.c, unpack(ARGV, first, first + count - 1)) end
  -- t was absent: the window may be new, and must expire by itself.
  if wt > 0 and redis.call('HINCRBY', b.w, 't', wt) == wt and redis.call('PTTL', b.w) < 0 then
    redis.call('PEXPIRE', b.w, 60000)
  end
  if dt > 0 then
    if tonumber(redis.call('HGET', b.d, 'd')) == day then
      b.spent = redis.call('HINCRBY', b.d, 't', dt)  -- it expires at midnight already
    else
      redis.call('HSET', b.d, 'd', day, 't', dt)
      redis.call('PEXPIRE', b.d, midnight - now + 1000)
      b.spent = dt
    end
  end
end

local function window_ttl(b)
  if b.opened then return 60000 end
  local pttl = redis.call('PTTL', b.w)
  if pttl == -1 then  -- never so when written here: heal it rather than refuse forever
    redis.call('PEXPIRE', b.w, 60000)
    pttl = 60000
  end
  return pttl
end

-- Admit the first k of count requests, as one by one would: k, and why the next is not.
local function admit(b, cmax, rpm, tpm, tpd, first, count)
  local free, fresh = count, count  -- places left, requests left in the window
  if cmax >= 0 then
    if not b.n then b.n = redis.call('ZCARD', b.c) + #b.added end
    if b.n + count > cmax and not b.swept then  -- the expired places first
      b.swept = true
      redis.call('ZREMRANGEBYSCORE', b.c, '-inf', now)
      b.n = redis.call('ZCARD', b.c) + #b.added
    end
    free = math.max(cmax - b.n, 0)
  end
  local window = rpm >= 0 or tpm >= 0
  if window and not b.r then
    local v = redis.call('HMGET', b.w, 'r', 't')
    b.open = v[1] or v[2]
    b.r, b.t = tonumber(v[1]) or 0, tonumber(v[2]) or 0
  end
  if rpm >= 0 then fresh = math.max(rpm - b.r, 0) end
  local k = math.min(count, free, fresh)
  local why
  if k < count then why = (free <= k) and 1 or 2 end
  if k > 0 and tpm >= 0 and b.t >= tpm then k, why = 0, 3 end
  if k > 0 and tpd >= 0 then
    if not b.spent then
      local v = redis.call('HMGET', b.d, 'd', 't')
      b.spent = (tonumber(v[1]) == day) and (tonumber(v[2]) or 0) or 0
    end
    if b.spent >= tpd then k, why = 0, 4 end
  end
  if k > 0 and cmax >= 0 then
    for i = first, first + k - 1 do b.added[#b.added + 1] = ARGV[i] end
    b.n = b.n + k
  end
  if k > 0 and window then
    b.r, b.radd = b.r + k, b.radd + k
    if not b.open then b.open, b.opened = true, true end
  end
  if not why then return tostring(k) end
  local reset
  if why == 1 then
    local oldest = redis.call('ZRANGE', b.c, 0, 0, 'WITHSCORES')
    reset = ttl  -- the places taken in this batch expire last
    if oldest[2] then reset = tonumber(oldest[2]) - now end
  elseif why == 4 then
    reset = midnight - now
  else
    reset = window_ttl(b)
  end
  return k .. ':' .. why .. ':' .. string.format('%d', reset)
end

local function store(b)
  if #b.added > 0 then
    local places = {}
    for i, id in ipairs(b.added) do places[2 * i - 1], places[2 * i] = now + ttl, id end
    redis.call('ZADD', b.c, unpack(places))
    redis.call('PEXPIRE', b.c, ttl)
  end
  if b.radd > 0 then
    redis.call('HINCRBY', b.w, 'r', b.radd)
    if b.opened then redis.call('PEXPIRE', b.w, 60000) end
  end
end

local out, a = {}, 3
for key = 1, #KEYS, 3 do
  local b = {c = KEYS[key], w = KEYS[key + 1], d = KEYS[key + 2], added = {}, radd = 0}
  local count = tonumber(ARGV[a])
  local ok = pcall(finish, b, a + 3, count, tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]))
  out[#out + 1] = ok and '0' or 'e'
  a = a + 4 + count
  local answered, failed = {}, false
  for _ = 1, tonumber(ARGV[a - 1]) do
    count = tonumber(ARGV[a + 4])
    local answer = 'e'
    if not failed then
      ok, answer = pcall(admit, b, tonumber(ARGV[a]), tonumber(ARGV[a + 1]),
        tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), a + 5, count)
      failed = not ok
    end
    out[#out + 1] = answer
    answered[#answered + 1] = #out
    a = a + 5 + count
  end
  if failed or not pcall(store, b) then  -- nothing admitted stays counted: all refused
    for _, i in ipairs(answered) do out[i] = 'e' end
  end
end
return table.concat(out, ',')
"""
SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest().encode()
ADMITTED: Final = b"0"
FAILED: Final = b"e"


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def integer(value: int) -> bytes:
    return bulk(b"%d" % value)


LOAD: Final = b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n" + bulk(SCRIPT.encode())

# Who hears of a call's answer: the future an awaited call waits on, or the
# `on_error` of a `finish_soon`.
Waiter: TypeAlias = "asyncio.Future[bytes] | Callable[[LimitBackendError], None]"
# Calls not sent yet. An admission: its bucket's keys and policy's limits (RESP),
# request id, waiter. A finish: keys, request id, tokens, charged to the minute
# window, to the day, waiter.
Admission: TypeAlias = "tuple[bytes, bytes, bytes, asyncio.Future[bytes]]"
Finish: TypeAlias = "tuple[bytes, bytes, Tokens, bool, bool, Waiter]"
# Per bucket (by its keys): its finishes' request ids, minute and day tokens,
# waiters; and per policy (by its limits), its admissions' request ids and waiters.
Bucket: TypeAlias = (
    "tuple[list[bytes], list[int], list[Waiter], dict[bytes, tuple[list[bytes], list[Any]]]]"
)


def group(admissions: list[Admission], finishes: list[Finish]) -> dict[bytes, Bucket]:
    """The batch's calls by bucket, and its admissions by policy. A finish's
    tokens to be counted are counted now (the usage is parsed here)."""
    buckets: dict[bytes, Bucket] = {}
    for keys, request_id, tokens, per_minute, per_day, waiter in finishes:
        bucket = buckets.get(keys)
        if bucket is None:
            bucket = buckets[keys] = ([], [0, 0], [], {})
        if request_id:
            bucket[0].append(request_id)
        count = tokens if isinstance(tokens, int) else tokens()
        if count > 0:
            bucket[1][0] += count if per_minute else 0
            bucket[1][1] += count if per_day else 0
        bucket[2].append(waiter)
    for keys, limits, request_id, future in admissions:
        bucket = buckets.get(keys)
        if bucket is None:
            bucket = buckets[keys] = ([], [0, 0], [], {})
        policy = bucket[3].get(limits)
        if policy is None:
            policy = bucket[3][limits] = ([], [])
        policy[0].append(request_id)
        policy[1].append(future)
    return buckets


def payload(buckets: dict[bytes, Bucket], now: bytes, ttl: bytes) -> bytes:
    """The batch's EVALSHA. `now`: ms, b"" for Redis's own clock; `ttl`: a
    place's, in ms, as a bulk string."""
    args = [bulk(now), ttl]
    groups = 0
    for ids, (minute, day), _, policies in buckets.values():
        args += (integer(len(ids)), integer(minute), integer(day), *map(bulk, ids))
        args.append(integer(len(policies)))
        groups += len(policies)
        for limits, (policy_ids, _) in policies.items():
            args += (limits, integer(len(policy_ids)), *map(bulk, policy_ids))
    keys = 3 * len(buckets)
    head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s" % (
        3 + keys + len(args) + 3 * groups,  # each `limits` holds 4 arguments
        SHA,
        integer(keys),
    )
    return b"".join((head, *buckets, *args))


def answers(buckets: dict[bytes, Bucket], reply: object) -> Iterator[tuple[Any, bytes]]:
    """Each call's waiter, with its answer. Raises ValueError for a reply that
    is not this script's to these calls."""
    found = reply.split(b",") if isinstance(reply, bytes) else []
    if len(found) != sum(1 + len(bucket[3]) for bucket in buckets.values()):
        raise ValueError("not an answer of this script")
    position = 0
    for _, _, waiters, policies in buckets.values():
        for waiter in waiters:
            yield waiter, found[position]
        for _, futures in policies.values():
            position += 1
            admitted, _, why = found[position].partition(b":")
            if admitted == FAILED:
                for future in futures:
                    yield future, FAILED
                continue
            first = int(admitted)
            for future in futures[:first]:
                yield future, ADMITTED
            for future in futures[first:]:
                yield future, why
        position += 1
