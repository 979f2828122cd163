"""The upstream HTTP client: one aiohttp session per worker, configured as a pure relay.

A stock `ClientSession` adds headers, decompresses bodies, keeps cookies,
follows redirects and cuts requests after 300 s. Each of those would make the
proxy unfaithful (STACK-NOTES, aiohttp), so every one is switched off here,
and the mapping from client exceptions to the statuses of SPEC §4.10 lives
beside it.
"""

from __future__ import annotations

from typing import Any, Final

import aiohttp
from aiohttp import hdrs

from .errors import ProxyError

_SKIP_AUTO_HEADERS: Final = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class VerbatimRequest(aiohttp.ClientRequest):
    """A request that adds no `Content-Length: 0` the client did not send.

    aiohttp adds one to body-less POST/PUT/PATCH/DELETE requests; a request
    with neither length nor chunking already has an empty body (RFC 9112
    §6.3), so the header would only be something the client never said.
    """

    def update_body_from_data(self, body: Any, _stacklevel: int = 3) -> None:
        had_length = hdrs.CONTENT_LENGTH in self.headers
        super().update_body_from_data(body, _stacklevel + 1)
        if body is None and not had_length:
            self.headers.pop(hdrs.CONTENT_LENGTH, None)


def create_session() -> aiohttp.ClientSession:
    """The worker's one session; must be called with the worker's loop running."""
    connector = aiohttp.TCPConnector(
        limit=0,  # max_connections already bounds concurrency on the client side
        ttl_dns_cache=30,
        keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        # The deadline is enforced per exchange from request_timeout_ms,
        # which can change at every reload; the session must not add its own.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None),
        request_class=VerbatimRequest,
        trust_env=False,
    )


def upstream_failure(exc: BaseException) -> ProxyError:
    """The 502 that answers an upstream failure before any response byte arrived."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return ProxyError(
            502, "upstream_dns_error", "upstream host name did not resolve", "upstream_dns_error"
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return ProxyError(
            502,
            "upstream_tls_error",
            "TLS handshake with the upstream failed",
            "upstream_tls_error",
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ProxyError(
            502, "upstream_unreachable", "could not connect to the upstream", "upstream_unreachable"
        )
    if isinstance(exc, aiohttp.ClientResponseError):
        return ProxyError(
            502,
            "upstream_bad_response",
            "the upstream sent an invalid response",
            "upstream_bad_response",
        )
    return ProxyError(
        502,
        "upstream_connection_error",
        "the upstream closed the connection before responding",
        "upstream_connection_error",
    )


UPSTREAM_TIMEOUT: Final = ProxyError(
    504,
    "upstream_timeout",
    "the upstream did not answer within request_timeout_ms",
    "upstream_timeout",
)
