"""Token usage, read passively from the provider's own usage block.

The proxy hands every response chunk to a tap *after* deciding to send it on;
a tap never holds back, changes or reorders a byte of the response, and it
keeps only bounded state:

- `SseTap` (``text/event-stream``): splits lines, keeping at most one partial
  line of `MAX_BUFFER` bytes, and parses only ``data:`` lines whose JSON has a
  ``"usage": {`` object (OpenAI's final chunk when the client asked for
  ``stream_options.include_usage``, the Responses API's ``response.completed``,
  Anthropic's ``message_start`` and ``message_delta``). Chunks that mention no
  ``"usage"`` cost one substring search. Later values of a field replace
  earlier ones: Anthropic's ``message_delta`` counts are cumulative.
- `JsonTap` (``application/json`` or ``+json``): keeps references to the body
  chunks up to `MAX_BUFFER` bytes and, once, when the finished request is
  counted or logged (never while the response is still moving), parses only
  the last ``"usage": {…}`` object of the body (both providers put it last;
  a key in a JSON string would be escaped, so a match is a real key): a cost
  that hardly grows with the body, where a full parse grows with every byte
  (BENCHMARKS.md, "Measurements behind the design").
- A gzip- or deflate-encoded JSON body (what OpenAI sends the official SDKs,
  which ask for gzip) is kept the same way, compressed, and inflated at
  parse time into at most `MAX_BUFFER` bytes (a bomb stops there). Any other
  compressed body (brotli, zstd, a compressed stream), another content type,
  or a JSON body over the bound is skipped at once: a `Tap` with only a
  `reason`, and nothing is buffered.

Counts are normalised to the same meaning for both providers:
``input_tokens`` is every prompt token the provider counted, cached or not
(OpenAI's ``prompt_tokens`` already includes its ``cached_tokens``;
Anthropic reports ``input_tokens`` without cache reads and writes, so those
are added), with ``cache_read_tokens``, ``cache_write_tokens`` and
``reasoning_tokens`` as reported where the provider reports them.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, Final, NamedTuple

OPENAI: Final = "openai"
ANTHROPIC: Final = "anthropic"
FORMATS: Final = (OPENAI, ANTHROPIC)

# Bytes a tap may hold: one partial SSE line, or a whole JSON body.
MAX_BUFFER: Final = 1 << 20

# Why a 2xx response yielded no usage (a label of fluxgate_usage_unavailable_total).
COMPRESSED: Final = "compressed"
UNSUPPORTED_TYPE: Final = "unsupported_type"
TOO_LARGE: Final = "too_large"
NOT_REPORTED: Final = "not_reported"  # parsed, but no usage block (or not valid JSON)

_USAGE: Final = b'"usage"'
# A usage *object*: OpenAI streams carry `"usage":null` in every chunk but the last.
_USAGE_OBJECT: Final = re.compile(rb'"usage"\s*:\s*\{')
_DECODER: Final = json.JSONDecoder()
# Content-Encodings a JSON tap inflates. zlib detects a gzip or a zlib header
# itself with these wbits ("deflate" is zlib-wrapped in HTTP).
_INFLATABLE: Final = frozenset({"gzip", "x-gzip", "deflate"})
_GZIP_OR_ZLIB: Final = 47


class Usage(NamedTuple):
    """Token counts of one exchange; None where the provider reported nothing.

    A NamedTuple, not a frozen dataclass: it is made on the request path, where
    a frozen dataclass costs about four times as much to build.
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None

    def fields(self) -> dict[str, int | None]:
        return self._asdict()


def _count(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _inner(raw: dict[str, Any], name: str, fallback: str, key: str) -> int | None:
    details = raw.get(name) or raw.get(fallback)
    return _count(details.get(key)) if type(details) is dict else None


def openai_usage(raw: dict[str, Any]) -> Usage:
    """Chat Completions, Completions, Embeddings (`prompt_tokens`…); Responses (`input_tokens`…)."""
    prompt = _count(raw.get("prompt_tokens"))
    completion = _count(raw.get("completion_tokens"))
    return Usage(
        prompt if prompt is not None else _count(raw.get("input_tokens")),
        completion if completion is not None else _count(raw.get("output_tokens")),
        _inner(raw, "prompt_tokens_details", "input_tokens_details", "cached_tokens"),
        None,
        _inner(raw, "completion_tokens_details", "output_tokens_details", "reasoning_tokens"),
    )


def anthropic_usage(raw: dict[str, Any]) -> Usage:
    """Messages API usage; `input_tokens` there excludes cache reads and writes."""
    base = _count(raw.get("input_tokens"))
    cache_read = _count(raw.get("cache_read_input_tokens"))
    cache_write = _count(raw.get("cache_creation_input_tokens"))
    parts = [n for n in (base, cache_read, cache_write) if n is not None]
    return Usage(
        sum(parts) if parts else None,
        _count(raw.get("output_tokens")),
        cache_read,
        cache_write,
    )


_NORMALISE = {OPENAI: openai_usage, ANTHROPIC: anthropic_usage}


def find_usage(obj: object) -> dict[str, Any] | None:
    """The usage object of a response body or SSE event, wherever the API puts it:
    top level (chat completion, chunk, message, message_delta), under `message`
    (Anthropic's message_start) or `response` (OpenAI Responses events)."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if isinstance(usage, dict):
        return usage
    for name in ("message", "response"):
        inner = obj.get(name)
        if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
            found: dict[str, Any] = inner["usage"]
            return found
    return None


class Tap:
    """A response whose usage is not read; `reason` says why. Nothing is fed to it."""

    __slots__ = ("fmt", "reason")
    active = False

    def __init__(self, fmt: str, reason: str | None) -> None:
        self.fmt = fmt
        self.reason = reason

    def feed(self, chunk: bytes) -> None:
        """Look at one response chunk (already on its way to the client)."""

    def result(self) -> Usage | None:
        return None


class SseTap(Tap):
    __slots__ = ("_raw", "_skipping", "_tail", "_tail_size")
    active = True

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt, NOT_REPORTED)
        self._raw: dict[str, Any] = {}
        # The current line's pieces so far (no newline yet), kept by reference and
        # joined once its newline comes: a line fed in many small chunks is copied
        # once, not once per chunk.
        self._tail: list[bytes] = []
        self._tail_size = 0
        self._skipping = False  # inside a line longer than MAX_BUFFER: dropped

    def feed(self, chunk: bytes) -> None:
        end = chunk.rfind(b"\n")
        if end < 0:
            if not self._skipping:
                self._tail_size += len(chunk)
                if self._tail_size > MAX_BUFFER:
                    self._skipping, self._tail, self._tail_size = True, [], 0
                else:
                    self._tail.append(chunk)
            return
        data = chunk
        if self._tail:
            data = b"".join((*self._tail, chunk))
            end += self._tail_size
            self._tail, self._tail_size = [], 0
        start = 0
        if self._skipping:  # the first newline ends the line being dropped
            start = data.find(b"\n") + 1
            self._skipping = False
        tail = data[end + 1 :]
        if len(tail) > MAX_BUFFER:
            self._skipping, tail = True, b""
        if tail:
            self._tail, self._tail_size = [tail], len(tail)
        if start <= end and data.find(_USAGE, start, end) >= 0:
            self._lines(data[start:end].split(b"\n"))

    def _lines(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            if not line.startswith(b"data:") or not _USAGE_OBJECT.search(line):
                continue
            try:
                usage = find_usage(json.loads(line[5:]))
            except (ValueError, RecursionError):
                continue
            if usage:
                self._raw.update({k: v for k, v in usage.items() if v is not None})

    def result(self) -> Usage | None:
        if self._tail:  # a last line the stream did not end with a newline
            tail = b"".join(self._tail)
            self._tail, self._tail_size = [], 0
            if _USAGE in tail:
                self._lines([tail])
        if not self._raw:
            return None
        self.reason = None
        return _NORMALISE[self.fmt](self._raw)


class JsonTap(Tap):
    __slots__ = ("_compressed", "_parts", "_size", "_usage")
    active = True

    def __init__(self, fmt: str, compressed: bool = False) -> None:
        super().__init__(fmt, NOT_REPORTED)
        self._parts: list[bytes] | None = []
        self._size = 0
        self._usage: Usage | None = None
        self._compressed = compressed  # gzip or deflate: inflate before parsing

    def feed(self, chunk: bytes) -> None:
        parts = self._parts
        if parts is None:
            return
        self._size += len(chunk)
        if self._size > MAX_BUFFER:  # no Content-Length said so up front
            self._parts, self.reason = None, TOO_LARGE
        else:
            parts.append(chunk)  # a reference: the chunk is not copied

    def result(self) -> Usage | None:
        """Parse once (memoised; the log line and the metrics both ask)."""
        parts, self._parts = self._parts, None
        if parts:
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            if self._compressed:
                body = self._inflate(body)
            usage = last_usage_object(body)
            if usage:
                self._usage, self.reason = _NORMALISE[self.fmt](usage), None
        return self._usage

    def _inflate(self, body: bytes) -> bytes:
        """At most MAX_BUFFER bytes of the decoded body; b"" if it is larger or corrupt."""
        inflater = zlib.decompressobj(_GZIP_OR_ZLIB)
        try:
            plain = inflater.decompress(body, MAX_BUFFER)
        except zlib.error:
            return b""
        if inflater.unconsumed_tail:
            self.reason = TOO_LARGE
            return b""
        return plain


def last_usage_object(body: bytes) -> dict[str, Any] | None:
    """The last `"usage": {...}` object in a JSON body, parsed on its own."""
    end = len(body)
    while (start := body.rfind(_USAGE, 0, end)) >= 0:
        found = _USAGE_OBJECT.match(body, start)
        if found is not None:
            text = body[found.end() - 1 :].decode("utf-8", "replace")
            try:
                usage, _ = _DECODER.raw_decode(text)
            except (ValueError, RecursionError):
                return None
            return usage if isinstance(usage, dict) else None
        end = start  # `"usage": null` or a string: look further back
    return None


def open_tap(fmt: str, status: int, headers: Mapping[str, str], length: int | None) -> Tap | None:
    """The tap for one response of an upstream with `usage: fmt`, from its head.

    `headers` is a case-insensitive mapping (aiohttp's parsed response
    headers: two C lookups instead of a Python loop over the raw ones) and
    `length` the Content-Length, if any.

    None for a non-2xx answer (an error carries no usage and is not counted as
    missing one); otherwise a tap, inactive (with a reason) when the body is
    compressed other than gzip or deflate JSON, of another type, or announced
    larger than `MAX_BUFFER`.
    """
    if not 200 <= status < 300:
        return None
    encoding = headers.get("content-encoding", "").strip().lower()
    compressed = encoding not in ("", "identity")
    if compressed and encoding not in _INFLATABLE:
        return Tap(fmt, COMPRESSED)
    content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type == "text/event-stream":
        return Tap(fmt, COMPRESSED) if compressed else SseTap(fmt)
    if content_type == "application/json" or content_type.endswith("+json"):
        if length is not None and length > MAX_BUFFER:
            return Tap(fmt, TOO_LARGE)
        return JsonTap(fmt, compressed)
    return Tap(fmt, UNSUPPORTED_TYPE)
