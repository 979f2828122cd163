"""Provider key pools: which of an upstream's keys a request uses, and which rest.

README "Upstream resilience". Requests spread over an upstream's keys by
smooth weighted round-robin (nginx's algorithm: over any run of requests
each key gets its share of the weights, interleaved rather than in bursts),
in each worker on its own: fairness needs no shared state at this scale, and
a worker never waits on another.

A key the provider answers 429 is benched until the provider's Retry-After
(`retry-after-ms` as OpenAI sends it, else `Retry-After` in seconds or as an
HTTP date) or, without one, for an exponential back-off from 1 s up to 60 s;
401 or 403 bench it for 60 s, with one WARNING per bench naming the key's id
(never the key). A benched key gets no request while another key is free;
when every key is benched, the one whose bench ends first still gets it:
Fluxgate never refuses a request on its own guess about the provider.

`KeyPools` keeps each upstream's pool across config reloads while its keys
(ids, weights, secrets) stay the same, so a reload does not forget a bench.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Mapping
from typing import Final

from .config import ProviderKey, Upstream
from .logs import log_fields

log = logging.getLogger("fluxgate.keypool")

BACKOFF_START: Final = 1.0  # seconds a 429 without Retry-After benches a key at first
BACKOFF_CAP: Final = 60.0
REFUSED_BENCH: Final = 60.0  # seconds a 401/403 benches a key
MAX_RETRY_AFTER: Final = 3600.0  # a provider's Retry-After beyond this is taken as this


class KeyPool:
    """One upstream's keys in one worker: the round-robin and the benches."""

    __slots__ = ("_backoff", "_current", "benched_until", "keys", "upstream", "weights")

    def __init__(self, upstream: str, keys: tuple[ProviderKey, ...]) -> None:
        self.upstream = upstream
        self.keys = keys
        self.weights = [key.weight for key in keys]
        self._current = [0] * len(keys)
        self.benched_until = [0.0] * len(keys)  # monotonic time
        self._backoff = [0.0] * len(keys)  # the next 429 bench without Retry-After

    def choose(self, now: float, tried: frozenset[int] = frozenset()) -> int | None:
        """The index of the key for the next attempt (None: every key was tried)."""
        best, total = -1, 0
        current, weights, benched = self._current, self.weights, self.benched_until
        for i, weight in enumerate(weights):
            if i in tried or benched[i] > now:
                continue
            current[i] += weight
            total += weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best >= 0:
            current[best] -= total
            return best
        untried = [i for i in range(len(weights)) if i not in tried]
        if not untried:
            return None
        return min(untried, key=benched.__getitem__)  # every one benched: the soonest free

    def answered(self, index: int, status: int, headers: Mapping[str, str], now: float) -> None:
        """Bench a key the provider refused (401, 403) or rate-limited (429)."""
        if status == 429:
            delay = retry_after(headers, time.time())
            if delay is None:
                delay = self._backoff[index] or BACKOFF_START
                self._backoff[index] = min(delay * 2, BACKOFF_CAP)
            self.benched_until[index] = now + delay
        elif status in (401, 403):
            if self.benched_until[index] <= now:  # once per bench
                log_fields(
                    log,
                    logging.WARNING,
                    "provider refused a key; benched",
                    upstream=self.upstream,
                    provider_key=self.keys[index].id,
                    status=status,
                    seconds=int(REFUSED_BENCH),
                )
            self.benched_until[index] = now + REFUSED_BENCH
        elif 200 <= status < 400:
            self._backoff[index] = 0.0

    def benched(self, now: float) -> list[bool]:
        return [until > now for until in self.benched_until]


def retry_after(headers: Mapping[str, str], wall_clock: float) -> float | None:
    """Seconds the provider asks us to wait, from `retry-after-ms` or `Retry-After`."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return _bounded(float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return _bounded(float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return _bounded(when.timestamp() - wall_clock)


def _bounded(seconds: float) -> float | None:
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class KeyPools:
    """Each upstream's pool in this worker, kept across reloads while its keys stay."""

    def __init__(self) -> None:
        self._pools: dict[str, KeyPool] = {}

    def pool(self, upstream: Upstream) -> KeyPool:
        pool = self._pools.get(upstream.name)
        if pool is None or (pool.keys is not upstream.keys and pool.keys != upstream.keys):
            pool = self._pools[upstream.name] = KeyPool(upstream.name, upstream.keys)
        return pool

    def benched(self) -> dict[tuple[str, str], bool]:
        """(upstream, key id) -> benched now, for the metrics gauge."""
        now = time.monotonic()
        return {
            (name, key.id or ""): flag
            for name, pool in self._pools.items()
            for key, flag in zip(pool.keys, pool.benched(now), strict=True)
        }
