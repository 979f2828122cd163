"""Many long streams: per-event latency, CPU and memory with thousands of SSE streams open.

Two halves in one module:

- the client, `python -m bench.streams --port P --path PATH --key K --streams C ...`, run
  in a process of its own so that its CPU is not the runner's. It opens C streams at
  `--rate` a second, each a raw HTTP/1.1 request with its own asyncio Protocol that
  de-chunks the SSE body as it arrives and, for every event, takes the time of the
  read (`time.monotonic_ns()` in data_received) minus the stamp bench.tick_upstream
  put in the event just before writing it. It talks to the runner in lines:

      stdout  open {json}     every stream has its response head (or has failed)
      stdin   mark            the steady-state window starts (latencies are kept from here)
      stdin   mark            the window ends: the client closes every stream
      stdout  result {json}   counts, failures by kind, latency and head percentiles

  End of stdin at any point ends the run the same way.

- `long_streams_phase()`, the runner's side: on servers of its own, started fresh
  (bench.servers.Stack), per scenario, round and system, it samples the system's
  process tree (CPU, PSS) at the window's start and end and after the last
  connection closed on both sides, and derives what BENCHMARKS.md reports
  (bench.report).

Memory per open stream is PSS in the window less PSS idle *before the first
run*, not before each run: a Python process keeps what it freed (pymalloc
arenas, malloc's heap) and the next run reuses it, so a per-run baseline would
find almost nothing by the second round. Fresh servers keep the earlier phases
of `make bench` out of that baseline too. That idle PSS is taken once each
proxy has carried a few short streams (`_warm_up`): a system's first traffic
has one-time costs that are not any stream's (pages shared with the master
copied on their first write, caches filled), which would otherwise be
spread over the streams of the first scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import queue
import resource
import subprocess
import sys
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import uvloop

from .servers import STREAMS_NGINX_CONNECTIONS, Stack, System, fd_count

STAMP = b'"t": '

# The client


class Run:
    """What every stream of one client run adds to."""

    def __init__(self) -> None:
        self.in_window = False
        self.latency_ns = array("q")  # one per event received in the window
        self.head_ns = array("q")  # request written → status line, one per stream
        self.events = 0
        self.window_events = 0
        self.settled = 0  # streams with a response head or a failure
        self.ok_heads = 0
        self.failures: dict[str, int] = {}
        self.stopping = False


class StreamClient(asyncio.Protocol):
    """One stream: writes the request, parses the head, de-chunks and splits the events."""

    def __init__(self, run: Run, request: bytes) -> None:
        self.run = run
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.sent_ns = 0
        self.head_ns = 0  # when the first byte of the response arrived
        self.status = 0
        self.chunked = True
        self.raw = b""  # bytes not parsed yet: the head, or a cut chunk-size line
        self.sse = b""  # de-chunked body not yet split into events
        self.chunk_left = 0  # data bytes of the current chunk still to come
        self.skip = 0  # the CRLF after a chunk's data still to skip
        self.events = 0
        self.ended = False  # the last chunk came: the upstream finished the stream
        self.error: str | None = None
        self._settled = False

    def _settle(self) -> None:
        if not self._settled:
            self._settled = True
            self.run.settled += 1

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
            self.run.failures[reason] = self.run.failures.get(reason, 0) + 1
        self._settle()
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.sent_ns = time.monotonic_ns()
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.run.stopping and not self.ended:
            self.fail("closed early" if self.status else "closed before the head")

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self.status:
            if not self.head_ns:
                self.head_ns = now
                self.run.head_ns.append(now - self.sent_ns)
            self.raw += data
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data, self.raw = self.raw[:end], self.raw[end + 4 :], b""
            lines = head.split(b"\r\n")
            self.status = int(lines[0].split(b" ")[1])
            self._settle()
            if self.status != 200:
                self.fail(f"status {self.status}")
                return
            self.run.ok_heads += 1
            self.chunked = any(
                line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
                for line in lines[1:]
            )
            if not data:
                return
        body = self._dechunk(data) if self.chunked else data
        sse = self.sse + body if self.sse else body
        run = self.run
        pos = 0
        while True:
            end = sse.find(b"\n\n", pos)
            if end < 0:
                break
            i = sse.find(STAMP, pos, end)
            if i >= 0:
                stamp = int(sse[i + 5 : sse.find(b",", i, end)])
                self.events += 1
                run.events += 1
                if run.in_window:
                    run.latency_ns.append(now - stamp)
                    run.window_events += 1
            pos = end + 2
        self.sse = sse[pos:]

    def _dechunk(self, data: bytes) -> bytes:
        buf = self.raw + data if self.raw else data
        out = []
        pos, n = 0, len(buf)
        while pos < n:
            if self.chunk_left:
                take = min(self.chunk_left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.chunk_left -= take
                if not self.chunk_left:
                    self.skip = 2
            elif self.skip:
                take = min(self.skip, n - pos)
                pos += take
                self.skip -= take
            else:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(buf[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if not size:
                    self.ended = True  # trailers, if any, are of no interest
                    pos = n
                    break
                self.chunk_left = size
        self.raw = buf[pos:]
        return out[0] if len(out) == 1 else b"".join(out)


def percentiles_ms(values: array[int]) -> dict[str, float] | None:
    """p50, p99, p99.9 and max (nearest rank) of nanosecond samples, in ms."""
    if not values:
        return None
    v = sorted(values)
    n = len(v)

    def rank(q: float) -> float:
        return v[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1e6

    return {"p50": rank(0.5), "p99": rank(0.99), "p999": rank(0.999), "max": v[-1] / 1e6,
            "n": n}  # fmt: skip


async def client(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    run = Run()
    body = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Hi"}]}'
    request = (
        f"POST {args.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {args.key}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    streams: list[StreamClient] = []
    pending: set[asyncio.Task[Any]] = set()

    async def connect(stream: StreamClient) -> None:
        try:
            await loop.create_connection(lambda: stream, "127.0.0.1", args.port)
        except OSError as exc:
            stream.fail(f"connect: {type(exc).__name__}")

    t0 = time.monotonic()
    while len(streams) < args.streams:
        # Batches every 5 ms keep the rate without a timer per connection.
        due = min(args.streams, int((time.monotonic() - t0) * args.rate) + 1)
        while len(streams) < due:
            stream = StreamClient(run, request)
            streams.append(stream)
            task = loop.create_task(connect(stream))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.sleep(0.005)
    ramp_s = time.monotonic() - t0
    deadline = time.monotonic() + args.head_timeout
    while run.settled < args.streams and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for stream in streams:
        if not stream.status and stream.error is None:
            stream.fail("no head in time")
    open_s = time.monotonic() - t0
    print("open " + json.dumps({"ok": run.ok_heads, "open_s": open_s}), flush=True)

    window_ns = [0, 0]
    for i in range(2):
        line = await stdin.readline()
        window_ns[i] = time.monotonic_ns()
        run.in_window = i == 0 and line.strip() == b"mark"
        if not run.in_window:
            break
    stop_ns = time.monotonic_ns()
    run.stopping = True
    # Behind schedule at the end by more than this: stalled, or events lost.
    interval_ns = args.interval_ms * 1_000_000
    slack_ns = max(2_000_000_000, 2 * interval_ns)
    ended_early = 0
    for stream in streams:
        if stream.error is not None:
            continue
        if stream.ended:
            ended_early += 1  # whole, but it did not span the window as meant
        due = 1 + (stop_ns - stream.head_ns - slack_ns) // interval_ns
        if stream.events < min(due, args.events):
            stream.fail("fell behind")
        elif stream.transport is not None:
            stream.transport.close()
    await asyncio.sleep(0.2)  # let the closes go out before the process ends
    usage = resource.getrusage(resource.RUSAGE_SELF)
    window_s = (window_ns[1] - window_ns[0]) / 1e9 if window_ns[1] else 0.0
    return {
        "streams": args.streams,
        "ok_heads": run.ok_heads,
        "held": sum(1 for s in streams if s.error is None),
        "failed": sum(run.failures.values()),
        "failures": run.failures,
        "ended_before_stop": ended_early,
        "ramp_s": round(ramp_s, 3),
        "open_s": round(open_s, 3),
        "events": run.events,
        "window_s": window_s,
        "window_events": run.window_events,
        "events_per_s": run.window_events / window_s if window_s else 0.0,
        "latency_ms": percentiles_ms(run.latency_ns),
        "head_ms": percentiles_ms(run.head_ns),
        "client_cpu_s": usage.ru_utime + usage.ru_stime,
    }


def client_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the long-streams client (see bench.streams)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True, help="…/ticks?events=N&interval_ms=M")
    parser.add_argument("--key", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="new streams a second")
    parser.add_argument("--interval-ms", type=int, required=True)
    parser.add_argument("--events", type=int, required=True, help="events a stream carries")
    parser.add_argument("--head-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    # One descriptor per stream: 10,000 of them is past the usual soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    # A collection pass over 10,000 protocols would stall every read behind it and
    # show up as latency of whatever system is measured; the run is short and makes
    # little cyclic garbage.
    gc.disable()
    result = uvloop.run(client(args))
    print("result " + json.dumps(result), flush=True)
    return 0


# The runner's side


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    streams: int
    interval_ms: int
    rate: float  # new streams a second while ramping up


SCENARIOS = {
    "A": Scenario("A", "1,000 streams × 10 events/s", 1000, 100, 500.0),
    "B": Scenario("B", "10,000 streams × 1 event every 2 s", 10000, 2000, 1000.0),
}
SYSTEMS = ["direct", "nginx", "fluxgate"]
SETTLE_S = 1.0
WARM_UP_STREAMS = 50
HEAD_TIMEOUT_S = 30.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def events_per_stream(sc: Scenario, window: float) -> int:
    """Enough that the first stream outlives the ramp, the settle and the window, with
    room for a slow ramp: the client ends the streams itself after the window."""
    span = 2 * sc.streams / sc.rate + SETTLE_S + window + 30.0
    return math.ceil(span * 1000 / sc.interval_ms) + 1


class ClientProcess:
    """`python -m bench.streams` with its stdout read line by line in a thread."""

    def __init__(self, args: list[str], stderr: IO[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.streams", *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, word: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no '{word}' from the client in {timeout:.0f} s") from None
            if line is None:
                raise RuntimeError(f"the client exited ({self.proc.wait()}) before '{word}'")
            if line.startswith(word + " "):
                result: dict[str, Any] = json.loads(line[len(word) + 1 :])
                return result

    def mark(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("mark\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _log_text(stack: Stack, name: str) -> str:
    if name == "nginx":  # its error_log, not its stderr
        path = stack.tmp / "proxy-error.log"
        return path.read_text(errors="replace") if path.exists() else ""
    return stack.stderr_text(name)


def _released(ticks: System, baseline: int, timeout: float) -> float | None:
    """Seconds until the upstream is back to `baseline` descriptors (every stream's
    upstream side closed), or None if it is not within `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        n = fd_count(ticks.proc.pid)
        if n is None or n <= baseline:
            return time.monotonic() - t0
        time.sleep(0.05)  # nothing to wait on but the upstream's sockets closing
    return None


def run_once(
    stack: Stack, system: System, sc: Scenario, window: float, idle_kib: int, stderr: IO[str]
) -> dict[str, Any]:
    """One client run against `system` (`idle_kib`: its PSS before the first run)."""
    ticks = stack.ticks
    assert ticks is not None
    proxy = system.name != "direct"  # direct's process tree is not on the path
    events = events_per_stream(sc, window)
    path = f"{system.ticks_prefix}/ticks?events={events}&interval_ms={sc.interval_ms}"
    out: dict[str, Any] = {}
    ticks_fds = fd_count(ticks.proc.pid) or 0
    log_start = len(_log_text(stack, system.name))
    if proxy:
        out["pss_before_kib"] = system.pss_kib()
    cpu0 = system.cpu_seconds()
    client = ClientProcess(
        ["--port", str(system.ticks_port), "--path", path, "--key", system.key,
         "--streams", str(sc.streams), "--rate", str(sc.rate), "--interval-ms",
         str(sc.interval_ms), "--events", str(events), "--head-timeout", str(HEAD_TIMEOUT_S)],
        stderr,
    )  # fmt: skip
    try:
        out["open"] = client.expect("open", sc.streams / sc.rate + HEAD_TIMEOUT_S + 30)
        time.sleep(SETTLE_S)
        cpu1, up1 = system.cpu_seconds(), ticks.cpu_seconds()
        client.mark()
        pss1 = system.pss_kib() if proxy else 0
        # Per process: how evenly the workers took the connections.
        out["fds"] = [fd_count(p) for p in system.pids()] if proxy else []
        time.sleep(window)
        cpu2, up2 = system.cpu_seconds(), ticks.cpu_seconds()
        client.mark()
        pss2 = system.pss_kib() if proxy else 0
        out |= client.expect("result", 60)
        client.proc.wait(30)
    except (TimeoutError, RuntimeError, subprocess.TimeoutExpired) as exc:
        out["error"] = str(exc)
    finally:
        client.close()
    # Both sides of every stream closed, so the next run starts from quiet.
    out["release_s"] = _released(ticks, ticks_fds + 8, 30.0)
    if out["release_s"] is None:
        log(f"warning: {system.name} left streams open at the upstream 30 s after the client")
    if "error" in out:
        return out
    window_events = max(1, out["window_events"])
    out["upstream_cpu_us_per_event"] = (up2 - up1) / window_events * 1e6
    if proxy:
        out["cpu_us_per_event"] = (cpu2 - cpu1) / window_events * 1e6
        out["cpu_us_per_event_run"] = (system.cpu_seconds() - cpu0) / max(1, out["events"]) * 1e6
        out["pss_window_kib"] = (pss1 + pss2) / 2
        out["pss_after_kib"] = system.pss_kib()
        held = out["held"]
        out["pss_kib_per_stream"] = (out["pss_window_kib"] - idle_kib) / held if held else None
        out["pss_kept_mib"] = (out["pss_after_kib"] - idle_kib) / 1024
    new_log = _log_text(stack, system.name)[log_start:].splitlines()
    out["log_lines"] = len(new_log)
    out["log_sample"] = new_log[:5]
    return out


def _summary(name: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{name} ERROR {r['error']}"
    lat = r["latency_ms"] or {}
    text = (f"{name} {r['events_per_s']:.0f} ev/s, p50 {lat.get('p50', 0):.2f} "
            f"p99 {lat.get('p99', 0):.2f} ms, failed {r['failed']}")  # fmt: skip
    if "cpu_us_per_event" in r:
        pss = r["pss_kib_per_stream"]
        text += f", {r['cpu_us_per_event']:.0f} µs/ev, " + (
            f"{pss:.1f} KiB/stream" if pss is not None else "no PSS"
        )
    return text


def long_streams_phase(
    rounds: int = 3,
    window: float = 10.0,
    names: list[str] | None = None,
    scenarios: list[str] | None = None,
) -> dict[str, Any]:
    """Every scenario over `names` on fresh servers, interleaved round by round with
    the order rotated; the servers' temp dir is kept if anything failed or logged."""
    stack = Stack(nginx_connections=STREAMS_NGINX_CONNECTIONS)
    try:
        log("long streams: starting fresh servers")
        stack.start()
        time.sleep(1.0)
        out = _phase(stack, rounds, window, names or SYSTEMS, scenarios or list(SCENARIOS))
    except BaseException:
        log(f"long streams failed; servers that had exited: {stack.dead() or 'none'}")
        stack.close(keep=True)
        raise
    runs = [r for sc in out["scenarios"].values() for rs in sc["runs"].values() for r in rs]
    trouble = any(r.get("error") or r.get("failed") or r.get("log_lines") for r in runs)
    stack.close(keep=trouble)
    return out


def _warm_up(stack: Stack, system: System, stderr: IO[str]) -> None:
    """`WARM_UP_STREAMS` short streams through `system`, all closed when it returns
    (see the module's docstring)."""
    assert stack.ticks is not None
    ticks_fds = fd_count(stack.ticks.proc.pid) or 0
    path = f"{system.ticks_prefix}/ticks?events=100&interval_ms=100"
    client = ClientProcess(
        ["--port", str(system.ticks_port), "--path", path, "--key", system.key,
         "--streams", str(WARM_UP_STREAMS), "--rate", "500", "--interval-ms", "100",
         "--events", "100", "--head-timeout", str(HEAD_TIMEOUT_S)],
        stderr,
    )  # fmt: skip
    try:
        client.expect("open", HEAD_TIMEOUT_S + 10)
        assert client.proc.stdin is not None
        # No window: the client closes the streams, as after a run (a stream that
        # ended would leave its upstream connection pooled by the proxy).
        client.proc.stdin.close()
        client.expect("result", 30)
    finally:
        client.close()
    if _released(stack.ticks, ticks_fds + 8, 30.0) is None:
        log(f"warning: {system.name} left warm-up streams open at the upstream")
    time.sleep(SETTLE_S)


def _phase(
    stack: Stack, rounds: int, window: float, names: list[str], scenarios: list[str]
) -> dict[str, Any]:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    biggest = max(SCENARIOS[k].streams for k in scenarios)
    # The client holds one descriptor per stream; a proxy worker two per stream it took.
    if soft != resource.RLIM_INFINITY and soft < biggest + 1024:
        log(f"warning: open file limit {soft} is too low for {biggest:,} streams")
    with open(stack.tmp / "streams-client.stderr", "a") as stderr:
        for name in names:
            if name != "direct":
                _warm_up(stack, stack.systems[name], stderr)
    idle = {n: stack.systems[n].pss_kib() for n in names if n != "direct"}
    out: dict[str, Any] = {
        "settings": {"rounds": rounds, "window_s": window, "settle_s": SETTLE_S,
                     "systems": names, "nofile": soft},
        "pss_idle_kib": idle,
        "scenarios": {},
    }  # fmt: skip
    with open(stack.tmp / "streams-client.stderr", "w") as stderr:
        for key in scenarios:
            sc = SCENARIOS[key]
            runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            for r in range(rounds):
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    system = stack.systems[name]
                    runs[name].append(
                        run_once(stack, system, sc, window, idle.get(name, 0), stderr)
                    )
                log(f"{sc.title}, round {r + 1}/{rounds}: "
                    + "; ".join(_summary(n, runs[n][-1]) for n in names))  # fmt: skip
            out["scenarios"][key] = {
                "title": sc.title,
                "streams": sc.streams,
                "interval_ms": sc.interval_ms,
                "rate": sc.rate,
                "events_per_stream": events_per_stream(sc, window),
                "runs": runs,
            }
    return out


if __name__ == "__main__":
    sys.exit(client_main())
