"""Memory held by errors (docs/security.md): a refusal keeps nothing of its request alive.

A raised exception holds the frames it passed through, and their locals (the
request's headers, its credential), in its `__traceback__`. An exception
instance kept at module level and raised for every refused request would pile
up those frames for the life of the worker: anonymous memory exhaustion.

Three layers: no module of Fluxgate keeps an exception instance; each kind of
refusal, driven through the app in this process, leaves its request's headers
collectable; and a running worker's RSS stays where it was after thousands of
refused requests with large headers.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import pkgutil
import weakref
from pathlib import Path
from typing import Any

import pytest

import fluxgate
import fluxgate_supervisor
from demo.fake_upstream import FakeUpstreamThread
from fluxgate.config import build_config
from fluxgate.exchange import CONNECTION_SCOPE_KEY, EXCHANGE_SCOPE_KEY, ClientLink, Exchange
from fluxgate.forward import Forwarder
from fluxgate.proxy import ProxyApp
from fluxgate.upstream import UpstreamClient
from tests import rawhttp
from tests.conftest import CLIENT_KEY, make_jwt, proxy_config
from tests.supervisor_process import Supervisor


def test_no_module_keeps_an_exception_instance() -> None:
    found = []
    for package in (fluxgate, fluxgate_supervisor):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            found += [f"{info.name}.{name}" for name, value in vars(module).items()
                      if isinstance(value, BaseException)]  # fmt: skip
    assert found == []


class Headers(list[tuple[bytes, bytes]]):
    """A header list that a weak reference can watch."""


BIG = b"x" * 60_000


@pytest.mark.parametrize(
    ("method", "target", "headers", "status"),
    [
        ("GET", b"/openai/v1/models", [], 401),
        ("GET", b"/openai/v1/models", [(b"authorization", b"Basic abc")], 401),
        ("GET", b"/openai/v1/models", [(b"authorization", b"Bearer nope")], 401),
        ("GET", b"/openai/v1/models", [(b"authorization", b"Bearer a.b.c")], 401),
        ("GET", b"/openai/v1/models", [(b"authorization", b"Bearer " + b"k" * 9000)], 401),
        ("GET", b"/nowhere", [(b"authorization", f"Bearer {CLIENT_KEY}".encode())], 404),
        ("GET", b"/_fluxgate/nothing", [], 404),
        ("POST", b"/_fluxgate/health", [], 405),
        ("GET", b"/openai/../x", [], 400),
        (
            "GET",
            b"/openai/slow-headers?delay_ms=3000",
            [(b"authorization", f"Bearer {CLIENT_KEY}".encode())],
            504,
        ),
    ],
    ids=[
        "none",
        "scheme",
        "unknown",
        "bad-jwt",
        "too-long",
        "no-route",
        "no-endpoint",
        "own-method",
        "dot-segment",
        "timeout",
    ],
)
def test_a_refused_request_leaves_nothing_of_itself_alive(
    up: FakeUpstreamThread,
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    status: int,
) -> None:
    doc = proxy_config(up.url)
    doc["upstreams"]["request_timeout_ms"] = 100
    expired = make_jwt(exp=1)
    app = ProxyApp(build_config(doc, generation=1))
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def run() -> weakref.ref[Headers]:
        app.forwarder = Forwarder(UpstreamClient(), asyncio.get_running_loop(), app.metrics)
        watched: list[weakref.ref[Headers]] = []
        try:
            for extra in (headers, [(b"authorization", f"Bearer {expired}".encode())]):
                request_headers = Headers([(b"host", b"h"), (b"x-big", BIG), *extra])
                watched.append(weakref.ref(request_headers))
                scope = {"type": "http", "method": method, "headers": request_headers,
                         "client": ("127.0.0.1", 1),
                         EXCHANGE_SCOPE_KEY: Exchange(method, target),
                         CONNECTION_SCOPE_KEY: ClientLink()}  # fmt: skip
                await app(scope, receive, send)
                del request_headers, scope
            app.request_log.flush()
        finally:
            await app.forwarder.client.close()
        return watched[0]

    watched = asyncio.run(run())
    gc.collect()
    assert sent[0]["status"] == status
    assert watched() is None, "the refused request's headers are still referenced"


# --- a running worker -------------------------------------------------------------------

REQUESTS = 3000
HEADER = b"x-padding: " + b"p" * 60_000 + b"\r\n"
MAX_GROWTH_KIB = 24 * 1024  # leaking each request's headers would add ~180 MiB


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def refuse_many(port: int, count: int, target: bytes, auth: bytes = b"") -> None:
    """`count` refused requests with a 60 KB header, 50 to a connection."""
    request = b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + HEADER + b"\r\n"
    for _ in range(count // 50):
        with rawhttp.Conn(port) as conn:
            for _ in range(50):
                conn.send(request)
                response = conn.read_response()
                assert response.status in (401, 404), response.status


@pytest.mark.parametrize(
    ("target", "auth"),
    [
        (b"/openai/v1/models", b""),
        (b"/nowhere", b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"),
    ],
    ids=["401", "404"],
)
def test_thousands_of_refusals_with_large_headers_leave_worker_rss_where_it_was(
    proxy: Supervisor, target: bytes, auth: bytes
) -> None:
    (pid,) = proxy.worker_pids()
    refuse_many(proxy.port, 200, target, auth)  # warm: allocator arenas, caches
    before = rss_kib(pid)
    refuse_many(proxy.port, REQUESTS, target, auth)
    growth = rss_kib(pid) - before
    assert growth < MAX_GROWTH_KIB, f"worker RSS grew by {growth} KiB"
