"""Response headers for the client, from the upstream's (fluxgate.headers `client_headers`)."""

from __future__ import annotations

from fluxgate.headers import client_headers


def test_every_end_to_end_header_passes_in_order_with_its_name_lower_cased() -> None:
    raw = ((b"Content-Type", b"application/json"), (b"X-Request-Id", b"a"), (b"x-request-id", b"b"))
    assert client_headers(raw) == [
        (b"content-type", b"application/json"),
        (b"x-request-id", b"a"),
        (b"x-request-id", b"b"),
    ]


def test_hop_by_hop_headers_stay_behind() -> None:
    raw = (
        (b"Connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Trailer", b"X-T"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"X-Kept", b"1"),
    )
    assert client_headers(raw) == [(b"x-kept", b"1")]


def test_headers_any_connection_header_names_stay_behind() -> None:
    raw = (
        (b"Connection", b"close, X-Secret-Hop"),
        (b"X-Secret-Hop", b"1"),
        (b"connection", b" X-Other ,"),
        (b"x-other", b"2"),
        (b"X-Kept", b"3"),
    )
    assert client_headers(raw) == [(b"x-kept", b"3")]
