"""Resources (hardening): 2 GiB up and 2 GiB down through one worker in bounded memory,
1,000 concurrent slow SSE streams held at once and all completed, and no file
descriptor or upstream connection left behind afterwards.

test_streaming.py already moves 64 MiB each way (Content-Length and chunked
uploads, a download) with the same memory bound; here the sizes are the ones the
spec names. Memory is the worker's peak RSS growth over the transfer: VmHWM after
minus VmRSS before, with the high-water mark reset first (/proc/PID/clear_refs).

File descriptors and connections are read from /proc: a worker's sockets
(/proc/PID/fd) are matched to the kernel's TCP table (/proc/net/tcp) by inode, so
the test can tell client connections from upstream connections and see their state.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from demo.fake_responses import download_sha256
from demo.fake_upstream import FakeUpstreamThread
from tests import rawhttp
from tests.conftest import CLIENT_KEY, proxy_config
from tests.supervisor_process import Supervisor, wait_until

MiB = 1 << 20
GiB = 1 << 30
BIG = 2 * GiB
MAX_GROWTH_MIB = 32
STREAMS = 1000
EVENTS = 12
INTERVAL_MS = 300


# --- /proc helpers ----------------------------------------------------------------------


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class PeakGrowth:
    """Peak RSS growth of `pid` over a block, in MiB."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.mib = 0.0

    def __enter__(self) -> PeakGrowth:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # reset VmHWM to VmRSS
        self.before = status_kib(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.mib = (status_kib(self.pid, "VmHWM") - self.before) / 1024


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: str  # /proc/net/tcp hex state: 01 ESTABLISHED, 0A LISTEN, 08 CLOSE_WAIT...


def sockets_of(pid: int) -> list[TcpSocket]:
    """The TCP sockets `pid` holds open (IPv4: everything here is on 127.0.0.1)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            local, remote = fields[1], fields[2]
            found.append(
                TcpSocket(int(local.split(":")[1], 16), int(remote.split(":")[1], 16), fields[3])
            )
    return found


def upstream_sockets(pid: int, upstream_port: int) -> list[TcpSocket]:
    return [s for s in sockets_of(pid) if s.remote_port == upstream_port]


def client_sockets(pid: int, proxy_port: int) -> list[TcpSocket]:
    return [s for s in sockets_of(pid) if s.local_port == proxy_port and s.state != "0A"]


def own_fds(pid: int, upstream_port: int) -> int:
    """A worker's descriptors other than its keep-alive connections to the upstream."""
    return fd_count(pid) - len(upstream_sockets(pid, upstream_port))


def warm_up(sup: Supervisor, pids: list[int], timeout: float = 10.0) -> None:
    """Until every worker in `pids` has relayed one request (fresh connections land on
    workers as the kernel decides; /_fluxgate/health says which one it was)."""
    warmed: set[int] = set()
    deadline = time.monotonic() + timeout
    while warmed != set(pids):
        assert time.monotonic() < deadline, f"requests never reached {set(pids) - warmed}"
        with rawhttp.Conn(sup.port) as conn:
            health = conn.request("GET", "/_fluxgate/health", [rawhttp.host(sup.port)])
            pid = int(json.loads(health.body)["pid"])
            if pid not in warmed:
                resp = conn.request("GET", "/openai/v1/models", headers(sup))
                assert resp.status == 200
                warmed.add(pid)


def settled_fds(pids: list[int], upstream_port: int, quiet: float = 0.3) -> dict[int, int]:
    """`own_fds` of each worker once unchanged for `quiet` seconds (bounded). Workers open
    some files after their first requests (metrics are flushed up to 50 ms later) and
    announce it nowhere, so there is no event to wait for: this polls."""
    last: dict[int, int] = {}
    stable_since = time.monotonic()
    deadline = stable_since + 5
    while time.monotonic() < deadline:
        now = {pid: own_fds(pid, upstream_port) for pid in pids}
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= quiet:
            return now
        time.sleep(0.05)
    raise AssertionError(f"worker descriptors never settled: {last}")


def in_thread(fn: Callable[[], Any]) -> Future[Any]:
    """Run `fn` in a thread (hashing releases the GIL) while the test moves bytes."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


# --- 2 GiB each way through one worker -----------------------------------------------


@pytest.fixture(scope="module")
def one_worker(up: FakeUpstreamThread, module_supervisor: Callable[..., Supervisor]) -> Supervisor:
    config = proxy_config(up.url)
    config["upstreams"]["request_timeout_ms"] = 120_000  # the deadline covers the body too
    return module_supervisor(config, workers=1)


def upload_blocks(total: int) -> Iterator[bytes]:
    """1 MiB blocks that all differ (each starts with its index), so a lost, repeated or
    reordered block changes the digest."""
    body = bytes(range(256)) * (MiB // 256 - 1)
    for i in range(total // MiB):
        yield struct.pack(">Q", i) * 32 + body[: MiB - 256]


def expected_upload() -> str:
    sha = hashlib.sha256()
    for block in upload_blocks(BIG):
        sha.update(block)
    return sha.hexdigest()


def headers(sup: Supervisor, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY), *extra]


@pytest.mark.slow
def test_2_gib_upload_through_one_worker_grows_its_rss_by_under_32_mib(
    one_worker: Supervisor, up: FakeUpstreamThread
) -> None:
    (pid,) = one_worker.worker_pids()
    expected = in_thread(expected_upload)
    started = time.monotonic()
    with PeakGrowth(pid) as growth, rawhttp.Conn(one_worker.port, timeout=60) as conn:
        conn.send(rawhttp.build_request(
            "POST", "/openai/upload", headers(one_worker, ("Content-Length", str(BIG)))
        ))  # fmt: skip
        for block in upload_blocks(BIG):
            conn.sock.sendall(block)
        resp = conn.read_response()
    elapsed = time.monotonic() - started
    print(f"2 GiB up in {elapsed:.1f} s ({BIG / MiB / elapsed:.0f} MiB/s), worker RSS "
          f"{growth.before / 1024:.1f} MiB, peak growth {growth.mib:.1f} MiB")  # fmt: skip
    assert resp.status == 200, resp.body
    assert json.loads(resp.body) == {"body_length": BIG, "body_sha256": expected.result(60)}
    assert up.requests[-1].body_length == BIG and not up.requests[-1].chunked
    assert growth.mib < MAX_GROWTH_MIB


@pytest.mark.slow
def test_2_gib_download_through_one_worker_grows_its_rss_by_under_32_mib(
    one_worker: Supervisor,
) -> None:
    (pid,) = one_worker.worker_pids()
    expected = in_thread(lambda: download_sha256(BIG))
    sha = hashlib.sha256()
    received = 0
    started = time.monotonic()
    with PeakGrowth(pid) as growth, rawhttp.Conn(one_worker.port, timeout=60) as conn:
        conn.send(
            rawhttp.build_request("GET", f"/openai/download?bytes={BIG}", headers(one_worker))
        )
        resp = conn.read_head()
        assert resp.status == 200
        assert resp.header_values("content-length") == [str(BIG).encode()]
        while received < BIG:
            data = conn.rfile.read1(4 * MiB)
            assert data, f"connection closed after {received} bytes"
            received += len(data)
            sha.update(data)
    elapsed = time.monotonic() - started
    print(f"2 GiB down in {elapsed:.1f} s ({BIG / MiB / elapsed:.0f} MiB/s), worker RSS "
          f"{growth.before / 1024:.1f} MiB, peak growth {growth.mib:.1f} MiB")  # fmt: skip
    assert received == BIG
    assert sha.hexdigest() == expected.result(60)
    assert growth.mib < MAX_GROWTH_MIB


# --- 1,000 concurrent slow SSE streams ---------------------------------------------------


@pytest.fixture
def enough_fds() -> Iterator[None]:
    """The test process holds both ends' worth of sockets (1,000 clients and the fake
    upstream's 1,000 connections) and the workers inherit its limit: raise the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * STREAMS + 1000
    if soft >= need:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class Stream:
    status: int = 0
    events: int = 0
    complete: bool = False
    headers_at: float = 0.0
    first_event_at: float = 0.0
    ended_at: float = 0.0


async def one_stream(port: int, result: Stream) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(rawhttp.build_request(
            "GET", f"/openai/sse?events={EVENTS}&interval_ms={INTERVAL_MS}",
            [("Host", f"127.0.0.1:{port}"), rawhttp.bearer(CLIENT_KEY)],
        ))  # fmt: skip
        head = await reader.readuntil(b"\r\n\r\n")
        result.headers_at = time.monotonic()
        result.status = int(head.split(b" ", 2)[1])
        assert b"transfer-encoding: chunked" in head.lower()
        body = b""
        while True:  # de-chunk
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                result.complete = await reader.readexactly(2) == b"\r\n"
                break
            body += (await reader.readexactly(size + 2))[:-2]
            if not result.first_event_at:
                result.first_event_at = time.monotonic()
        expected = b"".join(b"data: event %d\n\n" % i for i in range(1, EVENTS + 1))
        result.events = body.count(b"data: event") if body == expected else -1
        result.ended_at = time.monotonic()
    finally:
        writer.close()
        await writer.wait_closed()


async def run_streams(port: int, results: list[Stream], deadline: float) -> None:
    async with asyncio.timeout(deadline):
        await asyncio.gather(*(one_stream(port, r) for r in results))


@pytest.mark.slow
@pytest.mark.usefixtures("enough_fds")
def test_1000_concurrent_slow_sse_streams_are_held_at_once_and_all_complete_leaking_nothing(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    """1,000 clients each open an SSE stream of 12 events 300 ms apart through two
    workers (max_connections 1,100). Every stream must arrive whole, all 1,000 must
    be open at the same moment, and afterwards nothing may be left behind: no client
    socket in a worker, and every remaining worker socket an idle keep-alive
    connection to the upstream (aiohttp's pool) matched one for one by an open
    connection at the upstream. When the upstream then closes its idle connections
    (as providers do), every worker is back to exactly its starting fd count (taken
    after each worker relayed one request: what it opens lazily then is no leak)."""
    config = proxy_config(upstream.url, server={"max_connections": STREAMS + 100})
    config["upstreams"]["request_timeout_ms"] = 60_000
    sup = make_supervisor(config, workers=2)
    sup.wait_for_generation(1)
    pids = sup.worker_pids()
    warm_up(sup, pids)  # what a worker opens on its first proxied request is no leak
    assert wait_until(lambda: all(not client_sockets(pid, sup.port) for pid in pids), timeout=5)
    baseline = settled_fds(pids, upstream.port)

    results = [Stream() for _ in range(STREAMS)]
    started = time.monotonic()
    growth = {pid: PeakGrowth(pid) for pid in pids}
    for watch in growth.values():
        watch.__enter__()
    asyncio.run(run_streams(sup.port, results, deadline=60))
    for watch in growth.values():
        watch.__exit__()
    elapsed = time.monotonic() - started

    assert [r.status for r in results] == [200] * STREAMS
    assert [r.events for r in results] == [EVENTS] * STREAMS
    assert all(r.complete for r in results)
    last_start = max(r.first_event_at for r in results)
    first_end = min(r.ended_at for r in results)
    print(f"{STREAMS} streams in {elapsed:.1f} s; all open at once from "
          f"{last_start - started:.2f} s to {first_end - started:.2f} s; worker peak RSS "
          + ", ".join(f"+{g.mib:.1f} MiB" for g in growth.values()))  # fmt: skip
    assert last_start < first_end, "the streams were never all open at the same time"
    assert upstream.connections_opened >= STREAMS  # one upstream exchange per stream
    assert all(g.mib < 64 for g in growth.values())

    # No leak: client sockets all gone; what remains are pooled upstream connections,
    # established on both ends (none half-closed), and nothing else.
    def settled() -> bool:
        return all(not client_sockets(pid, sup.port) for pid in pids)

    assert wait_until(settled, timeout=5), {pid: client_sockets(pid, sup.port) for pid in pids}
    pooled = {pid: upstream_sockets(pid, upstream.port) for pid in pids}
    assert all(s.state == "01" for socks in pooled.values() for s in socks), pooled
    assert wait_until(
        lambda: (
            sum(len(upstream_sockets(pid, upstream.port)) for pid in pids)
            == upstream.open_connections
        ),
        timeout=5,
    )
    assert {pid: own_fds(pid, upstream.port) for pid in pids} == baseline
    print("after: worker fds " + ", ".join(
        f"{fd_count(pid)} (baseline {baseline[pid]} + {len(pooled[pid])} pooled)" for pid in pids
    ) + f"; upstream holds {upstream.open_connections} idle keep-alive connections")  # fmt: skip
    assert upstream.open_connections <= STREAMS

    # The upstream closes its idle keep-alive connections: the workers follow at once.
    upstream.stop()
    assert upstream.open_connections == 0
    assert wait_until(lambda: {pid: fd_count(pid) for pid in pids} == baseline, timeout=5), (
        {pid: fd_count(pid) for pid in pids},
        baseline,
    )
    assert sup.worker_pids() == pids


def soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-files limit for {pid}")


def test_workers_are_not_capped_by_a_low_soft_fd_limit(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    """Started from a shell with the common soft limit of 1024 descriptors, a worker
    could hold only ~500 proxied requests (two descriptors each) although the default
    max_connections admits 1024: the excess failed as 502s. The supervisor raises its
    soft limit to the hard one before forking, so workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"hard RLIMIT_NOFILE is {hard}: nothing to raise to")
    sup = make_supervisor(proxy_config(upstream.url), start=False)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        sup.start(wait=False)  # the supervisor inherits the low soft limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    sup.wait_for_log(r"serving address=", timeout=15)
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert sup.proc is not None and soft_nofile(sup.proc.pid) == expected
    assert [soft_nofile(pid) for pid in sup.worker_pids()] == [expected]
