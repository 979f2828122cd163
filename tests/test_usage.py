"""Token usage parsers (fluxgate.usage), fed the way the proxy feeds them: the
response in chunks cut anywhere. The provider-shaped bodies come from the fake
provider's own builders (demo.fake_responses), so "expected" is what it reported.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from demo import fake_responses as fr
from fluxgate.config import build_config
from fluxgate.usage import (
    COMPRESSED,
    MAX_BUFFER,
    NOT_REPORTED,
    TOO_LARGE,
    UNSUPPORTED_TYPE,
    JsonTap,
    SseTap,
    Tap,
    Usage,
    anthropic_usage,
    openai_usage,
)
from fluxgate.usage import open_tap as tap_for_head
from tests.test_validation import assert_accepted, assert_rejected, doc_with

PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "count the tokens of this"}]}
SSE = [(b"Content-Type", b"text/event-stream; charset=utf-8")]
JSON = [(b"Content-Type", b"application/json")]


def open_tap(fmt: str, status: int, headers: list[tuple[bytes, bytes]]) -> Tap | None:
    """As the proxy opens one: from aiohttp's parsed headers and Content-Length."""
    parsed = CIMultiDict((k.decode(), v.decode()) for k, v in headers)
    length = parsed.get("content-length")
    return tap_for_head(fmt, status, parsed, int(length) if length else None)


def reported_openai_stream() -> tuple[bytes, dict[str, Any]]:
    """A streamed chat completion with include_usage, and the usage the fake put in it."""
    events = fr.openai_chat_stream({**PAYLOAD, "stream": True,
                                    "stream_options": {"include_usage": True}})  # fmt: skip
    usage = json.loads(events[-2].removeprefix(b"data: "))["usage"]
    return b"".join(events), usage


def reported_anthropic_stream() -> tuple[bytes, int, int]:
    events = fr.anthropic_stream({**PAYLOAD, "stream": True})
    start = json.loads(events[0].split(b"data: ", 1)[1])["message"]["usage"]
    delta = json.loads(events[-2].split(b"data: ", 1)[1])["usage"]
    return b"".join(events), start["input_tokens"], delta["output_tokens"]


def feed(tap: Tap | None, body: bytes, cuts: list[int]) -> Usage | None:
    assert tap is not None and tap.active
    last = 0
    for cut in [*sorted(cuts), len(body)]:
        if cut > last:
            tap.feed(body[last:cut])
            last = cut
    return tap.result()


# --- streams, cut at every byte --------------------------------------------------------


def test_openai_stream_usage_is_found_wherever_the_chunks_are_cut() -> None:
    body, usage = reported_openai_stream()
    expected = Usage(input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"])
    assert expected.input_tokens and expected.output_tokens  # the fake reported real numbers
    for cut in range(len(body) + 1):
        assert feed(open_tap("openai", 200, SSE), body, [cut]) == expected, cut


def test_anthropic_stream_usage_is_found_wherever_the_chunks_are_cut() -> None:
    body, input_tokens, output_tokens = reported_anthropic_stream()
    expected = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    for cut in range(len(body) + 1):
        assert feed(open_tap("anthropic", 200, SSE), body, [cut]) == expected, cut


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30))
def test_any_number_of_cuts_gives_the_same_usage(cuts: list[int]) -> None:
    body, usage = reported_openai_stream()
    assert feed(open_tap("openai", 200, SSE), body, cuts) == Usage(
        usage["prompt_tokens"], usage["completion_tokens"]
    )
    body, input_tokens, output_tokens = reported_anthropic_stream()
    assert feed(open_tap("anthropic", 200, SSE), body, cuts) == Usage(input_tokens, output_tokens)


def test_a_stream_without_include_usage_reports_nothing_and_parses_nothing() -> None:
    body = b"".join(fr.openai_chat_stream({**PAYLOAD, "stream": True}))
    tap = open_tap("openai", 200, SSE)
    assert feed(tap, body, [len(body) // 2]) is None
    assert tap is not None and tap.reason == NOT_REPORTED


def test_usage_null_chunks_are_not_parsed_only_the_usage_object() -> None:
    body = (b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
            b"data: [DONE]\n\n")  # fmt: skip
    assert feed(open_tap("openai", 200, SSE), body, [10, 70]) == Usage(7, 2)


def test_crlf_lines_and_a_final_line_without_newline() -> None:
    body = b'event: message_delta\r\ndata: {"type":"message_delta","usage":{"output_tokens":9}}'
    assert feed(open_tap("anthropic", 200, SSE), body, [5]) == Usage(output_tokens=9)


def test_anthropic_counts_cache_reads_and_writes_into_input() -> None:
    start = {"type": "message_start", "message": {"usage": {
        "input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5,
        "output_tokens": 1}}}  # fmt: skip
    delta = {"type": "message_delta", "usage": {"output_tokens": 42}}
    body = fr.sse_event("message_start", start) + fr.sse_event("message_delta", delta)
    assert feed(open_tap("anthropic", 200, SSE), body, []) == Usage(
        input_tokens=115, output_tokens=42, cache_read_tokens=100, cache_write_tokens=5
    )


def test_openai_cached_and_reasoning_tokens_from_chat_and_responses_shapes() -> None:
    chat = {"prompt_tokens": 50, "completion_tokens": 30,
            "prompt_tokens_details": {"cached_tokens": 20},
            "completion_tokens_details": {"reasoning_tokens": 12}}  # fmt: skip
    assert openai_usage(chat) == Usage(50, 30, cache_read_tokens=20, reasoning_tokens=12)
    responses = {"input_tokens": 50, "output_tokens": 30,
                 "input_tokens_details": {"cached_tokens": 20},
                 "output_tokens_details": {"reasoning_tokens": 12}}  # fmt: skip
    assert openai_usage(responses) == openai_usage(chat)
    completed = {"type": "response.completed", "response": {"id": "r", "usage": responses}}
    body = b"event: response.completed\ndata: " + fr.json_bytes(completed) + b"\n\n"
    assert feed(open_tap("openai", 200, SSE), body, [40]) == openai_usage(chat)


def test_counts_that_are_not_non_negative_integers_are_ignored() -> None:
    assert openai_usage({"prompt_tokens": -1, "completion_tokens": "3"}) == Usage()
    assert anthropic_usage({"input_tokens": 1.5, "output_tokens": True}) == Usage()


def test_a_data_line_that_is_not_json_is_ignored() -> None:
    body = b'data: {"usage":{"prompt_tokens":1}\n\ndata: {"usage":{"prompt_tokens":3}}\n\n'
    assert feed(open_tap("openai", 200, SSE), body, []) == Usage(input_tokens=3)


# --- bounded memory --------------------------------------------------------------------


def test_an_sse_line_longer_than_the_bound_is_dropped_without_growing() -> None:
    tap = open_tap("openai", 200, SSE)
    assert isinstance(tap, SseTap)
    tap.feed(b'data: {"usage":{"prompt_tokens":1},"pad":"')
    for _ in range(3 * MAX_BUFFER // 65536):
        tap.feed(b"x" * 65536)
        assert sum(map(len, tap._tail)) <= MAX_BUFFER
    tap.feed(b'"}\n\ndata: {"usage":{"prompt_tokens":5,"completion_tokens":6}}\n\n')
    assert tap.result() == Usage(5, 6)


def test_an_sse_line_fed_byte_by_byte_is_found_and_its_pieces_are_not_copied_meanwhile() -> None:
    # The relay feeds the tap every chunk as parsed: a hostile upstream's line in
    # one-byte chunks must not be copied whole at each byte (quadratic time).
    tap = open_tap("openai", 200, SSE)
    assert isinstance(tap, SseTap)
    line = b'data: {"usage":{"prompt_tokens":7,"completion_tokens":8}}'
    pieces = [line[i : i + 1] for i in range(len(line))]
    for piece in pieces:
        tap.feed(piece)
    assert all(kept is piece for kept, piece in zip(tap._tail, pieces, strict=True))
    tap.feed(b"\n\n")
    assert tap.result() == Usage(7, 8)


def test_a_json_body_is_parsed_once_whatever_the_chunking() -> None:
    body = fr.json_bytes(fr.openai_chat(PAYLOAD))
    usage = json.loads(body)["usage"]
    expected = Usage(usage["prompt_tokens"], usage["completion_tokens"])
    for cut in range(0, len(body) + 1, 7):
        tap = open_tap("openai", 200, [*JSON, (b"content-length", str(len(body)).encode())])
        assert isinstance(tap, JsonTap)
        assert feed(tap, body, [cut, cut + 3]) == expected
        assert tap.result() == expected  # memoised: the log line and the metrics both ask
    body = fr.json_bytes(fr.anthropic_message(PAYLOAD))
    usage = json.loads(body)["usage"]
    tap = open_tap("anthropic", 200, [(b"content-type", b"application/json")])
    assert feed(tap, body, [1]) == Usage(usage["input_tokens"], usage["output_tokens"])


def test_a_json_body_that_grows_past_the_bound_is_dropped() -> None:
    tap = open_tap("openai", 200, JSON)  # no Content-Length: chunked
    assert isinstance(tap, JsonTap)
    for _ in range(MAX_BUFFER // 65536 + 2):
        tap.feed(b" " * 65536)
    assert tap._parts is None  # nothing held any more
    tap.feed(b'{"usage":{"prompt_tokens":1}}')
    assert tap.result() is None
    assert tap.reason == TOO_LARGE


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([*JSON, (b"Content-Encoding", b"br")], COMPRESSED),
        ([*JSON, (b"Content-Encoding", b"zstd")], COMPRESSED),
        ([*SSE, (b"content-encoding", b"br")], COMPRESSED),
        ([*SSE, (b"content-encoding", b"gzip")], COMPRESSED),
        ([*JSON, (b"content-length", str(MAX_BUFFER + 1).encode())], TOO_LARGE),
        ([(b"content-type", b"text/plain")], UNSUPPORTED_TYPE),
        ([(b"content-type", b"application/octet-stream")], UNSUPPORTED_TYPE),
        ([], UNSUPPORTED_TYPE),
    ],
)
def test_compressed_other_types_and_announced_oversize_bodies_are_skipped(
    headers: list[tuple[bytes, bytes]], reason: str
) -> None:
    tap = open_tap("openai", 200, headers)
    assert tap is not None and not tap.active and tap.reason == reason
    tap.feed(gzip.compress(b'{"usage":{"prompt_tokens":1}}'))  # a no-op, never buffered
    assert tap.result() is None


@pytest.mark.parametrize(
    "content_type", [b"application/json; charset=utf-8", b"Application/JSON", b"application/x+json"]
)
def test_json_content_types(content_type: bytes) -> None:
    assert isinstance(open_tap("openai", 200, [(b"content-type", content_type)]), JsonTap)


def _fed_whole(tap: Tap | None, body: bytes) -> Tap:
    assert isinstance(tap, JsonTap)
    for i in range(0, len(body), 7):  # cut anywhere, as chunks arrive
        tap.feed(body[i : i + 7])
    return tap


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [(b"gzip", gzip.compress), (b"x-gzip", gzip.compress), (b"deflate", zlib.compress)],
)
def test_gzip_and_deflate_json_bodies_are_inflated_and_read(encoding: bytes, compress: Any) -> None:
    body = fr.json_bytes(fr.openai_chat(PAYLOAD))
    expected = json.loads(body)["usage"]
    tap = _fed_whole(open_tap("openai", 200, [*JSON, (b"Content-Encoding", encoding)]),
                     compress(body))  # fmt: skip
    usage = tap.result()
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens) == (
        expected["prompt_tokens"], expected["completion_tokens"])  # fmt: skip


def test_a_gzip_body_that_inflates_past_the_bound_is_too_large() -> None:
    bomb = gzip.compress(b" " * (MAX_BUFFER + 1) + b'{"usage":{"prompt_tokens":1}}')
    assert len(bomb) < 5000  # what arrives is small; what it inflates to is not kept
    tap = _fed_whole(open_tap("openai", 200, [*JSON, (b"Content-Encoding", b"gzip")]), bomb)
    assert tap.result() is None
    assert tap.reason == TOO_LARGE


def test_a_corrupt_gzip_body_reports_no_usage() -> None:
    body = gzip.compress(b'{"usage":{"prompt_tokens":1}}')
    tap = _fed_whole(open_tap("openai", 200, [*JSON, (b"Content-Encoding", b"gzip")]),
                     body[:10] + b"garbage" + body[17:])  # fmt: skip
    assert tap.result() is None
    assert tap.reason == NOT_REPORTED


def test_identity_encoding_is_not_compressed() -> None:
    assert open_tap("openai", 200, [*JSON, (b"content-encoding", b"identity")]) is not None


@pytest.mark.parametrize("status", [101, 199, 304, 400, 429, 500, 503])
def test_non_2xx_responses_get_no_tap(status: int) -> None:
    assert open_tap("openai", status, JSON) is None


# --- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["openai", "anthropic", "off", False])
def test_usage_accepts_the_two_formats_and_off(value: object) -> None:
    doc = doc_with("upstreams.openai.usage", value)
    assert_accepted(doc)
    upstream = build_config(doc).upstreams[0]
    assert upstream.usage == (None if value in ("off", False) else value)


def test_usage_is_off_by_default() -> None:
    assert all(u.usage is None for u in build_config(doc_with("version", 1)).upstreams)


@pytest.mark.parametrize("value", ["OpenAI", "on", True, None, 1, ["openai"], {"x": 1}, ""])
def test_usage_rejects_anything_else(value: object) -> None:
    errors = assert_rejected(doc_with("upstreams.openai.usage", value), "upstreams.openai.usage")
    assert any("openai, anthropic, off" in e for e in errors)


def test_an_unquoted_off_in_yaml_is_off() -> None:
    from fluxgate.configfile import parse_config_bytes

    text = b"""version: 1
upstreams:
  local:
    request_path: /local
    target_url: http://127.0.0.1:1
    usage: off
  openai:
    request_path: /openai
    target_url: http://127.0.0.1:2
    usage: openai
"""
    config = parse_config_bytes(text).config
    assert [u.usage for u in config.upstreams] == [None, "openai"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"usage":{"prompt_tokens":3},"extra":{"usage":null}}',
        b'{"choices":[{"text":"\\"usage\\":{\\"prompt_tokens\\":9}"}],"usage":{"prompt_tokens":3}}',
        b'{"usage":{"prompt_tokens":3},"note":"\\"usage\\": {\\"prompt_tokens\\": 99}"}',
        b'{"usage" : {"prompt_tokens" : 3}}',
    ],
)
def test_the_json_body_usage_object_is_the_real_key_not_text_in_a_string(body: bytes) -> None:
    assert json.loads(body)  # each is valid JSON
    assert feed(open_tap("openai", 200, JSON), body, [4]) == Usage(input_tokens=3)


def test_a_json_body_cut_inside_its_usage_object_reports_nothing() -> None:
    body = fr.json_bytes(fr.openai_chat(PAYLOAD))
    tap = open_tap("openai", 200, JSON)
    assert feed(tap, body[:-5], []) is None
    assert tap is not None and tap.reason == NOT_REPORTED
