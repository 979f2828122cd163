"""Prometheus metrics, aggregated across workers (prometheus-client multiprocess mode).

Every process writes its own series to small mmap'd files in one directory
that the supervisor owns (`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor
for itself and its workers before prometheus_client is imported anywhere:
the library picks its storage at import time). A scrape, in any worker or in
the master, merges all the files, so it reports the whole server, not the
worker that happened to answer.

The hot path stays cheap: a request that finishes is only queued
(`WorkerMetrics.add`, a list append), like its log line. At most
`FLUSH_DELAY` later the queue is added up into per-series sums, a slice at a
time, and each series touched is written to the files once (each write to
the files is a system call; written one by one they would cost more than the
rest of a request's own work). In-flight streams are plain integers, written to their
gauges at each flush and heartbeat.
Series are labelled by upstream name and key id only (both bounded by the
config), never by path, client or secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import os
import struct
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from .exchange import Exchange
    from .usage import Tap

ENV_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"
LOCK_NAME: Final = "compaction.lock"  # not *.db: the collector only reads *.db
# A series file starts with the bytes it uses, then padding (prometheus-client's MmapedDict).
HEADER_SIZE: Final = 8
# Waits before reading the files again when a read was torn (see `LockedCollector`).
RETRY_DELAYS: Final = (0.001, 0.01, 0.05)
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
FLUSH_DELAY: Final = 0.05  # seconds a finished request may wait before it is counted
SLICE: Final = 32  # requests counted per event-loop turn (~0.2 ms)

# From a 1 ms relay to a many-minute generation; +Inf is added by the library.
BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)  # fmt: skip
# Own endpoints (health checks, scrapes) are not proxy traffic.
UNCOUNTED_OUTCOMES: Final = frozenset({"health", "metrics"})
# The `type` label of fluxgate_tokens_total, in the order of usage.Usage's fields.
TOKEN_TYPES: Final = ("input", "output", "cache_read", "cache_write", "reasoning")


def multiprocess_dir() -> str | None:
    """The shared directory, or None when not running under the supervisor."""
    path = os.environ.get(ENV_DIR)
    return path if path and os.path.isdir(path) else None


def check_multiprocess() -> None:
    """prometheus_client chose its storage when first imported: it must be the files."""
    if not getattr(prometheus_values.ValueClass, "_multiprocess", False):
        raise RuntimeError(f"prometheus_client was imported before {ENV_DIR} was set")


class WorkerSeries:
    """The series a worker writes. Created in the worker only: an unlabelled
    gauge made in the master would add the master's 0 to every min/max."""

    def __init__(self) -> None:
        check_multiprocess()
        up_key = ["upstream", "key_id"]
        self.requests = Counter(
            "fluxgate_requests",
            "Requests answered, by upstream, key id and status class.",
            [*up_key, "status_class"],
            registry=None,
        )
        self.duration = Histogram(
            "fluxgate_request_duration_seconds",
            "Whole request, from its head to the end of the response.",
            ["upstream"],
            buckets=BUCKETS,
            registry=None,
        )
        self.ttfb = Histogram(
            "fluxgate_upstream_ttfb_seconds",
            "Upstream time to first byte (response head): the LLM's time to first token.",
            ["upstream"],
            buckets=BUCKETS,
            registry=None,
        )
        self.request_bytes = Counter(
            "fluxgate_request_bytes", "Request body bytes moved upstream.", up_key, registry=None
        )
        self.response_bytes = Counter(
            "fluxgate_response_bytes", "Response body bytes moved to clients.", up_key,
            registry=None,
        )  # fmt: skip
        self.tokens = Counter(
            "fluxgate_tokens",
            "Tokens the provider reported (type: input, output, cache_read, cache_write, "
            "reasoning); input includes cached tokens.",
            [*up_key, "type"],
            registry=None,
        )
        self.usage_unavailable = Counter(
            "fluxgate_usage_unavailable",
            "2xx responses of a usage-enabled upstream without token counts, by reason.",
            ["upstream", "reason"],
            registry=None,
        )
        self.streams = Gauge(
            "fluxgate_active_streams",
            "Upstream exchanges in flight (request sent, response not finished).",
            ["upstream"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.connections = Gauge(
            "fluxgate_active_connections",
            "Open client connections.",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.attempts = Counter(
            "fluxgate_upstream_attempts",
            "Requests sent upstream, failover included, by provider key id and result "
            "(answered: the response the client got; retried: sent again on another key; "
            "failed: no response, the client got a 502/504 or was gone).",
            ["upstream", "provider_key", "result"],
            registry=None,
        )
        self.rate_limited = Counter(
            "fluxgate_rate_limited",
            "Requests refused with 429 by a key's limits, by key id and limit "
            "(requests, tokens, concurrent, budget).",
            ["key_id", "limit"],
            registry=None,
        )
        self.limit_backend_errors = Counter(
            "fluxgate_limit_backend_errors",
            "Calls to the limit backend (Redis) that got no answer.",
            registry=None,
        )
        self.benched = Gauge(
            "fluxgate_provider_key_benched",
            "1 while a provider key rests after a 429, 401 or 403 (in any worker).",
            ["upstream", "provider_key"],
            multiprocess_mode="livemax",
            registry=None,
        )
        self.generation = Gauge(
            "fluxgate_worker_config_generation_min",
            "Lowest config generation any live worker runs.",
            multiprocess_mode="livemin",
            registry=None,
        )


class _Histogram:
    """One label set's observations since the last flush: counts per bucket and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.total += value


_STATUS_CLASSES: Final = ("unknown", "1xx", "2xx", "3xx", "4xx", "5xx")


def status_class(status: int) -> str:
    return _STATUS_CLASSES[status // 100] if 100 <= status < 600 else "unknown"


class WorkerMetrics:
    """One worker's recording: sums since the last flush, and in-flight counts."""

    def __init__(self, delay: float = FLUSH_DELAY) -> None:
        self.directory = multiprocess_dir()
        self.delay = delay
        # server.metrics, for the protocol layer (the app reads its own config).
        self.recording = True
        self.streams: dict[str, int] = {}  # upstream -> exchanges in flight
        self.connections: Callable[[], int] | None = None  # set by the worker
        # (upstream, key id) -> benched now; set by the forwarder (fluxgate.keypool).
        self.benched: Callable[[], dict[tuple[str, str], bool]] | None = None
        self._pending: list[tuple[Exchange, float]] = []  # waiting for the timer
        self._batch: list[tuple[Exchange, float]] = []  # being counted, a slice a turn
        self._position = 0  # of the next slice in `_batch`
        self._timer: asyncio.TimerHandle | None = None
        self._slicing: asyncio.Handle | None = None
        self._series: WorkerSeries | None = None
        self._children: dict[Any, Any] = {}
        self._written: dict[Any, int] = {}  # gauge child -> value last written
        # Sums since the last flush, by label values.
        self._requests: dict[tuple[str, str, str], int] = {}
        self._request_bytes: dict[tuple[str, str], int] = {}
        self._response_bytes: dict[tuple[str, str], int] = {}
        self._tokens: dict[tuple[str, str, str], int] = {}
        self._unavailable: dict[tuple[str, str], int] = {}
        self._attempts: dict[tuple[str, str, str], int] = {}
        self._rate_limited: dict[tuple[str, str], int] = {}
        self._backend_errors = 0
        self._durations: dict[str, _Histogram] = {}
        self._ttfbs: dict[str, _Histogram] = {}

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def series(self) -> WorkerSeries:
        if self._series is None:
            self._series = WorkerSeries()
        return self._series

    # The hot path only queues (a list append). Counted where it ends, a
    # request costs about three times what it costs in a loop over many: its
    # code and data are cold in the CPU caches by then. So the queue is
    # counted later, in slices of `SLICE` requests, yielding to the event loop
    # between slices: counting a whole batch at once stalled the loop, which
    # showed as the p99 latency at one connection, and small slices are cold
    # again each time and cost throughput. 32 keeps both within the targets
    # (BENCHMARKS.md, "Measurements behind the design").

    def add(self, ex: Exchange, duration: float) -> None:
        """Queue a finished request; it is counted within `delay` seconds."""
        if self.directory is None:
            return
        self._pending.append((ex, duration))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._drain)

    def _drain(self) -> None:
        """The timer: take the queue as one batch (later requests start the next)."""
        self._timer = None
        self._batch = self._batch[self._position :] + self._pending
        self._position, self._pending = 0, []
        if self._slicing is None:
            self._slice()

    def _slice(self) -> None:
        """Count one slice of the batch; come back for the next, or write the files.

        Each batch ends in a write, however busy the worker: requests that
        arrive meanwhile wait for the next batch instead of extending this one.
        """
        self._slicing = None
        start, end = self._position, self._position + SLICE
        for ex, duration in self._batch[start:end]:
            self._count(ex, duration)
        if end < len(self._batch):
            self._position = end
            self._slicing = asyncio.get_running_loop().call_soon(self._slice)
        else:
            self._batch, self._position = [], 0
            self._write()

    def _count(self, ex: Exchange, duration: float) -> None:
        if ex.outcome in UNCOUNTED_OUTCOMES:
            return
        upstream, key = ex.upstream or "", ex.key_id or ""
        labels = (upstream, key, status_class(ex.status))
        self._requests[labels] = self._requests.get(labels, 0) + 1
        histogram = self._durations.get(upstream) or self._durations.setdefault(
            upstream, _Histogram()
        )
        histogram.observe(duration)
        if ex.ttfb_ms is not None:
            histogram = self._ttfbs.get(upstream) or self._ttfbs.setdefault(upstream, _Histogram())
            histogram.observe(ex.ttfb_ms / 1000)
        pair = (upstream, key)
        if ex.request_bytes:
            self._request_bytes[pair] = self._request_bytes.get(pair, 0) + ex.request_bytes
        if ex.response_bytes:
            self._response_bytes[pair] = self._response_bytes.get(pair, 0) + ex.response_bytes
        if ex.usage is not None:
            self._count_usage(ex.usage, upstream, key)
        if ex.attempts:
            self._count_attempts(ex, upstream)
        if ex.limit is not None:
            pair = (key, ex.limit)
            self._rate_limited[pair] = self._rate_limited.get(pair, 0) + 1

    def limit_backend_error(self) -> None:
        self._backend_errors += 1

    def _count_attempts(self, ex: Exchange, upstream: str) -> None:
        attempts = self._attempts
        for provider_key in ex.retried or ():
            labels = (upstream, provider_key or "", "retried")
            attempts[labels] = attempts.get(labels, 0) + 1
        result = "answered" if ex.ttfb_ms is not None else "failed"
        labels = (upstream, ex.provider_key or "", result)
        attempts[labels] = attempts.get(labels, 0) + 1

    def _count_usage(self, tap: Tap, upstream: str, key: str) -> None:
        usage = tap.result()
        if usage is None:
            reason = (upstream, tap.reason or "not_reported")
            self._unavailable[reason] = self._unavailable.get(reason, 0) + 1
            return
        tokens = self._tokens
        for token_type, count in zip(TOKEN_TYPES, usage, strict=True):
            if count:
                labels = (upstream, key, token_type)
                tokens[labels] = tokens.get(labels, 0) + count

    def open_stream(self, upstream: str) -> None:
        self.streams[upstream] = self.streams.get(upstream, 0) + 1

    def close_stream(self, upstream: str) -> None:
        self.streams[upstream] -= 1

    # Writing the files: one write per series touched, however many requests.

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def flush(self) -> None:
        """Count the whole queue and write the files now (before a scrape, at exit)."""
        for handle in (self._timer, self._slicing):
            if handle is not None:
                handle.cancel()
        self._timer = self._slicing = None
        queued = self._batch[self._position :] + self._pending
        self._batch, self._position, self._pending = [], 0, []
        if self.directory is None:
            return
        for ex, duration in queued:
            self._count(ex, duration)
        self._write()

    def _write(self) -> None:
        s = self.series()
        sums: dict[Any, int]
        for counter, sums in (
            (s.requests, self._requests),
            (s.request_bytes, self._request_bytes),
            (s.response_bytes, self._response_bytes),
            (s.tokens, self._tokens),
            (s.usage_unavailable, self._unavailable),
            (s.attempts, self._attempts),
            (s.rate_limited, self._rate_limited),
        ):
            for labels, amount in sums.items():
                self._child(counter, *labels).inc(amount)
            sums.clear()
        if self._backend_errors:
            s.limit_backend_errors.inc(self._backend_errors)
            self._backend_errors = 0
        for histogram_metric, histograms in ((s.duration, self._durations), (s.ttfb, self._ttfbs)):
            for upstream, histogram in histograms.items():
                # Histogram.observe takes one value; the batch goes straight to
                # the library's bucket values (one non-cumulative value each).
                child = self._child(histogram_metric, upstream)
                child._sum.inc(histogram.total)
                for i, count in enumerate(histogram.counts):
                    if count:
                        child._buckets[i].inc(count)
            histograms.clear()
        self.refresh()

    def refresh(self) -> None:
        """Write the in-flight gauges (each flush, each heartbeat, before a scrape)."""
        if self.directory is None:
            return
        s = self.series()
        gauges: list[tuple[Any, int]] = [
            (self._child(s.streams, name), count) for name, count in self.streams.items()
        ]
        if self.connections is not None:
            gauges.append((s.connections, self.connections()))
        if self.benched is not None:
            gauges += [(self._child(s.benched, *labels), int(flag))
                       for labels, flag in self.benched().items()]  # fmt: skip
        for child, value in gauges:
            if self._written.get(child) != value:
                child.set(value)
                self._written[child] = value

    def set_generation(self, generation: int) -> None:
        if self.directory is not None:
            self.series().generation.set(generation)

    async def render(self) -> bytes:
        """The whole server's exposition; this worker's queue is counted first.

        The merge reads every file: done in a thread so streams keep flowing.
        """
        self.flush()
        assert self.directory is not None
        return await asyncio.to_thread(render, self.directory)


class MetricsUnreadable(Exception):
    """The series files could not be read consistently, even after waiting."""


# What reading a series file can raise: torn by its writer, or damaged
# (prometheus-client fails to unpack it, or calls it corrupted), or gone.
READ_ERRORS: Final = (OSError, ValueError, RuntimeError, struct.error)


class LockedCollector(MultiProcessCollector):
    """The library's collector, reading under a shared lock so that the master
    folding a dead worker's files into the archive is never seen half done,
    reading only the files that have been written (`written_files`), and
    reading again when a read was torn.

    A file read while its writer is changing it can be torn; the writer is
    done a moment later, so the read is tried again after a short wait,
    longer each time. Raises MetricsUnreadable if the last try fails.
    """

    def __init__(self, path: str) -> None:
        super().__init__(None, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Any:
        for delay in RETRY_DELAYS:
            try:
                return self._read()
            except READ_ERRORS:
                time.sleep(delay)
        try:
            return self._read()
        except READ_ERRORS as exc:
            raise MetricsUnreadable(f"{type(exc).__name__}: {exc}") from None

    def _read(self) -> Any:
        with locked(self._path, fcntl.LOCK_SH):
            files = written_files(self._path)
            return list(self.merge(files, accumulate=True))  # type: ignore[no-untyped-call]


def written_files(directory: str) -> list[str]:
    """The series files in `directory` that hold at least their header.

    A process makes a series file in two steps: it creates it, empty, then
    sizes it. In between, the file holds no series, and the library's reader
    fails on it; a writer descheduled there (a loaded machine) kept every
    scrape failing until it ran again. Files only grow, and are removed only
    under the exclusive lock, so a file seen with its header stays readable.
    """
    files = []
    for path in glob.glob(os.path.join(directory, "*.db")):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_size >= HEADER_SIZE:
                files.append(path)
    return files


@contextlib.contextmanager
def locked(directory: str, operation: int) -> Iterator[None]:
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # releases the lock


def registry(directory: str) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(LockedCollector(directory))
    return reg


def render(directory: str) -> bytes:
    """The exposition of every series in `directory` (runs in a thread);
    raises MetricsUnreadable."""
    return generate_latest(registry(directory))
