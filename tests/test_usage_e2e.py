"""Token usage through the real proxy: the official SDKs against the fake provider,
streamed and not, for both providers; the numbers in the request log line and
in the metrics must be the ones the provider reported. With usage on, a
stream's bytes and event timing are those of usage off.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from demo import fake_responses as fr
from demo.fake_upstream import FakeUpstreamThread, RecordedRequest
from tests import rawhttp
from tests.conftest import CLIENT_KEY, proxy_config
from tests.promtext import scrape, value, wait_for
from tests.supervisor_process import Supervisor

MESSAGES = [{"role": "user", "content": "how many tokens is this prompt"}]


@pytest.fixture(scope="module")
def sup(up: FakeUpstreamThread, module_supervisor: Callable[..., Supervisor]) -> Supervisor:
    doc = proxy_config(up.url)
    doc["upstreams"]["openai"]["usage"] = "openai"
    doc["upstreams"]["anthropic"]["usage"] = "anthropic"
    # The same provider with usage off, for comparison.
    doc["upstreams"]["plain"] = {"request_path": "/plain", "target_url": up.url}
    return module_supervisor(doc, workers=2)


def fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split()[3:] if "=" in item)


def log_line(sup: Supervisor, mark: int, path: str) -> dict[str, str]:
    return fields(sup.wait_for_log(rf'request .*request_url="?{re.escape(path)}[ "?]', start=mark))


def tokens(sup: Supervisor, upstream: str, kind: str) -> float:
    return value(scrape(sup.url), "fluxgate_tokens_total", upstream=upstream, key_id="ci",
                 type=kind)  # fmt: skip


def assert_counted(sup: Supervisor, upstream: str, before: dict[str, float], **added: int) -> None:
    for kind, amount in added.items():
        expected = before[kind] + amount
        samples = wait_for(sup.url, "fluxgate_tokens_total", expected, upstream=upstream,
                           key_id="ci", type=kind)  # fmt: skip
        assert value(samples, "fluxgate_tokens_total", upstream=upstream, key_id="ci",
                     type=kind) == expected  # fmt: skip


def snapshot(sup: Supervisor, upstream: str) -> dict[str, float]:
    return {kind: tokens(sup, upstream, kind) for kind in ("input", "output")}


def openai_client(sup: Supervisor) -> openai.OpenAI:
    return openai.OpenAI(base_url=sup.url + "/openai/v1", api_key=CLIENT_KEY, max_retries=0,
                         timeout=10)  # fmt: skip


def anthropic_client(sup: Supervisor) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=sup.url + "/anthropic", api_key=CLIENT_KEY,
                               max_retries=0, timeout=10)  # fmt: skip


# --- OpenAI ----------------------------------------------------------------------------


def test_openai_completion_usage_is_logged_and_counted_from_its_gzip_body(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    before, mark = snapshot(sup, "openai"), sup.mark()
    completion = openai_client(sup).chat.completions.create(model="fake-gpt", messages=MESSAGES)
    assert completion.usage is not None
    # The SDK asks for gzip and the fake provider, like OpenAI, then sends it gzipped.
    assert b"gzip" in (up.requests[-1].header("accept-encoding") or b"")
    line = log_line(sup, mark, "/openai/v1/chat/completions")
    assert int(line["input_tokens"]) == completion.usage.prompt_tokens > 0
    assert int(line["output_tokens"]) == completion.usage.completion_tokens > 0
    assert_counted(sup, "openai", before, input=completion.usage.prompt_tokens,
                   output=completion.usage.completion_tokens)  # fmt: skip


def test_openai_stream_usage_with_include_usage_is_logged_and_counted(sup: Supervisor) -> None:
    before, mark = snapshot(sup, "openai"), sup.mark()
    stream = openai_client(sup).chat.completions.create(
        model="fake-gpt", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 1
    line = log_line(sup, mark, "/openai/v1/chat/completions")
    assert int(line["input_tokens"]) == usage.prompt_tokens
    assert int(line["output_tokens"]) == usage.completion_tokens
    assert_counted(sup, "openai", before, input=usage.prompt_tokens,
                   output=usage.completion_tokens)  # fmt: skip


def test_openai_stream_without_include_usage_reports_none(sup: Supervisor) -> None:
    labels = {"upstream": "openai", "reason": "not_reported"}
    missing = value(scrape(sup.url), "fluxgate_usage_unavailable_total", **labels)
    mark = sup.mark()
    list(openai_client(sup).chat.completions.create(model="fake-gpt", messages=MESSAGES,
                                                    stream=True))  # fmt: skip
    line = log_line(sup, mark, "/openai/v1/chat/completions")
    assert "input_tokens" not in line and "output_tokens" not in line
    samples = wait_for(sup.url, "fluxgate_usage_unavailable_total", missing + 1, **labels)
    assert value(samples, "fluxgate_usage_unavailable_total", **labels) == missing + 1


# --- Anthropic -------------------------------------------------------------------------


def test_anthropic_message_usage_is_logged_and_counted(sup: Supervisor) -> None:
    before, mark = snapshot(sup, "anthropic"), sup.mark()
    message = anthropic_client(sup).messages.create(
        model="fake-claude", max_tokens=64, messages=MESSAGES
    )
    line = log_line(sup, mark, "/anthropic/v1/messages")
    assert int(line["input_tokens"]) == message.usage.input_tokens > 0
    assert int(line["output_tokens"]) == message.usage.output_tokens > 0
    assert_counted(sup, "anthropic", before, input=message.usage.input_tokens,
                   output=message.usage.output_tokens)  # fmt: skip


def test_anthropic_stream_usage_is_logged_and_counted(sup: Supervisor) -> None:
    before, mark = snapshot(sup, "anthropic"), sup.mark()
    with anthropic_client(sup).messages.stream(
        model="fake-claude", max_tokens=64, messages=MESSAGES
    ) as stream:
        final = stream.get_final_message()
    # input_tokens from message_start, output_tokens from the last message_delta.
    assert final.usage.output_tokens > 1
    line = log_line(sup, mark, "/anthropic/v1/messages")
    assert int(line["input_tokens"]) == final.usage.input_tokens
    assert int(line["output_tokens"]) == final.usage.output_tokens
    assert_counted(sup, "anthropic", before, input=final.usage.input_tokens,
                   output=final.usage.output_tokens)  # fmt: skip


# --- nothing held back, nothing changed ------------------------------------------------

USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


def _chunk(delta: dict[str, Any], usage: Any = None, finish: str | None = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    chunk = {"id": "chatcmpl-fixed", "object": "chat.completion.chunk", "created": 1,
             "model": "fake-gpt", "choices": choices, "usage": usage}  # fmt: skip
    return fr.sse_data(chunk)


# A fixed stream (the fake's own has random ids), with `"usage":null` chunks as
# OpenAI sends them when include_usage is on, then the usage chunk.
FIXED_STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "one "}),
    _chunk({"content": "two"}),
    _chunk({}, finish="stop"),
    _chunk(None, usage=USAGE),  # type: ignore[arg-type]
    b"data: [DONE]\n\n",
]


async def _fixed_stream(req: RecordedRequest, out: fr.Reply) -> bool:
    return await out.stream(FIXED_STREAM, out.interval(req))


@pytest.fixture
def fixed_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(fr.EXACT_ROUTES, "/fixed-stream", _fixed_stream)


def _timed_events(sup: Supervisor, prefix: str) -> tuple[list[bytes], list[float]]:
    events: list[bytes] = []
    times: list[float] = []
    with rawhttp.Conn(sup.port) as conn:
        conn.send(rawhttp.build_request("GET", f"{prefix}/fixed-stream?interval_ms=300", [
            rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY)]))  # fmt: skip
        resp = conn.read_head()
        assert resp.status == 200
        buffer = b""
        for data in conn.iter_chunks(resp):
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                events.append(event + b"\n\n")
                times.append(time.monotonic())
        assert resp.complete and buffer == b""
    return events, times


@pytest.mark.usefixtures("fixed_stream")
def test_with_usage_on_each_event_still_arrives_on_its_own_and_unchanged(sup: Supervisor) -> None:
    mark = sup.mark()
    on_events, on_times = _timed_events(sup, "/openai")
    off_events, off_times = _timed_events(sup, "/plain")
    assert on_events == off_events == FIXED_STREAM  # byte for byte, usage on or off
    for times in (on_times, off_times):
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(gap > 0.15 for gap in gaps), gaps  # none held back or coalesced
    on = log_line(sup, mark, "/openai/fixed-stream")
    assert (on["input_tokens"], on["output_tokens"]) == ("11", "4")
    off = log_line(sup, mark, "/plain/fixed-stream")
    assert "input_tokens" not in off
    assert on["response_bytes"] == off["response_bytes"] == str(len(b"".join(FIXED_STREAM)))


def test_a_body_in_an_encoding_not_inflated_passes_unchanged_and_is_skipped(
    sup: Supervisor,
) -> None:
    labels = {"upstream": "openai", "reason": "compressed"}
    skipped = value(scrape(sup.url), "fluxgate_usage_unavailable_total", **labels)
    status, headers, body = sup.request("GET", "/openai/gzip?encoding=br",
                                        {"Authorization": f"Bearer {CLIENT_KEY}"})  # fmt: skip
    assert status == 200 and headers["content-encoding"] == "br"
    assert body == fr.GZIP_BODY
    samples = wait_for(sup.url, "fluxgate_usage_unavailable_total", skipped + 1, **labels)
    assert value(samples, "fluxgate_usage_unavailable_total", **labels) == skipped + 1
