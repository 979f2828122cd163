"""Error responses: every status Fluxgate answers with itself, built once at import.

An `ErrorResponse` is a constant (status, JSON body, headers, log outcome).
The request path picks one and sends its prebuilt bytes; nothing about a
refusal is formatted per request. Messages never carry request data or
secrets: they say what went wrong, not with what.

Refusals travel up the request path as a `ProxyError` made fresh at each
raise around one of these constants. A raised exception keeps the frames it
passed through (and their locals: the request's headers, its credential) in
its `__traceback__`; an instance kept at module level and raised again and
again would keep adding to that chain for the life of the worker. So no
exception instance is ever stored: the constants are plain data (see
docs/security.md, "Memory held by errors").
"""

from __future__ import annotations

import http
import json
import math
from dataclasses import dataclass
from typing import Final

JSON_CONTENT_TYPE: Final = b"application/json"

# "HTTP/1.1 404 Not Found\r\n" for every status, as uvicorn builds its own table.
STATUS_LINES: Final = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())
    for status in http.HTTPStatus
}


def error_body(error_type: str, message: str) -> bytes:
    return json.dumps({"error": {"type": error_type, "message": message}}).encode()


def error_headers(body: bytes, close: bool = False) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", JSON_CONTENT_TYPE),
        (b"content-length", b"%d" % len(body)),
    ]
    if close:
        headers.append((b"connection", b"close"))
    return headers


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """One of Fluxgate's own answers, with its bytes ready to send."""

    status: int
    error_type: str
    message: str
    outcome: str  # the request log line's `outcome`
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    # The whole response, closing the connection: for the protocol layer,
    # which answers before any ASGI cycle exists.
    wire: bytes

    @classmethod
    def make(
        cls,
        status: int,
        error_type: str,
        message: str,
        outcome: str | None = None,
        extra_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> ErrorResponse:
        body = error_body(error_type, message)
        headers = (*error_headers(body), *extra_headers)
        head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        wire = STATUS_LINES[status] + head + b"connection: close\r\n\r\n" + body
        return cls(status, error_type, message, outcome or error_type, body, headers, wire)


class ProxyError(Exception):
    """A refusal or failure answered with `response`; raise a new one each time."""

    __slots__ = ("response",)

    def __init__(self, response: ErrorResponse) -> None:
        super().__init__(response.message)
        self.response = response


class StreamAborted(Exception):
    """The response had started when the exchange failed: the client connection is cut.

    Raised out of the ASGI app on purpose so that uvicorn closes the
    transport instead of completing a truncated body as if it were whole.
    """


# The protocol's answers (fluxgate.protocol), each closing the connection.
MALFORMED: Final = ErrorResponse.make(400, "bad_request", "malformed HTTP request")
NOT_A_PATH: Final = ErrorResponse.make(400, "bad_request", "request target must be a path")
ONE_HOST: Final = ErrorResponse.make(400, "bad_request", "exactly one Host header is required")
METHOD_NOT_FORWARDED: Final = ErrorResponse.make(
    405,
    "method_not_allowed",
    "this method is not forwarded",
    extra_headers=((b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),),
)
HEAD_TIMED_OUT: Final = ErrorResponse.make(
    408, "request_timeout", "request head not received in time"
)
HEAD_TOO_LARGE: Final = ErrorResponse.make(
    431, "request_header_fields_too_large", "request head too large"
)
NO_UPGRADE: Final = ErrorResponse.make(
    501, "not_implemented", "CONNECT and protocol upgrades are not supported"
)
ONLY_CHUNKED: Final = ErrorResponse.make(
    501, "not_implemented", "only the chunked transfer coding is supported"
)
OVER_CAPACITY: Final = ErrorResponse.make(
    503, "over_capacity", "the server is at its connection limit"
)
# nginx's proxy_pass speaks HTTP/1.0 unless told otherwise: say what to change.
HTTP_11_ONLY: Final = ErrorResponse.make(
    505,
    "http_version_not_supported",
    "only HTTP/1.1 is served; behind nginx, set proxy_http_version 1.1 "
    '(and proxy_set_header Connection "")',
)

# The app's own answers (fluxgate.proxy).
UNAUTHORIZED: Final = ErrorResponse.make(401, "unauthorized", "invalid credential")
NO_CREDENTIAL: Final = ErrorResponse.make(
    401, "unauthorized", "missing credential: send Authorization: Bearer <key>"
)
BAD_SCHEME: Final = ErrorResponse.make(
    401, "unauthorized", "unsupported authorization scheme: use Bearer"
)
NO_UPSTREAM_GRANTED: Final = ErrorResponse.make(
    401, "unauthorized", "credential grants no upstream"
)
NOT_FOUND: Final = ErrorResponse.make(404, "not_found", "no upstream matches this path", "no_route")
NO_ENDPOINT: Final = ErrorResponse.make(404, "not_found", "no such Fluxgate endpoint", "no_route")
OWN_METHOD: Final = ErrorResponse.make(
    405, "method_not_allowed", "use GET or HEAD", extra_headers=((b"allow", b"GET, HEAD"),)
)
# The series files stayed torn through every retry (fluxgate.metrics `LockedCollector`).
METRICS_UNREADABLE: Final = ErrorResponse.make(
    503, "metrics_unavailable", "the metrics could not be read; scrape again", "metrics"
)
DOT_SEGMENT: Final = ErrorResponse.make(
    400, "bad_request", "the path has a . or .. segment (raw or percent-encoded)", "bad_path"
)

# Upstream failures before any response byte (fluxgate.upstream).
UPSTREAM_DNS_ERROR: Final = ErrorResponse.make(
    502, "upstream_dns_error", "upstream host name did not resolve"
)
UPSTREAM_TLS_ERROR: Final = ErrorResponse.make(
    502, "upstream_tls_error", "TLS handshake with the upstream failed"
)
UPSTREAM_UNREACHABLE: Final = ErrorResponse.make(
    502, "upstream_unreachable", "could not connect to the upstream"
)
UPSTREAM_BAD_RESPONSE: Final = ErrorResponse.make(
    502, "upstream_bad_response", "the upstream sent an invalid response"
)
UPSTREAM_CONNECTION_ERROR: Final = ErrorResponse.make(
    502, "upstream_connection_error", "the upstream closed the connection before responding"
)
UPSTREAM_TIMEOUT: Final = ErrorResponse.make(
    504, "upstream_timeout", "the upstream did not answer within request_timeout_ms"
)
UPSTREAM_CONNECT_TIMEOUT: Final = ErrorResponse.make(
    504,
    "upstream_timeout",
    "no connection to the upstream within connect_timeout_ms",
    "upstream_connect_timeout",
)
UPSTREAM_FIRST_BYTE_TIMEOUT: Final = ErrorResponse.make(
    504,
    "upstream_timeout",
    "the upstream sent no response head within first_byte_timeout_ms",
    "upstream_first_byte_timeout",
)


# Per-key limits (fluxgate.ratelimit): the 429's body per limit, and its headers.
LIMIT_MESSAGES: Final = {
    "requests": "over this key's requests per minute",
    "tokens": "over this key's tokens per minute",
    "concurrent": "over this key's concurrent requests",
    "budget": "over this key's tokens per day",
}
_RATE_LIMITED_BODIES: Final = {
    limit: error_body("rate_limited", message) for limit, message in LIMIT_MESSAGES.items()
}
LIMIT_BACKEND_DOWN: Final = ErrorResponse.make(
    503,
    "limit_backend_unavailable",
    "the limit backend cannot be reached (limits.on_backend_error: deny)",
)


def rate_limited(limit: str, maximum: int, remaining: int, reset: float) -> ErrorResponse:
    """The 429 for a request over `limit`: Retry-After in whole seconds, and the
    x-ratelimit-* headers naming the limit (only ever on Fluxgate's own 429)."""
    body = _RATE_LIMITED_BODIES[limit]
    # A concurrency place frees when any running request ends: try again soon.
    seconds = 1 if limit == "concurrent" else max(1, math.ceil(reset))
    name = limit.encode()
    headers = (
        *error_headers(body),
        (b"retry-after", b"%d" % seconds),
        (b"x-ratelimit-limit-" + name, b"%d" % maximum),
        (b"x-ratelimit-remaining-" + name, b"%d" % remaining),
        (b"x-ratelimit-reset-" + name, b"%ds" % seconds),
    )
    return ErrorResponse(429, "rate_limited", LIMIT_MESSAGES[limit], "rate_limited", body,
                         headers, b"")  # fmt: skip
