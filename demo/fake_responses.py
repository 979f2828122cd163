"""What the fake LLM provider in :mod:`demo.fake_upstream` answers.

The server module owns the HTTP side (parsing, recording, connections); this
one owns the answers: pure payload builders producing the JSON documents and
SSE events that the official ``openai`` and ``anthropic`` SDKs parse, and the
route handlers that write them (plus the misbehaving routes: resets, stalls,
garbage) through a small :class:`Reply` writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import itertools
import json
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: the server module imports this one
    from demo.fake_upstream import RecordedRequest

JSONDict = dict[str, Any]

#: Model names reported when the request does not name one.
DEFAULT_OPENAI_MODEL = "fake-gpt"
DEFAULT_ANTHROPIC_MODEL = "fake-claude"

#: /download serves this 64 KiB block repeated (then truncated), so any length
#: can be produced without holding it in memory and verified by a test.
DOWNLOAD_BLOCK = bytes(range(256)) * 256

#: /gzip answers with GZIP_BODY (gzip of GZIP_PLAIN, mtime fixed to 0 so the
#: bytes are identical on every run and a test can compare them exactly).
GZIP_PLAIN = json.dumps({"compressed": True, "message": "hello from gzip " * 8}).encode()
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)


def download_bytes(n: int, offset: int = 0) -> bytes:
    """Return bytes ``offset .. offset+n`` of the /download pattern (small n only)."""
    block_len = len(DOWNLOAD_BLOCK)
    start = offset % block_len
    reps = (start + n) // block_len + 1
    return (DOWNLOAD_BLOCK * reps)[start : start + n]


def download_sha256(n: int) -> str:
    """SHA-256 hex of the first ``n`` bytes of the /download pattern (streamed)."""
    h = hashlib.sha256()
    full, rest = divmod(n, len(DOWNLOAD_BLOCK))
    for _ in range(full):
        h.update(DOWNLOAD_BLOCK)
    h.update(DOWNLOAD_BLOCK[:rest])
    return h.hexdigest()


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def sse_data(obj: Any) -> bytes:
    """One OpenAI-style SSE event (``data:`` line only)."""
    return b"data: " + json_bytes(obj) + b"\n\n"


def sse_event(name: str, obj: Any) -> bytes:
    """One Anthropic-style SSE event (``event:`` + ``data:``)."""
    return b"event: " + name.encode() + b"\ndata: " + json_bytes(obj) + b"\n\n"


def error_body(kind: str, message: str) -> bytes:
    return json_bytes({"error": {"type": kind, "message": message}})


def _text_of(content: Any) -> str:
    """Flatten a message ``content`` (string or list of typed parts) to text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return " ".join(str(p) for p in parts if p)
    return ""


def last_user_text(payload: JSONDict) -> str:
    messages = payload.get("messages")
    if isinstance(messages, list):
        for msg in reversed(messages):
            if isinstance(msg, dict) and msg.get("role") == "user":
                return _text_of(msg.get("content"))
    return ""


def reply_words(payload: JSONDict) -> list[str]:
    """The reply text split into the pieces that are streamed one per event.

    Every piece but the last keeps its trailing space so that joining the
    streamed deltas reproduces the non-streamed text exactly.
    """
    words = ("Echo: " + (last_user_text(payload) or "(empty)")).split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def _prompt_tokens(payload: JSONDict) -> int:
    return max(1, len(last_user_text(payload).split()))


# --- OpenAI ------------------------------------------------------------------


def openai_models() -> JSONDict:
    created = 1_700_000_000
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "fluxgate-fake"}
            for m in (DEFAULT_OPENAI_MODEL, "fake-gpt-mini")
        ],
    }


def _openai_usage(payload: JSONDict, completion: int) -> JSONDict:
    prompt = _prompt_tokens(payload)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def openai_chat(payload: JSONDict) -> JSONDict:
    words = reply_words(payload)
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(payload.get("model") or DEFAULT_OPENAI_MODEL),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(words)},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _openai_usage(payload, len(words)),
    }


def openai_chat_stream(payload: JSONDict) -> list[bytes]:
    """All SSE events of a streamed chat completion, ``[DONE]`` included."""
    cid = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    model = str(payload.get("model") or DEFAULT_OPENAI_MODEL)
    words = reply_words(payload)

    def chunk(delta: JSONDict, finish: str | None) -> JSONDict:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    events = [sse_data(chunk({"role": "assistant", "content": ""}, None))]
    events += [sse_data(chunk({"content": w}, None)) for w in words]
    events.append(sse_data(chunk({}, "stop")))
    opts = payload.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        usage_chunk = chunk({}, None)
        usage_chunk["choices"] = []
        usage_chunk["usage"] = _openai_usage(payload, len(words))
        events.append(sse_data(usage_chunk))
    events.append(b"data: [DONE]\n\n")
    return events


# --- Anthropic ---------------------------------------------------------------


def anthropic_message(payload: JSONDict) -> JSONDict:
    words = reply_words(payload)
    return {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": str(payload.get("model") or DEFAULT_ANTHROPIC_MODEL),
        "content": [{"type": "text", "text": "".join(words)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": _prompt_tokens(payload), "output_tokens": len(words)},
    }


def anthropic_stream(payload: JSONDict) -> list[bytes]:
    """The full Messages streaming event sequence, one element per SSE event."""
    words = reply_words(payload)
    start = anthropic_message(payload)
    start["content"] = []
    start["stop_reason"] = None
    start["usage"] = {"input_tokens": _prompt_tokens(payload), "output_tokens": 1}
    events = [
        sse_event("message_start", {"type": "message_start", "message": start}),
        sse_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        sse_event("ping", {"type": "ping"}),
    ]
    events += [
        sse_event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
        )
        for w in words
    ]
    events += [
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(words)},
            },
        ),
        sse_event("message_stop", {"type": "message_stop"}),
    ]
    return events


# --- writing responses --------------------------------------------------------

Headers = list[tuple[str, str]]
SSE_HEADERS: Headers = [
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("Transfer-Encoding", "chunked"),
]
#: /cookies: duplicate Set-Cookie (one with a comma inside) and a duplicated
#: mixed-case header, to check that a proxy neither merges nor re-cases them.
COOKIE_HEADERS: Headers = [
    ("Set-Cookie", "session=abc123; Path=/; HttpOnly"),
    ("Set-Cookie", "theme=dark; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
    ("Set-Cookie", "id=42; Secure; SameSite=Lax"),
    ("X-Custom-Header", "a"),
    ("X-Custom-Header", "a"),
]
WRITE_SIZE = 1 << 16


def head(status: int, headers: Headers) -> bytes:
    """Status line + headers.  No Date/Server on purpose: tests check that the
    proxy adds none of its own, which only works if the upstream sends none."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)
    return f"HTTP/1.1 {status} {reason}\r\n".encode() + lines + b"\r\n"


def std_headers(body: bytes, ctype: str = "application/json") -> Headers:
    return [("Content-Type", ctype), ("Content-Length", str(len(body)))]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Reply:
    """The write side of one exchange, handed to a route handler.

    ``gone`` is set by the server the moment the client closes or resets the
    connection (or the server stops), so long-running handlers end promptly.
    Handlers return True when the connection may be reused (keep-alive).
    """

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        gone: asyncio.Event,
        *,
        head_only: bool = False,
        sse_interval_ms: float = 0,
    ) -> None:
        self.writer = writer
        self.gone = gone
        self.head_only = head_only  # HEAD request: headers only, whatever the route
        self.sse_interval_ms = sse_interval_ms
        self.aborted = False  # we reset the connection ourselves (/reset routes)
        # Close the connection, unanswered, when the next request on it arrives:
        # a keep-alive connection that went stale in the client's pool.
        self.hang_up_next = False
        # Parse this request's body as the next request on the connection, as a
        # server that ignores a GET's body would (the body is then a request).
        self.body_is_next_request = False

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()  # one write + drain per call: SSE events stay separate

    async def send(self, status: int, body: bytes = b"", headers: Headers | None = None) -> bool:
        no_body = self.head_only or status in (204, 304)
        hdrs = std_headers(body) if headers is None else headers
        await self.write(head(status, hdrs) + (b"" if no_body else body))
        return True

    async def send_json(self, obj: Any, status: int = 200) -> bool:
        return await self.send(status, json_bytes(obj))

    async def stream(self, events: Iterable[bytes], interval_ms: float) -> bool:
        """Chunked SSE, one chunk per event, ``interval_ms`` between events."""
        await self.write(head(200, SSE_HEADERS))
        if self.head_only:
            return True
        for i, ev in enumerate(events):
            if i and not await self.pause(interval_ms):
                return False
            await self.write(chunk(ev))
        await self.write(b"0\r\n\r\n")
        return True

    async def pause(self, ms: float) -> bool:
        """Sleep unless the client leaves first; True if it is still there."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.gone.wait(), max(ms, 0) / 1000)
        return not self.gone.is_set()

    def interval(self, req: RecordedRequest, default: float | None = None) -> float:
        q = req.query.get("interval_ms")
        if q is not None:
            return float(q)
        return self.sse_interval_ms if default is None else default

    def abort(self) -> None:
        """Close with RST (SO_LINGER 0), not FIN, so the peer sees ECONNRESET."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.aborted = True
        self.writer.transport.abort()


# --- routes -------------------------------------------------------------------

Handler = Callable[["RecordedRequest", Reply], Awaitable[bool]]


async def _payload(req: RecordedRequest, out: Reply) -> JSONDict | None:
    try:
        payload = json.loads(req.body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        await out.send(400, error_body("invalid_request_error", "body is not a JSON object"))
        return None
    return payload


def _accepts_gzip(req: RecordedRequest) -> bool:
    accepted = (req.header("accept-encoding") or b"").lower()
    return any(item.split(b";")[0].strip() == b"gzip" for item in accepted.split(b","))


async def _chat(req: RecordedRequest, out: Reply) -> bool:
    if (payload := await _payload(req, out)) is None:
        return True
    if payload.get("stream") is True:
        return await out.stream(openai_chat_stream(payload), out.interval(req))
    body = json_bytes(openai_chat(payload))
    if _accepts_gzip(req):  # as OpenAI does: its SDKs ask for gzip
        gz = gzip.compress(body, mtime=0)
        return await out.send(200, gz, [*std_headers(gz), ("Content-Encoding", "gzip")])
    return await out.send(200, body)


async def _messages(req: RecordedRequest, out: Reply) -> bool:
    if (payload := await _payload(req, out)) is None:
        return True
    if payload.get("stream") is True:
        return await out.stream(anthropic_stream(payload), out.interval(req))
    return await out.send_json(anthropic_message(payload))


async def _models(req: RecordedRequest, out: Reply) -> bool:
    return await out.send_json(openai_models())


async def _echo(req: RecordedRequest, out: Reply) -> bool:
    info: JSONDict = {
        "method": req.method,
        "target": req.target.decode("latin-1"),
        "path": req.path,
        "version": req.version,
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in req.headers],
        "chunked": req.chunked,
        "body_length": req.body_length,
        "body_sha256": req.body_sha256,
        "connection_id": req.connection_id,
    }
    if req.body_length <= WRITE_SIZE:
        info["body"] = req.body.decode("latin-1")
    return await out.send_json(info)


async def _status(req: RecordedRequest, out: Reply) -> bool:
    code_s = req.path.removeprefix("/status/")
    if not code_s.isdigit() or not 200 <= int(code_s) <= 599:
        return await out.send(400, error_body("bad_request", "status must be 200..599"))
    code = int(code_s)
    if code in (204, 304):  # these carry neither a body nor a Content-Length
        return await out.send(code, headers=[])
    return await out.send_json({"status": code}, code)


def _numbered_events(n: int | None) -> Iterator[bytes]:
    for i in range(1, n + 1) if n is not None else itertools.count(1):
        yield b"data: event %d\n\n" % i


async def _sse(req: RecordedRequest, out: Reply) -> bool:
    n = int(req.query.get("events", "5"))
    return await out.stream(_numbered_events(n), out.interval(req))


async def _stream_forever(req: RecordedRequest, out: Reply) -> bool:
    # Ends only when the client leaves (stream() returns False) or the server stops.
    await out.stream(_numbered_events(None), out.interval(req, out.sse_interval_ms or 100))
    return False


async def _gzip(req: RecordedRequest, out: Reply) -> bool:
    # ?encoding= relabels the same bytes (br, zstd...) for tests of what a proxy skips.
    headers = [*std_headers(GZIP_BODY), ("Content-Encoding", req.query.get("encoding", "gzip"))]
    return await out.send(200, GZIP_BODY, headers)


async def _cookies(req: RecordedRequest, out: Reply) -> bool:
    body = json_bytes({"cookies": 3})
    return await out.send(200, body, [*std_headers(body), *COOKIE_HEADERS])


async def _redirect(req: RecordedRequest, out: Reply) -> bool:
    return await out.send(302, b"", [("Location", "/echo"), ("Content-Length", "0")])


async def _download(req: RecordedRequest, out: Reply) -> bool:
    remaining = int(req.query.get("bytes", "1024"))
    chunked = req.query.get("chunked") == "1"
    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(remaining))
    await out.write(head(200, [("Content-Type", "application/octet-stream"), framing]))
    if out.head_only:
        return True
    while remaining:  # 64 KiB-aligned writes, so each one is a prefix of DOWNLOAD_BLOCK
        if out.gone.is_set():
            return False
        block = DOWNLOAD_BLOCK[: min(remaining, WRITE_SIZE)]
        remaining -= len(block)
        await out.write(chunk(block) if chunked else block)
    if chunked:
        await out.write(b"0\r\n\r\n")
    return True


async def _upload(req: RecordedRequest, out: Reply) -> bool:
    # The server has already consumed (and hashed) the body, streaming.
    return await out.send_json({"body_length": req.body_length, "body_sha256": req.body_sha256})


async def _stall(req: RecordedRequest, out: Reply) -> bool:
    await out.gone.wait()
    return False


async def _slow_headers(req: RecordedRequest, out: Reply) -> bool:
    delay = float(req.query.get("delay_ms", "1000"))
    if not await out.pause(delay):
        return False
    return await out.send_json({"delayed_ms": delay})


async def _reset(req: RecordedRequest, out: Reply) -> bool:
    out.abort()
    return False


async def _reset_mid_body(req: RecordedRequest, out: Reply) -> bool:
    hdrs = [("Content-Type", "application/octet-stream"), ("Content-Length", "1000")]
    await out.write(head(200, hdrs) + download_bytes(100))
    await asyncio.sleep(0.05)  # let the 100 bytes reach the peer before the RST
    out.abort()
    return False


async def _garbage(req: RecordedRequest, out: Reply) -> bool:
    await out.write(b"this is not http\r\n\r\n")
    return False  # the server then closes the connection (FIN)


async def _close_early(req: RecordedRequest, out: Reply) -> bool:
    hdrs = [("Content-Type", "application/octet-stream"), ("Content-Length", "100")]
    await out.write(head(200, hdrs) + download_bytes(10))
    return False  # FIN after 10 of the promised 100 bytes


async def _bad_chunk_mid_body(req: RecordedRequest, out: Reply) -> bool:
    hdrs = [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")]
    await out.write(head(200, hdrs) + b"e\r\ndata: event 1\n\r\n")
    await asyncio.sleep(0.05)  # the good chunk first, on its own
    await out.write(b"zz\r\nnot a chunk\r\n")
    await asyncio.sleep(BAD_CHUNK_HOLD_S)  # and the connection held open after it
    return False


async def _hang_up_next(req: RecordedRequest, out: Reply) -> bool:
    out.hang_up_next = True
    return await out.send_json({"next_request": "hung up"})


#: How long /bad-chunk-mid-body holds its connection open after the malformed chunk.
BAD_CHUNK_HOLD_S = 10.0

#: What /stray writes, unasked, on the connection some time after its answer.
STRAY_BODY = b'{"stray": "a response nobody asked for"}'
STRAY_DELAY_S = 0.1


async def _stray(req: RecordedRequest, out: Reply) -> bool:
    """Answer, then, while the connection sits idle, send a second complete response
    (with ``?partial``: only the first bytes of one)."""
    await out.send_json({"answer": "the one asked for"})
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(out.gone.wait(), STRAY_DELAY_S)
    if out.gone.is_set():
        return False
    stray = head(200, std_headers(STRAY_BODY)) + STRAY_BODY
    await out.write(stray[:20] if "partial" in req.query else stray)
    return True


async def _ignores_body(req: RecordedRequest, out: Reply) -> bool:
    """Answer as if the request had no body; its body is then read as the next request."""
    out.body_is_next_request = True
    await out.send_json({"answer": "body ignored"})
    # The next request (the body) takes a moment to answer, as a real one
    # would: its response arrives once the proxy has pooled the connection.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(out.gone.wait(), STRAY_DELAY_S)
    return not out.gone.is_set()


async def _switching_protocols(req: RecordedRequest, out: Reply) -> bool:
    """An unsolicited 101: the request asked for no upgrade."""
    hdrs = [("Connection", "Upgrade"), ("Upgrade", "websocket")]
    await out.write(head(101, hdrs) + b"raw bytes of another protocol")
    return False


async def _not_found(req: RecordedRequest, out: Reply) -> bool:
    return await out.send(404, error_body("not_found", f"no route for {req.path}"))


EXACT_ROUTES: dict[str, Handler] = {
    "/sse": _sse,
    "/stream-forever": _stream_forever,
    "/gzip": _gzip,
    "/cookies": _cookies,
    "/redirect": _redirect,
    "/download": _download,
    "/upload": _upload,
    "/stall": _stall,
    "/slow-headers": _slow_headers,
    "/reset": _reset,
    "/reset-mid-body": _reset_mid_body,
    "/garbage": _garbage,
    "/close-early": _close_early,
    "/bad-chunk-mid-body": _bad_chunk_mid_body,
    "/hang-up-next": _hang_up_next,
    "/stray": _stray,
    "/ignores-body": _ignores_body,
    "/switching-protocols": _switching_protocols,
}


def route(path: str) -> Handler:
    """Pick the handler for a request path (query excluded)."""
    if path == "/echo" or path.startswith("/echo/"):
        return _echo
    if path.startswith("/status/"):
        return _status
    if path in EXACT_ROUTES:
        return EXACT_ROUTES[path]
    # Suffix match, so a target_url with a base path (/base/v1/models) still works.
    if path.endswith("/chat/completions"):
        return _chat
    if path.endswith("/models"):
        return _models
    if path.endswith("/messages"):
        return _messages
    return _not_found
