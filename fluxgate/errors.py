"""Error responses: one small JSON body shape for every status Fluxgate produces itself.

Bodies are precomputed per (status, type, message) where the message is a
constant, so the hot path of a rejection only looks them up. Messages never
carry request data or secrets: they say what went wrong, not with what.
"""

from __future__ import annotations

import http
import json
from typing import Final

JSON_CONTENT_TYPE: Final = b"application/json"


def error_body(error_type: str, message: str) -> bytes:
    return json.dumps({"error": {"type": error_type, "message": message}}).encode()


def error_headers(body: bytes, close: bool = False) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", JSON_CONTENT_TYPE),
        (b"content-length", str(len(body)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    return headers


def raw_error_response(
    status: int, error_type: str, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with `extra` headers.

    Used by the protocol layer, which answers before any ASGI cycle exists.
    """
    body = error_body(error_type, message)
    reason = http.HTTPStatus(status).phrase
    head = [f"HTTP/1.1 {status} {reason}".encode()]
    head += [name + b": " + value for name, value in error_headers(body, close=True)]
    head += [name + b": " + value for name, value in extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class ProxyError(Exception):
    """A failure the proxy answers with its own status and JSON error body."""

    def __init__(self, status: int, error_type: str, message: str, outcome: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.outcome = outcome


class StreamAborted(Exception):
    """The response had started when the exchange failed: the client connection is cut.

    Raised out of the ASGI app on purpose so that uvicorn closes the
    transport instead of completing a truncated body as if it were whole.
    """
