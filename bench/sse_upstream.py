"""The benchmark's second upstream: timed SSE streams and bulk bodies, on raw asyncio + uvloop.

    GET|POST /stream?events=N&interval_ms=M   N SSE events, the first at once, then one every
                                             M ms, each its own chunk and write; the last is
                                             `data: [DONE]`
    POST     /upload                          reads and discards the body (Content-Length or
                                             chunked), answers {"received": bytes}
    GET      /download?bytes=N                N zero bytes with a Content-Length

Keep-alive, HTTP/1.1 only, no validation beyond what the benchmark sends.
Run: python -m bench.sse_upstream --port P
"""

from __future__ import annotations

import argparse
import asyncio
import json
from urllib.parse import parse_qs

import uvloop

_ZEROS = bytes(256 * 1024)


def _event(i: int) -> bytes:
    delta = {"choices": [{"index": 0, "delta": {"content": f"token{i} "}}]}
    return b"data: " + json.dumps(delta).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> int:
    """Read and drop the request body; return its size."""
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return total
            await reader.readexactly(size + 2)
            total += size
    remaining = int(headers.get(b"content-length", b"0"))
    total = remaining
    while remaining:
        data = await reader.read(min(remaining, 1 << 20))
        if not data:
            raise ConnectionResetError("body cut short")
        remaining -= len(data)
    return total


async def _stream(writer: asyncio.StreamWriter, events: int, interval: float) -> None:
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    for i in range(events):
        last = i == events - 1
        data = _chunk(b"data: [DONE]\n\n" if last else _event(i))
        writer.write(head + data if i == 0 else data)
        await writer.drain()
        if not last:
            await asyncio.sleep(interval)
    writer.write(b"0\r\n\r\n")


async def _download(writer: asyncio.StreamWriter, size: int) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
        b"content-length: %d\r\n\r\n" % size
    )
    while size:
        n = min(size, len(_ZEROS))
        writer.write(_ZEROS[:n] if n < len(_ZEROS) else _ZEROS)
        size -= n
        await writer.drain()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
            path, _, query = target.decode().partition("?")
            params = {k: v[0] for k, v in parse_qs(query).items()}
            received = await _read_body(reader, headers)
            if path == "/stream":
                interval = int(params.get("interval_ms", "10")) / 1000
                await _stream(writer, int(params.get("events", "5")), interval)
            elif path == "/download":
                await _download(writer, int(params.get("bytes", "0")))
            else:
                status = b"200 OK" if path == "/upload" and method == b"POST" else b"404 Not Found"
                body = json.dumps({"received": received}).encode()
                writer.write(
                    b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (status, len(body), body)
                )
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass  # the client (or the proxy in front) went away: nothing to do
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
