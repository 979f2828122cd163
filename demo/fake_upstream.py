"""A fake LLM provider speaking raw HTTP/1.1, for the Fluxgate demo and tests.

It is deliberately built on ``asyncio.start_server`` with a hand-written
HTTP/1.1 parser instead of a web framework: frameworks normalise header names,
merge duplicates and re-frame bodies, while the proxy tests must see exactly
the bytes Fluxgate put on the wire (header case, order, duplicates, chunk
framing).  Every request is recorded as a :class:`RecordedRequest`.

Run in-process (``FakeUpstream`` inside a loop, or ``FakeUpstreamThread`` with
its own loop in a daemon thread), or as a program for the demo::

    python -m demo.fake_upstream --host 127.0.0.1 --port 9000

Routes and payloads live in :mod:`demo.fake_responses`; this module owns the
wire: parsing, recording, connection tracking and the two ways to run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import signal
import ssl
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

from demo import fake_responses as fr

STORE_CAP = 1 << 20  # bytes of raw/decoded body kept per request
MAX_HEAD = 1 << 20  # request heads bigger than this are rejected
READ_SIZE = 1 << 16  # socket read size
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class BadRequest(Exception):
    """The peer sent something that is not valid HTTP/1.1 framing."""


@dataclass
class RecordedRequest:
    """One request exactly as the fake received it."""

    method: str
    target: bytes  # request-target as on the wire (path + query, undecoded)
    version: str
    headers: list[tuple[bytes, bytes]]  # names as sent; order and duplicates kept
    raw_head: bytes  # request line + headers + final CRLFCRLF, verbatim
    raw_body: bytes = b""  # body as framed on the wire (chunk framing included), capped
    body: bytes = b""  # decoded body, capped at STORE_CAP
    body_length: int = 0  # full decoded length, uncapped
    body_sha256: str = EMPTY_SHA256
    chunked: bool = False
    connection_id: int = 0
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    received_at: float = 0.0  # time.monotonic() when the body ended
    complete: bool = False  # False: the body was cut short (EOF/reset/bad framing)

    @property
    def path(self) -> str:
        return self.target.split(b"?", 1)[0].decode("latin-1")

    @property
    def query(self) -> dict[str, str]:
        qs = self.target.partition(b"?")[2].decode("latin-1")
        return {k: v[0] for k, v in parse_qs(qs, keep_blank_values=True).items()}

    def provider_key(self) -> str | None:
        """The key the request carries: a Bearer token, else x-api-key or api-key."""
        auth = self.header("authorization")
        if auth is not None and auth[:7].lower() == b"bearer ":
            return auth[7:].decode("latin-1")
        for name in ("x-api-key", "api-key"):
            if (value := self.header(name)) is not None:
                return value.decode("latin-1")
        return None

    def header(self, name: str | bytes) -> bytes | None:
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str | bytes) -> list[bytes]:
        key = (name.encode("latin-1") if isinstance(name, str) else name).lower()
        return [v for n, v in self.headers if n.lower() == key]

    def json(self) -> Any:
        return json.loads(self.body)


class _Conn:
    """Per-connection state: a pushback buffer over the StreamReader."""

    def __init__(self, cid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.id = cid
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        self.gone = asyncio.Event()  # client went away, or the server is stopping
        self.hang_up_next = False  # see fake_responses.Reply.hang_up_next

    async def fill(self) -> bool:
        if self.eof:
            return False
        data = await self.reader.read(READ_SIZE)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def read_until(self, delim: bytes, limit: int) -> bytes | None:
        """Bytes up to and including ``delim``; None on EOF with nothing buffered."""
        start = 0
        while True:
            i = self.buf.find(delim, start)
            if i >= 0:
                out = bytes(self.buf[: i + len(delim)])
                del self.buf[: i + len(delim)]
                return out
            if len(self.buf) > limit:
                raise BadRequest("line or head too long")
            start = max(0, len(self.buf) - len(delim) + 1)
            if not await self.fill():
                if self.buf:
                    raise ConnectionResetError("EOF in the middle of a request")
                return None

    async def read_some(self, n: int) -> bytes:
        """Between 1 and ``n`` bytes.  ``buf`` is refilled one socket read at a time
        only when empty, so a GiB body never accumulates in memory."""
        if not self.buf and not await self.fill():
            raise ConnectionResetError("EOF in the middle of a body")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class _BodySink:
    """Accumulates a body streaming: hash + length over all of it, capped prefixes kept."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.decoded = bytearray()
        self.length = 0
        self.sha = hashlib.sha256()

    def add_raw(self, b: bytes) -> None:
        if len(self.raw) < STORE_CAP:
            self.raw += b[: STORE_CAP - len(self.raw)]

    def add_data(self, b: bytes) -> None:
        self.length += len(b)
        self.sha.update(b)
        if len(self.decoded) < STORE_CAP:
            self.decoded += b[: STORE_CAP - len(self.decoded)]

    async def read_exact(self, conn: _Conn, n: int) -> None:
        while n:
            data = await conn.read_some(min(n, READ_SIZE))
            n -= len(data)
            self.add_raw(data)
            self.add_data(data)


class FakeUpstream:
    """The fake provider. Observability methods are thread-safe and blocking:
    call them from a thread other than the server's loop (or via ``asyncio.to_thread``)."""

    def __init__(self, *, sse_interval_ms: int = 0, ssl: ssl.SSLContext | None = None) -> None:
        self.sse_interval_ms = sse_interval_ms  # default gap between streamed events
        # A server context makes it an https:// provider (tests of upstream TLS);
        # one with verify_mode CERT_REQUIRED asks the proxy for a client certificate.
        self.ssl = ssl
        self.host = "127.0.0.1"
        self.port = 0
        self.connections_opened = 0
        self.open_connections = 0
        self.replies_written = 0  # route handlers that have returned (their bytes are sent)
        # Provider key -> (status, extra headers) it is answered with, whatever the
        # route: a key the provider refuses (401) or rate-limits (429 + Retry-After).
        self.key_answers: dict[str, tuple[int, list[tuple[str, str]]]] = {}
        self._requests: list[RecordedRequest] = []
        self._closed_at: dict[int, tuple[float, str]] = {}  # conn id -> (monotonic, by)
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._conns: dict[_Conn, asyncio.Task[Any]] = {}

    # --- lifecycle -------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=4 * READ_SIZE, ssl=self.ssl
        )
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn, task in list(self._conns.items()):
            conn.gone.set()  # lets /stall and streams finish on their own...
            task.cancel()  # ...and interrupts reads blocked on idle keep-alive sockets
        if self._conns:
            await asyncio.wait(list(self._conns.values()), timeout=5)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    # --- observability (thread-safe) ---------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._cond:
            return list(self._requests)

    def clear(self) -> None:
        """Forget recorded requests (connection counters are kept)."""
        with self._cond:
            self._requests.clear()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least ``n`` requests were recorded (a request is recorded when
        its body ends, see ``complete``); TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= n, timeout):
                got = len(self._requests)
                raise TimeoutError(f"expected {n} requests, got {got}")
            return list(self._requests)

    def wait_for_replies(self, n: int, timeout: float = 5.0) -> None:
        """Block until at least ``n`` route handlers have written all they write (a
        /stray handler returns only after its stray response); TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.replies_written >= n, timeout):
                raise TimeoutError(f"expected {n} replies, got {self.replies_written}")

    def wait_for_disconnect(self, after_path: str, timeout: float = 5.0) -> float:
        """Block until the connection that carried the latest request for ``after_path``
        (path without query) is closed; return the ``time.monotonic()`` of the close."""

        def closed() -> float | None:
            for r in reversed(self._requests):
                if r.path == after_path:
                    entry = self._closed_at.get(r.connection_id)
                    return entry[0] if entry else None
            return None

        with self._cond:
            if not self._cond.wait_for(lambda: closed() is not None, timeout):
                raise TimeoutError(f"connection for {after_path} still open after {timeout}s")
            result = closed()
            assert result is not None
            return result

    def closed_by(self, connection_id: int) -> str | None:
        """``"client"`` (EOF/reset seen), ``"server"`` (the fake closed it), or None if open."""
        with self._cond:
            entry = self._closed_at.get(connection_id)
            return entry[1] if entry else None

    def _note_closed(self, conn: _Conn, by: str) -> None:
        with self._cond:
            self._closed_at.setdefault(conn.id, (time.monotonic(), by))
            self._cond.notify_all()

    # --- connection handling -------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(next(self._ids), reader, writer)
        self._conns[conn] = asyncio.current_task()  # type: ignore[assignment]
        with self._cond:
            self.connections_opened += 1
            self.open_connections += 1
        closed_by = "server"
        try:
            while not conn.gone.is_set():
                try:
                    req = await self._read_head(conn)
                    if req is not None:
                        await self._read_body(conn, req)
                except BadRequest as e:
                    body = fr.error_body("bad_request", str(e))
                    hdrs = [*fr.std_headers(body), ("Connection", "close")]
                    await conn.write(fr.head(400, hdrs) + body)
                    break
                if req is None:
                    closed_by = "client"
                    break
                if conn.hang_up_next:
                    break
                if not await self._respond(conn, req):
                    break
        except (ConnectionError, OSError):
            closed_by = "client"
        except asyncio.CancelledError:
            pass  # server stopping; the task ends normally after cleanup
        finally:
            self._note_closed(conn, closed_by)
            writer.close()
            del self._conns[conn]
            with self._cond:
                self.open_connections -= 1

    async def _read_head(self, conn: _Conn) -> RecordedRequest | None:
        raw_head = b""
        while not raw_head:  # tolerate stray CRLFs between requests (RFC 9112 §2.2)
            head = await conn.read_until(b"\r\n\r\n", MAX_HEAD)
            if head is None:
                return None
            raw_head = head.lstrip(b"\r\n")
        lines = raw_head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            raise BadRequest(f"bad request line {lines[0]!r}")
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise BadRequest(f"bad header line {line!r}")
            headers.append((name, value.strip(b" \t")))
        req = RecordedRequest(
            method=parts[0].decode("latin-1"),
            target=parts[1],
            version=parts[2].decode("latin-1"),
            headers=headers,
            raw_head=raw_head,
            connection_id=conn.id,
        )
        if (req.header("expect") or b"").lower() == b"100-continue":
            await conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return req

    async def _read_body(self, conn: _Conn, req: RecordedRequest) -> None:
        """Consume the body streaming, then record the request -- also when the body is
        cut short (``complete=False``), so a test can see what an abandoned upload sent."""
        sink = _BodySink()
        try:
            te = b",".join(req.header_values("transfer-encoding"))
            lengths = set(req.header_values("content-length"))
            if te:  # chunked wins over Content-Length, as RFC 9112 §6.3 says
                if te.split(b",")[-1].strip().lower() != b"chunked":
                    raise BadRequest("unsupported transfer-encoding")
                req.chunked = True
                req.trailers = await self._read_chunked(conn, sink)
            elif lengths:
                if len(lengths) != 1 or not (cl := lengths.pop()).isdigit():
                    raise BadRequest("bad content-length")
                await sink.read_exact(conn, int(cl))
            req.complete = True
        finally:
            req.raw_body, req.body = bytes(sink.raw), bytes(sink.decoded)
            req.body_length, req.body_sha256 = sink.length, sink.sha.hexdigest()
            req.received_at = time.monotonic()
            with self._cond:
                self._requests.append(req)
                self._cond.notify_all()

    async def _read_chunked(self, conn: _Conn, sink: _BodySink) -> list[tuple[bytes, bytes]]:
        async def line(limit: int) -> bytes:
            got = await conn.read_until(b"\r\n", limit)
            if got is None:
                raise ConnectionResetError("EOF in chunked body")
            sink.add_raw(got)
            return got

        while True:
            size_field = (await line(4096))[:-2].split(b";", 1)[0].strip()  # drop extensions
            try:
                size = int(size_field, 16)
            except ValueError:
                raise BadRequest(f"bad chunk size {size_field!r}") from None
            if size == 0:
                break
            while size:
                data = await conn.read_some(min(size, READ_SIZE))
                size -= len(data)
                sink.add_raw(data)
                sink.add_data(data)
            if await line(2) != b"\r\n":
                raise BadRequest("chunk data not followed by CRLF")
        trailers: list[tuple[bytes, bytes]] = []
        while (t := await line(MAX_HEAD)) != b"\r\n":
            name, _, value = t[:-2].partition(b":")
            trailers.append((name, value.strip(b" \t")))
        return trailers

    async def _respond(self, conn: _Conn, req: RecordedRequest) -> bool:
        """Run the route handler while watching the socket for the client leaving."""
        out = fr.Reply(
            conn.writer,
            conn.gone,
            head_only=req.method == "HEAD",
            sse_interval_ms=self.sse_interval_ms,
        )
        watcher = asyncio.create_task(self._watch(conn, out))
        try:
            answer = self.key_answers.get(req.provider_key() or "")
            if answer is not None:
                status, extra = answer
                body = fr.error_body("key_refused", f"this key gets {status}")
                keep = await out.send(status, body, [*fr.std_headers(body), *extra])
            else:
                keep = await fr.route(req.path)(req, out)
            conn.hang_up_next = out.hang_up_next
            if out.body_is_next_request:
                conn.buf[:0] = req.raw_body
            with self._cond:
                self.replies_written += 1
                self._cond.notify_all()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        conn_hdr = (req.header("connection") or b"").lower()
        return keep and b"close" not in conn_hdr and req.version == "HTTP/1.1"

    async def _watch(self, conn: _Conn, out: fr.Reply) -> None:
        """Detect EOF/RST the moment it happens, even while a handler is idle (/stall,
        slow streams): tests use this to prove the proxy closed its upstream socket.
        Bytes that arrive meanwhile are pipelined requests: keep them for later."""
        try:
            while len(conn.buf) < 16 * READ_SIZE:
                if not await conn.fill():
                    break
            else:
                return  # a client pushing lots of pipelined data: stop watching
        except (ConnectionError, OSError):
            pass
        if not out.aborted:  # else the EOF/RST is the echo of our own abort() (/reset)
            self._note_closed(conn, "client")
        conn.gone.set()


class FakeUpstreamThread:
    """A :class:`FakeUpstream` running on its own event loop in a daemon thread.

    ``with FakeUpstreamThread() as up: ... up.url ... up.wait_for_requests(1)``.
    Attributes not defined here (``closed_by``, ``sse_interval_ms``...) are
    forwarded to the underlying :attr:`upstream`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sse_interval_ms: int = 0,
        ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream = FakeUpstream(sse_interval_ms=sse_interval_ms, ssl=ssl)
        self._addr = (host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 5.0) -> FakeUpstreamThread:
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("fake upstream did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self.upstream.start(*self._addr))
        except BaseException as e:  # surfaced to start() in the calling thread
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self.upstream.stop(), loop)
        with contextlib.suppress(Exception):
            fut.result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def __enter__(self) -> FakeUpstreamThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.upstream, name)

    @property
    def port(self) -> int:
        return self.upstream.port

    @property
    def url(self) -> str:
        return self.upstream.url

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.upstream.requests

    @property
    def connections_opened(self) -> int:
        return self.upstream.connections_opened

    @property
    def open_connections(self) -> int:
        return self.upstream.open_connections

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        return self.upstream.wait_for_requests(n, timeout)

    def wait_for_replies(self, n: int, timeout: float = 5.0) -> None:
        self.upstream.wait_for_replies(n, timeout)

    def wait_for_disconnect(self, after_path: str, timeout: float = 5.0) -> float:
        return self.upstream.wait_for_disconnect(after_path, timeout)

    def clear(self) -> None:
        self.upstream.clear()


async def _main(host: str, port: int, sse_interval_ms: int) -> None:
    up = FakeUpstream(sse_interval_ms=sse_interval_ms)
    await up.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Printed only once signals are handled: a supervisor may SIGTERM right after.
    print(f"fake upstream listening on {up.url}", flush=True)
    await stop.wait()
    await up.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake LLM provider for the Fluxgate demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--sse-interval-ms", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_main(args.host, args.port, args.sse_interval_ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
