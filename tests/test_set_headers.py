"""Per-upstream `set_headers` (README "Configuration" and "Request handling"): set on
every forwarded request, replacing the client's copy; names follow the
auth_header rules; values are secrets, never in a message or a log line."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import pytest

from demo.fake_upstream import FakeUpstreamThread
from fluxgate.config import build_config
from fluxgate.validation import validate
from tests import rawhttp
from tests.conftest import CLIENT_KEY, OPENAI_KEY, SET_HEADER_SECRET, proxy_config
from tests.supervisor_process import Supervisor

SET = {"OpenAI-Organization": SET_HEADER_SECRET, "anthropic-version": "2023-06-01"}


def config_with(upstream_url: str, set_headers: object) -> dict[str, Any]:
    config = proxy_config(upstream_url)
    config["upstreams"]["openai"]["set_headers"] = set_headers
    return config


def test_set_headers_arrive_once_with_the_configured_value_whatever_the_client_sent(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(config_with(upstream.url, SET))
    client_copies = [
        ("openai-organization", "org-of-the-client"),
        ("OPENAI-ORGANIZATION", "another"),
        ("Anthropic-Version", "1999-01-01"),
        ("X-Request-Note", "kept"),
    ]
    headers = [rawhttp.host(sup.port), rawhttp.bearer(CLIENT_KEY), *client_copies]
    resp = rawhttp.request(sup.port, "GET", "/openai/v1/models", headers)
    assert resp.status == 200
    (recorded,) = upstream.wait_for_requests(1)
    assert recorded.header_values("openai-organization") == [SET_HEADER_SECRET.encode()]
    assert recorded.header_values("anthropic-version") == [b"2023-06-01"]
    assert recorded.header_values("x-request-note") == [b"kept"]
    assert recorded.header_values("authorization") == [f"Bearer {OPENAI_KEY}".encode()]
    # The other upstream has none of them.
    upstream.clear()
    resp = rawhttp.request(sup.port, "GET", "/anthropic/v1/models", headers)
    (recorded,) = upstream.wait_for_requests(1)
    assert recorded.header_values("anthropic-version") == [b"1999-01-01"]
    assert not any(SET_HEADER_SECRET in line for line in sup.lines)


def test_a_rejected_set_headers_value_is_never_logged(
    upstream: FakeUpstreamThread, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(config_with(upstream.url, SET))
    mark = sup.mark()
    bad = {"OpenAI-Organization": f" {SET_HEADER_SECRET}\n", "Bad Name": SET_HEADER_SECRET}
    sup.write_config(config_with(upstream.url, bad))
    line = sup.wait_for_log(r"config rejected", start=mark)
    assert "upstreams.openai.set_headers.OpenAI-Organization: " in line
    assert "upstreams.openai.set_headers[" in line  # the name is quoted, escaped in the log
    assert (
        sup.request("GET", "/openai/v1/models", {"Authorization": f"Bearer {CLIENT_KEY}"})[0] == 200
    )
    assert not any(SET_HEADER_SECRET in line for line in sup.lines)


# -- validation -------------------------------------------------------------------


def doc(set_headers: object, **upstream: Any) -> dict[str, Any]:
    spec = {"request_path": "/p", "target_url": "https://api.example.com", **upstream}
    spec["set_headers"] = set_headers
    return {"version": 1, "upstreams": {"p": spec}}


def paths(errors: list[str]) -> list[str]:
    return [error.split(": ", 1)[0] for error in errors]


@pytest.mark.parametrize(
    "name",
    ["Connection", "keep-alive", "TE", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
     "Bad Name", "x:y", "ümlaut", "Proxy-Authorization"],
)  # fmt: skip
def test_set_headers_names_follow_the_auth_header_rules(name: str) -> None:
    errors = validate(doc({name: "v"}))
    assert len(errors) == 1 and errors[0].startswith("upstreams.p.set_headers"), errors
    # The same name as auth_header is refused for the same reason.
    assert bool(validate(doc({}, api_key="k", auth_header=name)))


def test_a_set_headers_name_that_is_the_auth_header_is_an_error() -> None:
    errors = validate(doc({"Authorization": "Basic abc"}, api_key="k"))
    assert paths(errors) == ["upstreams.p.set_headers.Authorization"]
    errors = validate(doc({"X-Goog-Api-Key": "v"}, api_key="k", auth_header="x-goog-api-key"))
    assert paths(errors) == ["upstreams.p.set_headers.X-Goog-Api-Key"]
    errors = validate(doc({"x-goog-api-key": "v"}, auth_header="X-Goog-Api-Key"))
    assert paths(errors) == ["upstreams.p.set_headers.x-goog-api-key"]
    # Without api_key or auth_header no credential header is sent: the name is free.
    assert validate(doc({"Authorization": "Basic abc"})) == []


def test_set_headers_names_differing_only_in_case_are_one_header() -> None:
    errors = validate(doc({"OpenAI-Organization": "a", "openai-organization": "b"}))
    assert paths(errors) == ["upstreams.p.set_headers.openai-organization"]


@pytest.mark.parametrize(
    "value",
    [
        "",
        " padded",
        f"{SET_HEADER_SECRET}\r\nX-Injected: 1",
        "snow\u2603man",
        None,
        ["a"],
        datetime.date(2023, 6, 1),  # `anthropic-version: 2023-06-01` unquoted
        2023,
    ],
)
def test_set_headers_values_are_header_safe_strings_and_never_echoed(value: object) -> None:
    errors = validate(doc({"X-Org": value}))
    assert paths(errors) == ["upstreams.p.set_headers.X-Org"], errors
    assert SET_HEADER_SECRET not in errors[0]
    if isinstance(value, str) and value.strip():
        assert value.strip() not in errors[0]


def test_set_headers_of_the_wrong_shape_are_errors() -> None:
    assert paths(validate(doc(["OpenAI-Organization: x"]))) == ["upstreams.p.set_headers"]
    assert validate(doc(None)) == []
    assert validate(doc({})) == []


def test_set_headers_are_built_in_order_and_join_the_dropped_client_headers() -> None:
    (upstream,) = build_config(doc(SET, api_key="k")).upstreams
    assert upstream.set_headers == tuple(SET.items())
    assert {b"openai-organization", b"anthropic-version", b"authorization"} <= upstream.drop_headers
    assert SET_HEADER_SECRET not in repr(upstream)
