"""The yardstick of BENCHMARKS.md: a minimal uvicorn + aiohttp pass-through.

A raw ASGI app, one aiohttp ClientSession per worker, the client's
credential swapped for a Bearer key, bodies streamed both ways, no auth
check, no logging. It is what any Python proxy on this stack costs at least;
Fluxgate is reported as a ratio to it.

    PASSTHROUGH_ROUTES="/openai=http://127.0.0.1:9001,/sse=http://127.0.0.1:9002" \
    PASSTHROUGH_KEY=sk-upstream uvicorn bench.passthrough:app --workers 2 \
        --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from yarl import URL

ROUTES = [
    (prefix.encode(), origin)
    for prefix, _, origin in (r.partition("=") for r in os.environ["PASSTHROUGH_ROUTES"].split(","))
]
AUTH = "Bearer " + os.environ.get("PASSTHROUGH_KEY", "sk-upstream")
HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"host", b"authorization",
}  # fmt: skip
session: aiohttp.ClientSession | None = None


async def _lifespan(receive: Any, send: Any) -> None:
    global session
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None),
            )
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if session is not None:
                await session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _body(receive: Any) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body", False):
            return


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    path: bytes = scope["raw_path"]
    route = next((r for r in ROUTES if path == r[0] or path.startswith(r[0] + b"/")), None)
    if route is None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    prefix, origin = route
    target = path[len(prefix) :] or b"/"
    if scope["query_string"]:
        target += b"?" + scope["query_string"]
    headers = [
        (k.decode(), v.decode("latin-1")) for k, v in scope["headers"] if k not in HOP_BY_HOP
    ]
    headers.append(("Authorization", AUTH))
    has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
    assert session is not None
    async with session.request(
        scope["method"],
        URL(origin + target.decode("latin-1"), encoded=True),
        headers=headers,
        data=_body(receive) if has_body else None,
        allow_redirects=False,
    ) as response:
        out = [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP]
        await send({"type": "http.response.start", "status": response.status, "headers": out})
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
