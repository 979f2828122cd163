"""The benchmark's clients: wrk runs, the SSE timer, 1,000 held streams, bulk bodies, reloads.

All of them talk to 127.0.0.1 only and are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .servers import CLIENT_KEY, System

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_report.lua"
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'


# wrk


def _wrk_args(system: System, connections: int, duration: float, key: str) -> list[str]:
    threads = min(connections, 2)
    url = f"http://127.0.0.1:{system.port}{system.json_path}"
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s",
            "-s", str(WRK_SCRIPT), url, "--", key]  # fmt: skip


def _wrk_result(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("BENCHJSON "):
            r: dict[str, Any] = json.loads(line.removeprefix("BENCHJSON "))
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            r["errors"] = sum(r[k] for k in ("connect", "read", "write", "status", "timeout"))
            return r
    raise RuntimeError(f"wrk printed no result:\n{stdout}")


def wrk(system: System, connections: int, duration: float, key: str = CLIENT_KEY) -> dict[str, Any]:
    """POST the small chat completion for `duration` s; latencies are in µs."""
    args = _wrk_args(system, connections, duration, key)
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} ({system.name}) exited {out.returncode}:\n"
                           f"{out.stdout}{out.stderr}")  # fmt: skip
    return _wrk_result(out.stdout)


def wrk_start(system: System, connections: int, max_duration: float) -> subprocess.Popen[str]:
    args = _wrk_args(system, connections, max_duration, CLIENT_KEY)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wrk_stop(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """SIGINT makes wrk stop and print its summary as if the duration had ended."""
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=30)
    return _wrk_result(stdout)


# A minimal blocking HTTP/1.1 client (keep-alive, Content-Length or chunked responses)


class RawConn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, method: str, path: str, key: str = CLIENT_KEY, body: bytes = BODY) -> None:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body)

    def _fill(self) -> bytes:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionResetError("connection closed by the server")
        self.buf += data
        return data

    def read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    def read_response(self) -> tuple[int, bytes]:
        status, headers = self.read_head()
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                self._fill()
            body, self.buf = self.buf[:n], self.buf[n:]
            return status, body
        while not (self.buf.endswith(b"0\r\n\r\n") and _chunked_complete(self.buf)):
            self._fill()
        body, self.buf = self.buf, b""
        return status, body

    def request(self, method: str, path: str, key: str = CLIENT_KEY) -> tuple[int, bytes]:
        self.send(method, path, key)
        return self.read_response()


def _chunked_complete(data: bytes) -> bool:
    """Whether `data` is a whole chunked body (walks the chunk sizes)."""
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return False
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return data.endswith(b"\r\n\r\n", end)
        pos = end + 2 + size + 2
        if pos > len(data):
            return False


# SSE: time to first event, one event per read


def sse_run(system: System, requests: int, events: int, interval_ms: int) -> dict[str, Any]:
    """`requests` streams one after another on one keep-alive connection.

    Per stream: the time from sending the request to the first read that
    holds event bytes, and how many events each read held.
    """
    path = f"{system.sse_prefix}/stream?events={events}&interval_ms={interval_ms}"
    conn = RawConn(system.sse_port)
    ttfb_ms: list[float] = []
    max_per_read = 0
    complete = 0
    try:
        for i in range(requests + 1):  # the first one warms the connection up
            t0 = time.perf_counter()
            conn.send("POST", path)
            first = None
            seen = 0
            while not (b"[DONE]" in conn.buf and conn.buf.endswith(b"0\r\n\r\n")):
                data = conn._fill()
                n = data.count(b"data: ")
                if n and first is None:
                    first = time.perf_counter() - t0
                seen += n
                max_per_read = max(max_per_read, n)
            conn.buf = b""
            if i and first is not None:
                ttfb_ms.append(first * 1000)
                complete += seen == events
    finally:
        conn.close()
    ttfb_ms.sort()
    return {
        "ttfb_p50_ms": ttfb_ms[len(ttfb_ms) // 2],
        "ttfb_min_ms": ttfb_ms[0],
        "max_events_per_read": max_per_read,
        "streams_complete": complete,
        "streams": requests,
    }


# Memory sampling


@dataclass
class RssSampler:
    """Samples a system's RSS every `interval` s in a thread; keeps the peaks."""

    system: System
    interval: float = 0.02
    peak_total: float = 0.0
    peak_worker: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_total = max(self.peak_total, self.system.rss_mib())
            self.peak_worker = max([self.peak_worker, *self.system.worker_rss_mib()])
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()


# 1,000 concurrent open streams


async def _hold_one(
    port: int, request: bytes, opened: list[int], errors: list[str], gate: asyncio.Semaphore
) -> None:
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split()[1])
        if status != 200:
            errors.append(f"status {status}")
            writer.close()
            return
        data = b""
        while b"data: " not in data:
            chunk = await reader.read(1 << 16)
            if not chunk:
                raise ConnectionResetError("closed before the first event")
            data += chunk
    opened[0] += 1
    try:
        while await reader.read(1 << 16):
            pass
        errors.append("closed by the server while held")
    finally:
        writer.close()


async def _hold(system: System, n: int, hold: float, timeout: float) -> dict[str, Any]:
    # Finite (24 events 0.5 s apart): a proxy that does not cancel the upstream
    # side when its client leaves (the minimal pass-through) frees it soon anyway.
    path = f"{system.sse_prefix}/stream?events=24&interval_ms=500"
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    opened, errors = [0], list[str]()
    gate = asyncio.Semaphore(100)  # connects in flight at once

    async def one() -> None:
        try:
            await _hold_one(system.sse_port, request, opened, errors, gate)
        except (OSError, asyncio.IncompleteReadError) as exc:
            errors.append(type(exc).__name__)

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    while opened[0] + len(errors) < n and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.05)
    all_open_s = time.monotonic() - t0
    samples = []
    end = time.monotonic() + hold
    while time.monotonic() < end:
        await asyncio.sleep(0.25)
        samples.append(system.rss_mib())
    held = opened[0] - len([e for e in errors if e.startswith("closed")])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "streams": n,
        "opened": opened[0],
        "held_to_end": held,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "open_all_s": round(all_open_s, 2),
        "rss_mib": max(samples),
        "worker_rss_mib": system.worker_rss_mib(),
    }


def hold_streams(system: System, n: int = 1000, hold: float = 4.0) -> dict[str, Any]:
    """Open `n` slow SSE streams at once, hold them `hold` s, sample RSS, close them."""
    result = asyncio.run(_hold(system, n, hold, timeout=60.0))
    time.sleep(1.5)  # let the proxy notice and close the upstream side
    result["rss_after_close_mib"] = system.rss_mib()
    return result


# 1 GiB through the proxy, each way


def _head(method: str, path: str, length: int | None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
    if length is not None:
        head += f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n"
    return (head + "\r\n").encode()


def upload(system: System, size: int, chunk: int = 1 << 20) -> dict[str, Any]:
    """POST `size` zero bytes from a generator; the upstream counts and drops them."""
    conn = RawConn(system.sse_port)
    block = bytes(chunk)
    t0 = time.perf_counter()
    try:
        conn.sock.sendall(_head("POST", f"{system.sse_prefix}/upload", size))
        sent = 0
        while sent < size:
            n = min(chunk, size - sent)
            conn.sock.sendall(block if n == chunk else block[:n])
            sent += n
        status, body = conn.read_response()
    finally:
        conn.close()
    elapsed = time.perf_counter() - t0
    ok = status == 200 and json.loads(body).get("received") == size
    return {"ok": ok, "status": status, "seconds": elapsed, "mib_s": size / elapsed / 2**20}


def download(system: System, size: int) -> dict[str, Any]:
    """GET `size` bytes into a sink."""
    conn = RawConn(system.sse_port)
    t0 = time.perf_counter()
    try:
        conn.sock.sendall(_head("GET", f"{system.sse_prefix}/download?bytes={size}", None))
        status, _ = conn.read_head()
        received = len(conn.buf)
        sink = bytearray(1 << 20)
        while received < size:
            n = conn.sock.recv_into(sink)
            if not n:
                break
            received += n
    finally:
        conn.close()
    elapsed = time.perf_counter() - t0
    ok = status == 200 and received == size
    return {"ok": ok, "status": status, "seconds": elapsed, "mib_s": size / elapsed / 2**20}


# Reload


class WorkerConns:
    """One keep-alive connection pinned to each worker (told apart by the health pid)."""

    def __init__(self, system: System, workers: int = 2) -> None:
        self.conns: dict[int, RawConn] = {}
        spare: list[RawConn] = []
        for _ in range(200):
            conn = RawConn(system.port)
            _, body = conn.request("GET", "/_fluxgate/health")
            pid = json.loads(body)["pid"]
            if pid in self.conns:
                spare.append(conn)
            else:
                self.conns[pid] = conn
            if len(self.conns) == workers:
                break
        for conn in spare:
            conn.close()
        if len(self.conns) < workers:
            raise RuntimeError(f"reached only {len(self.conns)} of {workers} workers")
        self.path = system.json_path
        self.unexpected: list[int] = []

    def wait_key(self, key: str, t0: float, timeout: float = 5.0) -> list[float] | None:
        """Seconds from `t0` until `key` was first accepted by each worker, sorted.

        The workers are polled in turn; None if one has not taken it within `timeout`.
        """
        pending = dict(self.conns)
        live: list[float] = []
        while pending:
            for pid, conn in list(pending.items()):
                status, _ = conn.request("POST", self.path, key)
                if status == 200:
                    live.append(time.perf_counter() - t0)
                    del pending[pid]
                elif status != 401:
                    self.unexpected.append(status)
            if time.perf_counter() - t0 > timeout:
                return None
            time.sleep(0.0005)
        return live

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
