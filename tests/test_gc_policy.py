"""Garbage collection (fluxgate.gcpolicy): no exchange leaves a reference cycle behind.

The worker never lets CPython's own trigger run a full collection, because a
full collection visits every object of every open stream. That is safe only
while exchanges leave nothing for the cyclic collector: each kind of exchange
below runs through the real protocol, app and upstream client on a uvicorn
server in this process, and afterwards a collection must find no garbage of
ours, uvicorn's or aiohttp's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from demo.fake_upstream import FakeUpstreamThread
from fluxgate.config import build_config
from fluxgate.gcpolicy import PER_CONNECTION, GcPolicy
from fluxgate.protocol import FluxgateProtocol
from fluxgate.proxy import ProxyApp
from tests.conftest import CLIENT_KEY, proxy_config

WATCHED = ("fluxgate", "uvicorn", "aiohttp", "httptools", "multidict", "yarl")


def cyclic_garbage() -> list[str]:
    """The types of what only the cyclic collector would free, from the watched packages."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = sorted(
            {
                f"{type(o).__module__}.{type(o).__qualname__}"
                for o in gc.garbage
                if type(o).__module__.startswith(WATCHED)
            }
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


async def exchange(port: int, request: bytes, read_until: bytes | None) -> bytes:
    """Send `request`; read until `read_until` appears (then hang up) or the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b""
    try:
        writer.write(request)
        while read_until is None or read_until not in data:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            data += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return data


def post(path: str, body: bytes = b"{}", key: str = CLIENT_KEY, close: bool = True) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode() + body


CASES: dict[str, tuple[bytes, bytes | None, bytes]] = {
    # name: (request, read until (None: to the close), expected in the answer)
    "completion": (post("/openai/v1/chat/completions"), None, b"HTTP/1.1 200"),
    "stream": (post("/openai/sse?events=5"), None, b"data: event 5"),
    "stream left by its client": (
        post("/openai/stream-forever?interval_ms=5"),
        b"data: event 3",
        b"data: event 3",
    ),
    "stream cut by its deadline": (
        post("/openai/stream-forever?interval_ms=20"),
        None,
        b"data: event 2",
    ),
    "keep-alive then close": (
        post("/openai/v1/models", close=False) + post("/openai/v1/models"),
        None,
        b"HTTP/1.1 200",
    ),
    "refused credential": (post("/openai/v1/models", key="nope"), None, b"HTTP/1.1 401"),
    "no route": (post("/nowhere"), None, b"HTTP/1.1 404"),
    "upstream reset": (post("/openai/reset"), None, b"HTTP/1.1 502"),
    "upstream answers garbage": (post("/openai/garbage"), None, b"HTTP/1.1 502"),
    "upstream answers 101": (post("/openai/switching-protocols"), None, b"HTTP/1.1 502"),
    "streamed request body": (
        post("/openai/v1/chat/completions")
        .replace(b"Content-Length: 2\r\n", b"Transfer-Encoding: chunked\r\n")
        .replace(b"\r\n\r\n{}", b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
        None,
        b"HTTP/1.1 200",
    ),
    "upstream timeout": (post("/openai/stall"), None, b"HTTP/1.1 504"),
    "upstream cuts its body": (post("/openai/close-early"), None, b"HTTP/1.1 200"),
    "upstream body does not parse": (post("/openai/bad-chunk-mid-body"), None, b"HTTP/1.1 200"),
    "upstream resets mid-body": (post("/openai/reset-mid-body"), None, b"HTTP/1.1 200"),
    "upstream hangs up a pooled connection": (
        post("/openai/hang-up-next", close=False) + post("/openai/v1/models"),
        None,
        b"HTTP/1.1 200",
    ),
    "malformed request": (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n", None, b"400"),
    "own endpoint": (b"GET /_fluxgate/health HTTP/1.1\r\nHost: t\r\n\r\n", b"}", b"200"),
}


@pytest.fixture(scope="module")
def served(up: FakeUpstreamThread) -> Iterator[tuple[asyncio.AbstractEventLoop, int]]:
    """A uvicorn server with Fluxgate's protocol and app, on a loop of this thread."""
    doc = proxy_config(up.url)
    doc["upstreams"]["request_timeout_ms"] = 300
    app = ProxyApp(build_config(doc, generation=1))
    config = uvicorn.Config(
        app,
        http=functools.partial(FluxgateProtocol, metrics=app.metrics),  # type: ignore[arg-type]
        loop="none",
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config.load()
    server.lifespan = config.lifespan_class(config)  # what Server.serve sets up first
    loop = asyncio.new_event_loop()
    loop.run_until_complete(server.startup(sockets=[sock]))
    try:
        yield loop, sock.getsockname()[1]
    finally:
        loop.run_until_complete(server.shutdown())
        loop.close()
        sock.close()


@pytest.mark.parametrize("case", list(CASES))
def test_an_exchange_leaves_no_reference_cycle(
    served: tuple[asyncio.AbstractEventLoop, int], case: str
) -> None:
    loop, port = served
    request, read_until, expected = CASES[case]
    # Once for warm-up (pooled connections, caches), once to be measured.
    for _ in range(2):
        gc.collect()
        answer = loop.run_until_complete(exchange(port, request, read_until))
        assert expected in answer
        # Let the server side see the close and finish its task.
        loop.run_until_complete(asyncio.sleep(0.05))
    found = cyclic_garbage()
    assert found == [], f"{case}: reference cycles left: {found}"


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """A policy's start changes the process-wide collector: undone after the test."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("gc_restored")
def test_a_reference_cycle_is_still_freed_by_a_full_collection() -> None:
    policy = GcPolicy(check_interval=0.0)
    policy.start()
    cycle: list[Any] = []
    cycle.append(cycle)
    del cycle
    gc.freeze()  # as the tick does: the cycle is now frozen
    assert policy.collect() >= 1


@pytest.mark.usefixtures("gc_restored")
def test_a_heap_doubled_with_no_connection_opened_is_collected() -> None:
    policy = GcPolicy(check_interval=0.0, growth=2.0)
    policy.start()
    before = policy.full_collections
    policy.tick()
    assert policy.full_collections == before  # nothing grew
    held = [[i] for i in range(policy.baseline // 2 + 1000)]  # 2+ blocks each
    policy.tick()
    assert policy.full_collections == before + 1
    assert policy.baseline >= len(held)


def test_an_open_stream_takes_fewer_heap_blocks_than_the_policy_allows_it(
    served: tuple[asyncio.AbstractEventLoop, int],
) -> None:
    """The heap a stream takes, in memory blocks, counted with its client and
    upstream in this process too: so the real figure is lower still."""
    loop, port = served
    streams = 40
    request = post("/openai/stream-forever?interval_ms=50")

    async def open_streams() -> list[asyncio.StreamWriter]:
        writers = []
        for _ in range(streams):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            writers.append(writer)
            data = b""
            while b"data: event 1" not in data:
                chunk = await asyncio.wait_for(reader.read(65536), 5)
                assert chunk, "the stream ended"
                data += chunk
        return writers

    async def close(writers: list[asyncio.StreamWriter]) -> None:
        for writer in writers:
            writer.close()
        await asyncio.sleep(0.05)

    loop.run_until_complete(close(loop.run_until_complete(open_streams())))  # warm-up
    gc.collect()
    before = sys.getallocatedblocks()
    writers = loop.run_until_complete(open_streams())
    gc.collect()
    kept = (sys.getallocatedblocks() - before) / streams
    loop.run_until_complete(close(writers))
    assert kept < PER_CONNECTION, f"{kept:.0f} blocks a stream"


@pytest.mark.usefixtures("gc_restored")
def test_growth_the_open_connections_explain_runs_no_full_collection() -> None:
    connections = [0]
    policy = GcPolicy(connections=lambda: connections[0], check_interval=0.0, growth=2.0)
    policy.start()
    before = policy.full_collections
    # More than doubled (2 or 3 blocks a list), within the allowance of the
    # connections opened since (4 blocks a list).
    held = [[i] for i in range(policy.baseline // 2 + 1000)]
    connections[0] = 4 * len(held) // PER_CONNECTION + 1
    policy.tick()
    assert policy.full_collections == before
    # The connections go and the objects stay (a leak): the next look collects.
    connections[0] = 0
    policy.tick()
    assert policy.full_collections == before + 1
    assert policy.baseline >= len(held)
