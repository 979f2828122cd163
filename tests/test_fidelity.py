"""Byte-level fidelity of the relay (README "Request handling", steps 6–9).

Requests are written over raw sockets so that nothing but the test decides
what the proxy receives, and the fake provider records exactly what the
proxy put on the wire (`raw_head`, `headers`, `raw_body`). Each test checks
one thing the spec promises to keep, change, or never add.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from demo.fake_responses import COOKIE_HEADERS, GZIP_BODY, GZIP_PLAIN
from demo.fake_upstream import FakeUpstreamThread, RecordedRequest
from tests import rawhttp
from tests.conftest import ANTHROPIC_KEY, CLIENT_KEY, OPENAI_KEY, SECRETS, proxy_config
from tests.rawhttp import bearer, chunked
from tests.supervisor_process import Supervisor


def fidelity_config(url: str) -> dict[str, Any]:
    """The standard config plus upstreams for path mapping and credential cases."""
    config = proxy_config(url)
    config["upstreams"].update(
        {
            "based": {"request_path": "/based", "target_url": url + "/base",
                      "api_key": OPENAI_KEY},
            "special": {"request_path": "/openai/special", "target_url": url + "/sp",
                        "api_key": OPENAI_KEY},
            "slashy": {"request_path": "/slashy/", "target_url": url + "/slash/",
                       "api_key": OPENAI_KEY},
            "azure": {"request_path": "/azure", "target_url": url, "api_key": OPENAI_KEY,
                      "auth_header": "api-key"},
            "local": {"request_path": "/local", "target_url": url},  # no api_key
            "goog": {"request_path": "/goog", "target_url": url, "api_key": OPENAI_KEY,
                     "auth_header": "x-goog-api-key"},
        }
    )  # fmt: skip
    return config


@pytest.fixture(scope="module")
def sup(up: FakeUpstreamThread, module_supervisor: Callable[..., Supervisor]) -> Supervisor:
    return module_supervisor(fidelity_config(up.url))


def host(sup: Supervisor) -> tuple[str, str]:
    return rawhttp.host(sup.port)


AUTH = bearer(CLIENT_KEY)
pytestmark = pytest.mark.usefixtures("fresh")  # each test sees only its own requests


def send(
    sup: Supervisor, method: str, target: str | bytes, *headers: tuple[str, str | bytes],
    body: bytes = b"",
) -> rawhttp.Response:  # fmt: skip
    """A raw request with Host, the client key, and exactly `headers`."""
    return rawhttp.request(sup.port, method, target, [host(sup), AUTH, *headers], body)


def forwarded(up: FakeUpstreamThread) -> RecordedRequest:
    """The one request the upstream received in this test."""
    requests = up.wait_for_requests(1)
    assert len(requests) == 1, [r.target for r in requests]
    return requests[0]


def upstream_host(up: FakeUpstreamThread) -> bytes:
    return f"127.0.0.1:{up.port}".encode()


def names(req: RecordedRequest) -> list[bytes]:
    return [n.lower() for n, _ in req.headers]


# --- request target (§4.7) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/echo/a%2Fb",
        "/echo/a%2fb",
        "/echo/a%20b",
        "/echo/%7Euser",
        "/echo/caf%C3%A9",
        "/echo/a;p=1,x/",
        "/echo?a=1&a=2&b",
        "/echo?=",
        "/echo?x=%ZZ",
        "/echo?",
        "/echo?q=a+b%2Bc&r=%26&s=%3d",
        "/echo?a=/b?c",
        "//echo//double",
        "/echo/a.b/.../.x/x./v1.2",  # dots inside segments are not dot segments
    ],
)
def test_request_target_bytes_reach_the_upstream_unchanged(
    sup: Supervisor, up: FakeUpstreamThread, target: str
) -> None:
    resp = send(sup, "GET", "/openai" + target)
    assert forwarded(up).target == target.encode()
    assert resp.status in (200, 404)  # whatever the fake answers, it is relayed


@pytest.mark.parametrize(
    ("request_target", "upstream_target"),
    [
        ("/based/v1/x", "/base/v1/x"),
        ("/based/v1/x?q=1", "/base/v1/x?q=1"),
        ("/based/v1/", "/base/v1/"),
    ],
)
def test_target_path_is_base_path_plus_rest_after_prefix(
    sup: Supervisor, up: FakeUpstreamThread, request_target: str, upstream_target: str
) -> None:
    send(sup, "GET", request_target)
    assert forwarded(up).target == upstream_target.encode()


@pytest.mark.parametrize(
    "rest",
    [
        "/../x",
        "/..",
        "/./x",
        "/%2e%2e/x",
        "/%2E%2e/x",
        "/.%2e/x",
        "/%2e/x",
        "/..%2fx",
        "/..%5cx",
        "/..\\x",
        "/v1/../../x",
        "/../x?q=1",
    ],
)
def test_dot_segments_after_the_prefix_are_refused_and_never_forwarded(
    sup: Supervisor, up: FakeUpstreamThread, rest: str
) -> None:
    """A base path cannot be climbed out of (`/based` forwards to `/base`)."""
    resp = send(sup, "GET", "/based" + rest)
    assert resp.status == 400
    assert json.loads(resp.body)["error"]["type"] == "bad_request"
    assert up.requests == []


@pytest.mark.parametrize(
    ("request_target", "upstream_target"),
    [
        ("/based", "/base"),
        ("/based?q=1", "/base?q=1"),
        ("/openai", "/"),
        ("/openai?q=1", "/?q=1"),
    ],
)
def test_request_for_exactly_the_prefix_goes_to_the_base_path_or_root(
    sup: Supervisor, up: FakeUpstreamThread, request_target: str, upstream_target: str
) -> None:
    send(sup, "GET", request_target)
    assert forwarded(up).target == upstream_target.encode()


@pytest.mark.parametrize(
    ("request_target", "upstream_target"),
    [
        ("/based/", "/base/"),
        ("/openai/", "/"),
        # request_path "/slashy/", target ".../slash/": both trailing slashes are optional
        ("/slashy", "/slash"),
        ("/slashy/", "/slash/"),
        ("/slashy/v1/x", "/slash/v1/x"),
    ],
)
def test_prefix_with_or_without_trailing_slash_matches_alike(
    sup: Supervisor, up: FakeUpstreamThread, request_target: str, upstream_target: str
) -> None:
    send(sup, "GET", request_target)
    assert forwarded(up).target == upstream_target.encode()


@pytest.mark.parametrize(
    "request_target", ["/openaix", "/openaix/v1", "/based.json", "/slashyx", "/openai%2Fv1", "/"]
)
def test_prefix_matches_only_on_a_segment_boundary(
    sup: Supervisor, up: FakeUpstreamThread, request_target: str
) -> None:
    resp = send(sup, "GET", request_target)
    assert resp.status == 404
    assert json.loads(resp.body)["error"]["type"] == "not_found"
    assert up.requests == []


@pytest.mark.parametrize(
    ("request_target", "upstream_target"),
    [
        ("/openai/special/x", "/sp/x"),
        ("/openai/special", "/sp"),
        ("/openai/specialx", "/specialx"),  # not a segment of /openai/special: /openai wins
        ("/openai/v1/special", "/v1/special"),
    ],
)
def test_longest_matching_prefix_wins(
    sup: Supervisor, up: FakeUpstreamThread, request_target: str, upstream_target: str
) -> None:
    send(sup, "GET", request_target)
    assert forwarded(up).target == upstream_target.encode()


# --- request headers (§4.7) --------------------------------------------------------------


def test_duplicate_headers_and_their_order_are_kept(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    send(sup, "GET", "/openai/echo", ("X-Dup", "1"), ("X-Other", "o"), ("X-Dup", "2"))
    head = forwarded(up).raw_head
    assert b"\r\nx-dup: 1\r\nx-other: o\r\nx-dup: 2\r\n" in head


def test_header_values_are_kept_byte_for_byte(sup: Supervisor, up: FakeUpstreamThread) -> None:
    odd = b'caf\xc3\xa9 \xe2\x82\xac "q" ,; a=b  spaced\ttab'
    send(sup, "GET", "/openai/echo", ("X-Bytes", odd), ("X-Empty", ""))
    req = forwarded(up)
    assert req.header_values("x-bytes") == [odd]
    assert req.header_values("x-empty") == [b""]


def test_client_credentials_are_replaced_by_the_bearer_provider_key(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    send(sup, "GET", "/openai/echo", ("x-api-key", "client-x"), ("api-key", "client-azure"))
    req = forwarded(up)
    assert req.header_values("authorization") == [f"Bearer {OPENAI_KEY}".encode()]
    assert req.header_values("x-api-key") == []
    assert req.header_values("api-key") == []
    assert CLIENT_KEY.encode() not in req.raw_head


def test_anthropic_upstream_gets_its_raw_key_in_x_api_key(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    rawhttp.request(
        sup.port, "GET", "/anthropic/echo",
        [host(sup), ("x-api-key", CLIENT_KEY), ("api-key", "client-azure")],
    )  # fmt: skip
    req = forwarded(up)
    assert req.header_values("x-api-key") == [ANTHROPIC_KEY.encode()]
    assert req.header_values("authorization") == []
    assert req.header_values("api-key") == []
    assert CLIENT_KEY.encode() not in req.raw_head


def test_custom_auth_header_carries_the_raw_key(sup: Supervisor, up: FakeUpstreamThread) -> None:
    send(sup, "GET", "/azure/echo", ("api-key", "client-azure"))
    req = forwarded(up)
    assert req.header_values("api-key") == [OPENAI_KEY.encode()]
    assert req.header_values("authorization") == []


def test_a_clients_copy_of_the_upstreams_auth_header_is_not_forwarded(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    """Only the provider's key reaches the provider, not a client's value ahead of it."""
    send(sup, "GET", "/goog/echo", ("X-Goog-Api-Key", "client-goog"), ("x-other", "kept"))
    req = forwarded(up)
    assert req.header_values("x-goog-api-key") == [OPENAI_KEY.encode()]
    assert req.header_values("x-other") == [b"kept"]
    assert b"client-goog" not in req.raw_head


def test_upstream_without_api_key_gets_no_credential_header(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    send(sup, "GET", "/local/echo", ("x-api-key", "client-x"), ("api-key", "client-azure"))
    req = forwarded(up)
    assert {b"authorization", b"x-api-key", b"api-key"}.isdisjoint(names(req))
    assert not any(secret.encode() in req.raw_head for secret in SECRETS)


def test_host_is_rewritten_to_the_target_authority(sup: Supervisor, up: FakeUpstreamThread) -> None:
    rawhttp.request(
        sup.port, "GET", "/openai/echo", [("Host", "client.example:1234"), AUTH]
    )  # fmt: skip
    assert forwarded(up).header_values("host") == [upstream_host(up)]


@pytest.fixture(scope="module")
def port80_upstream() -> Iterator[FakeUpstreamThread]:
    """A fake provider on port 80 of a random loopback address (needs the privilege)."""
    address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    server = FakeUpstreamThread(host=address, port=80)
    try:
        server.start()
    except OSError as exc:
        pytest.skip(f"cannot listen on {address}:80: {exc}")
    try:
        yield server
    finally:
        server.stop()


def test_host_omits_the_default_port(
    port80_upstream: FakeUpstreamThread, tmp_path_factory: pytest.TempPathFactory
) -> None:
    address = port80_upstream.host
    config = proxy_config(f"http://{address}")
    config["upstreams"]["anthropic"]["target_url"] = f"http://{address}:80/v1"
    with_port = Supervisor(tmp_path_factory.mktemp("port80"), config)
    try:
        with_port.start()
        for path in ("/openai/echo", "/anthropic/echo"):
            headers = [rawhttp.host(with_port.port), AUTH]
            assert rawhttp.request(with_port.port, "GET", path, headers).status in (200, 404)
    finally:
        with_port.stop()
    requests = port80_upstream.wait_for_requests(2)
    assert [r.header_values("host") for r in requests] == [[address.encode()]] * 2


def test_hop_by_hop_headers_are_not_forwarded(sup: Supervisor, up: FakeUpstreamThread) -> None:
    send(
        sup, "GET", "/openai/echo",
        ("Connection", "keep-alive, X-Named-By-Connection"),
        ("X-Named-By-Connection", "dropped"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic c2VjcmV0"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Kept", "yes"),
    )  # fmt: skip
    req = forwarded(up)
    dropped = {b"connection", b"x-named-by-connection", b"keep-alive", b"te", b"trailer",
               b"proxy-authorization", b"proxy-connection"}  # fmt: skip
    assert dropped.isdisjoint(names(req)), req.raw_head
    assert req.header_values("x-kept") == [b"yes"]


def test_headers_named_by_connection_close_are_not_forwarded(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    send(sup, "GET", "/openai/echo", ("Connection", "close, X-Foo"), ("X-Foo", "bar"))
    assert {b"connection", b"x-foo"}.isdisjoint(names(forwarded(up)))


def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    with rawhttp.Conn(sup.port) as conn:
        conn.send(rawhttp.build_request("POST", "/openai/echo", [
            host(sup), AUTH, ("Expect", "100-continue"), ("Content-Length", "5"),
        ]))  # fmt: skip
        assert conn.read_head().status == 100
        conn.send(b"hello")
        resp = conn.read_response()
    assert resp.status == 200
    req = forwarded(up)
    assert b"expect" not in names(req)
    assert req.body == b"hello"


def test_client_library_adds_no_header_to_a_get(sup: Supervisor, up: FakeUpstreamThread) -> None:
    rawhttp.request(sup.port, "GET", "/openai/echo", [host(sup), AUTH])
    req = forwarded(up)
    provider = b"Bearer " + OPENAI_KEY.encode()
    assert sorted(req.headers) == [(b"authorization", provider), (b"host", upstream_host(up))]


def test_client_library_adds_no_header_to_a_post(sup: Supervisor, up: FakeUpstreamThread) -> None:
    rawhttp.request(
        sup.port, "POST", "/openai/echo", [host(sup), AUTH, ("Content-Length", "2")], b"{}"
    )  # fmt: skip
    req = forwarded(up)
    assert sorted(names(req)) == [b"authorization", b"content-length", b"host"]
    assert req.body == b"{}"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_request_without_body_gets_no_content_length_added(
    sup: Supervisor, up: FakeUpstreamThread, method: str
) -> None:
    resp = rawhttp.request(sup.port, method, "/openai/echo", [host(sup), AUTH])
    assert resp.status == 200
    req = forwarded(up)
    assert req.method == method
    assert sorted(names(req)) == [b"authorization", b"host"]


def test_redirects_are_passed_to_the_client_not_followed(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    resp = send(sup, "GET", "/openai/redirect")
    assert resp.status == 302
    assert resp.header_values("location") == [b"/echo"]
    assert [r.target for r in up.requests] == [b"/redirect"]


# --- request bodies (§4.8) ---------------------------------------------------------------


def test_content_length_request_goes_up_with_content_length(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    body = b'{"model": "m", "messages": []}'
    send(sup, "POST", "/openai/echo", ("Content-Length", str(len(body))), body=body)
    req = forwarded(up)
    assert req.header_values("content-length") == [str(len(body)).encode()]
    assert req.header_values("transfer-encoding") == []
    assert not req.chunked
    assert req.raw_body == body


def test_chunked_request_goes_up_chunked(sup: Supervisor, up: FakeUpstreamThread) -> None:
    body = chunked(b"hello ", b"chunked ", b"world" * 1000)
    send(sup, "POST", "/openai/echo", ("Transfer-Encoding", "chunked"), body=body)
    req = forwarded(up)
    assert req.chunked
    assert req.header_values("transfer-encoding") == [b"chunked"]
    assert req.header_values("content-length") == []
    assert req.body == b"hello chunked " + b"world" * 1000


# --- responses (§4.8–4.9) ----------------------------------------------------------------


@pytest.mark.parametrize("status", [201, 202, 400, 404, 418, 429, 500, 503])
def test_upstream_status_and_body_are_relayed(sup: Supervisor, status: int) -> None:
    resp = send(sup, "GET", f"/openai/status/{status}")
    assert resp.status == status
    assert json.loads(resp.body) == {"status": status}


def test_response_headers_are_relayed_verbatim_with_duplicates_in_order(
    sup: Supervisor,
) -> None:
    resp = send(sup, "GET", "/openai/cookies")
    body = b'{"cookies":3}'
    sent = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            *COOKIE_HEADERS]  # fmt: skip
    expected = [(n.lower().encode(), v.encode()) for n, v in sent]
    assert [(n.lower(), v) for n, v in resp.headers] == expected
    assert resp.body == body


def test_compressed_response_is_passed_through_compressed(sup: Supervisor) -> None:
    resp = send(sup, "GET", "/openai/gzip", ("Accept-Encoding", "gzip"))
    assert resp.header_values("content-encoding") == [b"gzip"]
    assert resp.header_values("content-length") == [str(len(GZIP_BODY)).encode()]
    assert resp.body == GZIP_BODY
    assert gzip.decompress(resp.body) == GZIP_PLAIN


def test_response_content_length_is_kept(sup: Supervisor) -> None:
    resp = send(sup, "GET", "/openai/download?bytes=100000")
    assert resp.header_values("content-length") == [b"100000"]
    assert not resp.chunked
    assert len(resp.body) == 100000


def test_chunked_response_stays_chunked(sup: Supervisor) -> None:
    resp = send(sup, "GET", "/openai/download?bytes=100000&chunked=1")
    assert resp.chunked and resp.complete
    assert resp.header_values("content-length") == []
    assert len(resp.body) == 100000


@pytest.mark.parametrize(
    "target", ["/openai/echo", "/openai/status/500", "/openai/sse?events=1", "/nowhere"]
)
def test_proxy_adds_no_server_or_date_header(sup: Supervisor, target: str) -> None:
    resp = send(sup, "GET", target)
    assert {b"server", b"date"}.isdisjoint(resp.header_names), resp.raw_head


def test_own_error_responses_have_no_server_or_date_header(sup: Supervisor) -> None:
    resp = rawhttp.request(sup.port, "GET", "/openai/echo", [host(sup)])
    assert resp.status == 401
    assert {b"server", b"date"}.isdisjoint(resp.header_names), resp.raw_head


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("HEAD", "/openai/download?bytes=5000", 200),
        ("HEAD", "/openai/echo", 200),
        ("GET", "/openai/status/204", 204),
        ("GET", "/openai/status/304", 304),
    ],
)
def test_bodiless_responses_leave_the_connection_clean_for_the_next_request(
    sup: Supervisor, method: str, target: str, status: int
) -> None:
    """Pipelined: any stray body byte would corrupt the second response."""
    with rawhttp.Conn(sup.port) as conn:
        conn.send(
            rawhttp.build_request(method, target, [host(sup), AUTH])
            + rawhttp.build_request("GET", "/openai/echo/second", [host(sup), AUTH])
        )
        first = conn.read_response(head_only=method == "HEAD")
        second = conn.read_response()
    assert first.status == status
    assert second.status == 200
    assert json.loads(second.body)["target"] == "/echo/second"


def test_upstream_connection_is_kept_alive_and_reused(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    """One client connection keeps its requests on one worker, whose pool reuses
    the upstream connection each exchange released (chunked or not, with a body
    or not)."""
    with rawhttp.Conn(sup.port) as conn:
        for i in range(3):
            assert conn.request("GET", f"/openai/echo/{i}", [host(sup), AUTH]).status == 200
        assert conn.request("GET", "/openai/download?bytes=5000&chunked=1",
                            [host(sup), AUTH]).status == 200  # fmt: skip
        assert conn.request("POST", "/openai/echo/post", [host(sup), AUTH,
                            ("Content-Length", "2")], b"{}").status == 200  # fmt: skip
    used = {r.connection_id for r in up.wait_for_requests(5)}
    assert len(used) == 1, used


def test_head_response_keeps_the_upstream_content_length(sup: Supervisor) -> None:
    with rawhttp.Conn(sup.port) as conn:
        resp = conn.request("HEAD", "/openai/download?bytes=5000", [host(sup), AUTH])
        assert resp.header_values("content-length") == [b"5000"]
        assert conn.request("GET", "/openai/echo", [host(sup), AUTH]).status == 200


def test_header_value_that_is_not_utf8_still_goes_through(
    sup: Supervisor, up: FakeUpstreamThread
) -> None:
    """aiohttp writes heads as UTF-8, so such bytes cannot pass verbatim: at least the
    request is not failed (the value arrives re-encoded, see headers.wire_text)."""
    resp = send(sup, "GET", "/openai/echo", ("X-Latin1", b"caf\xe9"), ("X-Next", "n"))
    assert resp.status == 200
    req = forwarded(up)
    assert req.header_values("x-latin1") == ["café".encode()]
    assert req.header_values("x-next") == [b"n"]
