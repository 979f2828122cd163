"""Logs (README "Logs"): the per-request line, text and JSON formats, level and colour.

The supervisor tests run a real `fluxgate-supervisor start` with the logging
environment variables set; the unit tests at the bottom format LogRecords
directly.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxgate.logs import (
    TRACE,
    FieldsJsonFormatter,
    RequestLog,
    TextFormatter,
    log_fields,
    make_handler,
    parse_level,
    text_str,
)
from fluxgate.logs import request_fields as _request_fields
from fluxgate.logs import request_text as _request_text
from fluxgate.usage import JsonTap
from tests.conftest import CLIENT_KEY, OPENAI_KEY, proxy_config
from tests.supervisor_process import Supervisor

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
TEXT_LINE = re.compile(rf"^(TRACE|DEBUG|INFO |WARNING|ERROR) {TIMESTAMP} \S")
ANSI = "\x1b["


def start(make_supervisor: Any, upstream: Any, **env: str) -> Supervisor:
    sup: Supervisor = make_supervisor(proxy_config(upstream.url), start=False, env=env)
    sup.start(wait=False)  # start() waits for the text-format line; wait for either format
    sup.wait_for_log(r'serving address=|"message": "serving"', timeout=15)
    return sup


def json_lines(sup: Supervisor, start: int = 0) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sup.lines[start:]]


def send_malformed(sup: Supervisor) -> None:
    """A request the protocol refuses with a WARNING: a barrier in the worker's log order."""
    with socket.create_connection(("127.0.0.1", sup.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        while sock.recv(4096):
            pass


# The request line, JSON format


@pytest.fixture
def json_sup(make_supervisor: Any, upstream: Any) -> Supervisor:
    return start(make_supervisor, upstream, FLUXGATE_LOG_FORMAT="json")


def test_json_request_line_has_every_field(json_sup: Supervisor, upstream: Any) -> None:
    body = b'{"model": "fake-gpt", "messages": []}'
    mark = json_sup.mark()
    status, _, response = json_sup.request(
        "POST", "/openai/v1/chat/completions?trace=1&x=%2F", headers=AUTH, body=body
    )
    assert status == 200
    json_sup.wait_for_log(r'"message": "request"', start=mark)
    [line] = [r for r in json_lines(json_sup, mark) if r["message"] == "request"]

    assert line["level"] == "TRACE"
    assert re.fullmatch(TIMESTAMP, line["timestamp"])
    assert line["client_ip"] == "127.0.0.1"
    assert line["method"] == "POST"
    assert line["request_url"] == "/openai/v1/chat/completions?trace=1&x=%2F"
    assert line["request_body_length"] == len(body)
    assert line["api_key"] == "ci"
    assert line["upstream"] == "openai"
    assert line["target_url"] == f"{upstream.url}/v1/chat/completions?trace=1&x=%2F"
    assert line["status"] == 200
    assert line["outcome"] == "ok"
    assert line["request_bytes"] == len(body)
    assert line["response_bytes"] == len(response)
    assert line["response_body_length"] == len(response)
    for timing in ("duration_ms", "ttfb_ms"):
        assert isinstance(line[timing], int | float) and line[timing] >= 0
    assert line["ttfb_ms"] <= line["duration_ms"]


def test_json_request_line_omits_absent_values(json_sup: Supervisor) -> None:
    mark = json_sup.mark()
    assert json_sup.request("GET", "/openai/v1/models", headers=AUTH)[0] == 200
    assert json_sup.request("GET", "/openai/v1/models")[0] == 401
    json_sup.wait_for_log(r'"message": "request".*"status": 401', start=mark)
    ok, unauthorized = [r for r in json_lines(json_sup, mark) if r["message"] == "request"]
    assert "request_body_length" not in ok  # a GET without Content-Length
    assert ok["api_key"] == "ci"
    for absent in ("api_key", "upstream", "target_url", "ttfb_ms", "request_body_length"):
        assert absent not in unauthorized
    for record in json_lines(json_sup):
        assert None not in record.values(), record
        assert "None" not in json.dumps(record)


def test_json_lines_are_one_object_each_with_no_library_attributes(json_sup: Supervisor) -> None:
    records = json_lines(json_sup)
    assert records
    for record in records:
        assert {"message", "level", "timestamp"} <= record.keys()
        assert not {"name", "pathname", "lineno", "taskName", "color_message"} & record.keys()


# Text format, level and colour


def test_text_request_line_is_level_timestamp_message_then_fields(
    make_supervisor: Any, upstream: Any
) -> None:
    sup = start(make_supervisor, upstream)  # text is the default
    mark = sup.mark()
    assert sup.request("GET", "/openai/v1/models?a=b", headers=AUTH)[0] == 200
    line = sup.wait_for_log(r" request ", start=mark)
    assert re.fullmatch(
        rf"TRACE {TIMESTAMP} request client_ip=127\.0\.0\.1 method=GET "
        r'request_url="/openai/v1/models\?a=b" api_key=ci .*status=200 outcome=ok .*',
        line,
    ), line
    assert " request_body_length=" not in line
    assert "=None" not in line
    for every in sup.lines:
        assert TEXT_LINE.match(every), every
        assert "fluxgate." not in every.split(" ", 3)[2]  # no module-path prefix
        assert ANSI not in every  # FLUXGATE_LOG_STYLE=never (the harness default)


def test_info_level_suppresses_request_lines(make_supervisor: Any, upstream: Any) -> None:
    sup = start(make_supervisor, upstream, FLUXGATE_LOG="INFO")
    mark = sup.mark()
    assert sup.request("GET", "/openai/v1/models", headers=AUTH)[0] == 200
    send_malformed(sup)
    sup.wait_for_log(r"^WARNING .*request rejected", start=mark)
    assert not [line for line in sup.lines if line.startswith(("TRACE", "DEBUG"))]


def test_style_always_colours_the_level(make_supervisor: Any, upstream: Any) -> None:
    sup = start(make_supervisor, upstream, FLUXGATE_LOG_STYLE="always")
    mark = sup.mark()
    assert sup.request("GET", "/openai/v1/models", headers=AUTH)[0] == 200
    line = sup.wait_for_log(r" request ", start=mark)
    assert line.startswith(ANSI) and "TRACE" in line.split(" ", 1)[0]
    assert all(every.startswith(ANSI) for every in sup.lines)


def test_no_secret_in_any_request_line(make_supervisor: Any, upstream: Any) -> None:
    sup = start(make_supervisor, upstream)
    mark = sup.mark()
    sup.request("GET", "/openai/v1/models", headers=AUTH)
    sup.request("GET", "/openai/v1/models", headers={"x-api-key": "fg-not-a-key-but-secret"})
    sup.wait_for_log(r" request .*status=401", start=mark)
    for line in sup.lines:
        assert CLIENT_KEY not in line and OPENAI_KEY not in line
        assert "fg-not-a-key-but-secret" not in line


# Formatters and helpers, unit level


def record(level: int = logging.INFO, message: str = "hello", **fields: Any) -> logging.LogRecord:
    rec = logging.LogRecord("fluxgate.test", level, "/path/to/module.py", 1, message, (), None)
    if fields:
        rec.fields = fields  # type: ignore[attr-defined]
    rec.created = 1_700_000_000.25
    rec.msecs = 250.0
    return rec


def test_text_formatter_shape() -> None:
    line = TextFormatter(colour=False).format(record(status=200, url="/a/b?c"))
    assert line == "INFO  2023-11-14T22:13:20.250Z hello status=200 url=/a/b?c"


def test_text_formatter_names_levels_as_the_spec_does() -> None:
    formatter = TextFormatter(colour=False)
    assert formatter.format(record(TRACE)).startswith("TRACE ")
    assert formatter.format(record(logging.WARNING)).startswith("WARNING ")
    assert formatter.format(record(logging.ERROR)).startswith("ERROR ")


@pytest.mark.parametrize("json_format", [False, True], ids=["text", "json"])
def test_an_event_with_newlines_and_a_traceback_is_one_line(json_format: bool) -> None:
    """journald and Loki make each line its own record: one event must be one line."""
    stream = io.StringIO()
    env = {"FLUXGATE_LOG_FORMAT": "json" if json_format else "text", "FLUXGATE_LOG_STYLE": "never"}
    handler = make_handler(env, stream)
    try:
        raise ValueError("first\nsecond")
    except ValueError:
        rec = record(logging.ERROR, "problems:\r\n  a\n  b", cause="x\ny")
        rec.exc_info = sys.exc_info()
    handler.emit(rec)
    out = stream.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n") and "\r" not in out, out
    assert "problems:" in out and "second" in out and "ValueError" in out


def test_text_formatter_quotes_values_that_would_break_key_value_parsing() -> None:
    line = TextFormatter(colour=False).format(
        record(reason='a "quoted" value', empty="", eq="a=b", nl="x\ny")
    )
    assert line.endswith(r'hello reason="a \"quoted\" value" empty="" eq="a=b" nl="x\ny"')


def _logged_batch(handler: logging.Handler, *lines: dict[str, Any]) -> None:
    """Queue `lines` on a RequestLog whose logger has only `handler`, then flush."""
    logger = logging.getLogger("test.request_log")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(TRACE)
    log = RequestLog(lambda fields: fields, logger=logger)

    async def queue() -> None:
        for fields in lines:
            log.add(fields)

    asyncio.run(queue())
    log.flush()


def test_request_log_text_batch_matches_the_formatter_line_for_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(colour=False))
    lines = [{"status": 200, "request_url": "/a b"}, {"status": 404, "outcome": "no_route"}]
    _logged_batch(handler, *lines)
    written = stream.getvalue().splitlines()
    assert len(written) == 2
    for text, fields in zip(written, lines, strict=True):
        rec = logging.LogRecord("r", TRACE, "", 0, "request", (), None)
        rec.fields = fields
        timestamp = text.split(" ")[1]
        rec.created = rec.msecs = 0.0
        expected = (
            TextFormatter(colour=False).format(rec).replace("1970-01-01T00:00:00.000Z", timestamp)
        )
        assert text == expected


def test_request_log_json_batch_matches_the_formatter_line_for_line() -> None:
    stream = io.StringIO()
    handler = make_handler({"FLUXGATE_LOG_FORMAT": "json"}, stream)
    lines = [{"status": 200, "request_url": '/a "b"'}, {"status": 404, "outcome": "no_route"}]
    _logged_batch(handler, *lines)
    written = stream.getvalue().splitlines()
    assert len(written) == 2
    for text, fields in zip(written, lines, strict=True):
        rec = logging.LogRecord("r", TRACE, "", 0, "request", (), None)
        rec.fields = fields
        rec.created, rec.msecs = 1.7e9, 0.0
        expected = json.loads(handler.format(rec))
        expected["timestamp"] = json.loads(text)["timestamp"]
        assert text == json.dumps(expected)


def test_request_log_reaches_handlers_that_are_not_streams() -> None:
    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    handler = Collect()
    _logged_batch(handler, {"status": 200}, {"status": 502})
    assert [r.fields for r in handler.records] == [{"status": 200}, {"status": 502}]  # type: ignore[attr-defined]
    assert {r.levelno for r in handler.records} == {TRACE}


def test_request_log_writes_a_full_batch_at_the_next_loop_turn() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(colour=False))
    logger = logging.getLogger("test.request_log.batch")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(TRACE)
    log = RequestLog(lambda fields: fields, logger=logger, delay=60.0, batch=3)
    written: list[int] = []

    async def requests() -> None:
        for status in (200, 201):
            log.add({"status": status})
        await asyncio.sleep(0)
        written.append(len(stream.getvalue().splitlines()))  # under a batch: waits for delay
        log.add({"status": 202})
        await asyncio.sleep(0)
        written.append(len(stream.getvalue().splitlines()))

    asyncio.run(requests())
    assert written == [0, 3]


_latin1 = st.text(alphabet=st.characters(max_codepoint=255), max_size=24)
_count = st.integers(min_value=0, max_value=10**12)
_ms = st.floats(min_value=0, max_value=1e6)


def _usage_tap(usage: dict[str, int] | None) -> JsonTap | None:
    if usage is None:
        return None
    tap = JsonTap("openai")
    tap.feed(json.dumps({"usage": usage}).encode())
    return tap


@settings(max_examples=300, deadline=None)
@given(
    values=st.tuples(
        st.none() | _latin1,
        _latin1,
        st.binary(max_size=40),
        st.none() | _count,
        st.none() | _latin1,
        st.none() | _latin1,
        st.none() | _latin1,
        st.none() | _latin1,
        st.integers(0, 999),
        _latin1,
        st.integers(0, 10),
        st.none() | st.sampled_from(["expired", "bad_signature", "unknown_key"]),
        st.none() | st.sampled_from(["requests", "tokens", "concurrent", "budget"]),
        _ms,
        st.none() | _ms,
        _count,
        _count,
        st.none() | _count,
        st.none()
        | st.dictionaries(
            st.sampled_from(["prompt_tokens", "completion_tokens"]), st.integers(0, 10**6)
        ),
    )
)
def test_request_text_is_what_the_text_formatter_makes_of_the_request_fields(
    values: tuple[Any, ...],
) -> None:
    """The request line's fast path (proxy._request_text) and the generic one agree."""
    generic = (*values[:-1], _usage_tap(values[-1]))
    fast = (*values[:-1], _usage_tap(values[-1]))
    formatter = TextFormatter(colour=False)
    level = formatter.level_text(TRACE)
    expected = formatter.line(level, 1.7e9, 250.0, "request", _request_fields(generic))
    assert formatter.head(level, 1.7e9, 250.0, "request") + " " + _request_text(fast) == expected


def test_text_value_memory_is_bounded() -> None:
    for i in range(text_str.LIMIT + 10):
        text_str[f"/v1/models/{i}"]
    assert len(text_str) <= text_str.LIMIT
    long = "x" * (text_str.LONGEST + 1)
    assert text_str[long] == long
    assert long not in text_str


def test_text_formatter_colour_wraps_only_the_level() -> None:
    line = TextFormatter(colour=True).format(record(logging.WARNING))
    assert line.startswith("\x1b[33mWARNING\x1b[0m 2023-11-14T22:13:20.250Z hello")


def test_text_formatter_has_no_module_path() -> None:
    line = TextFormatter(colour=False).format(record())
    assert "fluxgate.test" not in line and "module.py" not in line


def test_json_formatter_puts_fields_at_the_top_level() -> None:
    out = json.loads(FieldsJsonFormatter().format(record(TRACE, "request", status=200, a="b")))
    assert out["message"] == "request"
    assert out["status"] == 200 and out["a"] == "b"
    assert out["level"] == "TRACE"
    assert out["timestamp"] == "2023-11-14T22:13:20.250Z"
    assert "fields" not in out


def test_json_handler_drops_logrecord_attributes() -> None:
    stream = io.StringIO()
    handler = make_handler({"FLUXGATE_LOG_FORMAT": "json"}, stream)
    handler.handle(record(logging.WARNING, "careful", n=1))
    out = json.loads(stream.getvalue())
    assert out == {
        "message": "careful",
        "n": 1,
        "level": "WARNING",
        "timestamp": "2023-11-14T22:13:20.250Z",
    }


@pytest.mark.parametrize(
    ("style", "isatty", "coloured"),
    [("always", False, True), ("never", True, False), ("auto", True, True), ("auto", False, False)],
)
def test_log_style_decides_colour(style: str, isatty: bool, coloured: bool) -> None:
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return isatty

    stream = Stream()
    make_handler({"FLUXGATE_LOG_STYLE": style}, stream).handle(record())
    assert (ANSI in stream.getvalue()) is coloured


@pytest.mark.parametrize(
    ("value", "level"),
    [
        (None, TRACE),
        ("TRACE", TRACE),
        ("debug", logging.DEBUG),
        ("INFO", logging.INFO),
        ("WARN", logging.WARNING),
        ("error", logging.ERROR),
    ],
)
def test_fluxgate_log_sets_the_level(value: str | None, level: int) -> None:
    assert parse_level(value) == level


def test_log_fields_omits_none_values(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("fluxgate.test_logs")
    with caplog.at_level(TRACE, logger="fluxgate.test_logs"):
        log_fields(logger, TRACE, "request", status=200, api_key=None, upstream="openai")
    [rec] = caplog.records
    assert rec.fields == {"status": 200, "upstream": "openai"}  # type: ignore[attr-defined]
