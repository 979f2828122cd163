"""A scripted upstream on a real socket, and a worker's upstream client to talk to it.

For the tests that drive fluxgate.upstream in one event loop (test_relay,
test_upstream_wire): the upstream answers each request with bytes the test
wrote, step by step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from yarl import URL

from fluxgate.upstream import MAX_IDLE, UpstreamClient

Step = bytes | asyncio.Event  # write these bytes, or wait for the test to set this


class ScriptedUpstream:
    """Answers the n-th request of the server with `scripts[n]`, on one keep-alive
    connection or several; closes a connection when a script ends with b""."""

    def __init__(self, *scripts: list[Step]) -> None:
        self.scripts = list(scripts)
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> URL:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}/x")

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.scripts:
                await reader.readuntil(b"\r\n\r\n")
                for step in self.scripts.pop(0):
                    if isinstance(step, asyncio.Event):
                        await step.wait()
                    elif step == b"":
                        return
                    else:
                        writer.write(step)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def run(test: Callable[[UpstreamClient], Awaitable[None]], max_idle: int = MAX_IDLE) -> None:
    """`test` with a worker's upstream client, in a loop of its own, within 10 s."""

    async def with_client() -> None:
        client = UpstreamClient(max_idle)
        try:
            await test(client)
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(with_client(), 10))
