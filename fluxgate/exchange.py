"""The record of one request as it crosses a worker, and how its parts find it.

The protocol (fluxgate.protocol) makes an `Exchange` once a request head has
been read and accepted, filled with what its one scan of the headers found,
and hands it to the app in the ASGI scope under `EXCHANGE_SCOPE_KEY`. The app
(fluxgate.proxy) and the relay (fluxgate.forward) write what happened into
it; metrics (fluxgate.metrics) and the request line (fluxgate.logs) read it
when the request ends. Every one of them imports this module; none of them
imports the app.

A client that goes away is reported through its connection's `ClientLink`:
the relay sets the link's `on_lost` callback while an upstream exchange is
open, so that the exchange is cancelled at once, even while the upstream is
silent; and its `flow` while a response body is relayed, so that the
upstream is read no faster than the client takes the bytes. The scope
holds the link, never the protocol object itself: the protocol holds the
scope, and the pair would make every connection a reference cycle that
only a full garbage collection frees
(docs/architecture.md, "Garbage collection").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from .usage import Tap

# ASGI scope keys the protocol adds to the standard ones.
EXCHANGE_SCOPE_KEY: Final = "fluxgate.exchange"
CONNECTION_SCOPE_KEY: Final = "fluxgate.connection"

Scope = dict[str, Any]
OnLost = Callable[[], None]


class Flow(Protocol):
    """A body relay's side of the client's flow control (fluxgate.relay)."""

    def pause(self) -> None:
        """The client's socket buffer is full: read no more from the upstream."""

    def resume(self) -> None:
        """It has drained: read on."""


class ClientLink:
    """The client's connection as the relay sees it: one per connection."""

    __slots__ = ("flow", "on_lost")

    def __init__(self) -> None:
        self.on_lost: OnLost | None = None  # called once if the client goes away
        self.flow: Flow | None = None  # told while a body relay runs


class Exchange:
    """What one request was and what it did: for the relay, metrics and the log line."""

    __slots__ = (
        "attempts",
        "auth_error",
        "body_arrived",
        "client_gone",
        "connection_tokens",
        "finished",
        "has_body",
        "key_id",
        "limit",
        "limited",
        "method",
        "outcome",
        "provider_key",
        "request_bytes",
        "request_length",
        "response_bytes",
        "response_length",
        "response_started",
        "retried",
        "status",
        "target",
        "target_url",
        "timeout",
        "ttfb_ms",
        "upstream",
        "usage",
    )

    def __init__(
        self,
        method: str = "",
        target: bytes = b"",
        request_length: int | None = None,
        has_body: bool = False,
        connection_tokens: frozenset[bytes] | None = None,
    ) -> None:
        # The request, as the protocol's scan of its head found it.
        self.method = method
        self.target = target  # the request-target exactly as received
        self.request_length = request_length  # its Content-Length, if any
        self.has_body = has_body  # a Content-Length above 0, or chunked
        self.connection_tokens = connection_tokens  # what `Connection` names; None: no header
        # The whole body is parsed, and `receive` hands it over with nothing sent
        # to the client (no 100 Continue is due): set by fluxgate.protocol, read
        # when the forwarder opens the upstream exchange.
        self.body_arrived = False
        # What happened to it.
        self.status = 0
        self.outcome = "ok"
        self.key_id: str | None = None
        self.auth_error: str | None = None  # why authentication failed (fluxgate.auth)
        self.limit: str | None = None  # the limit a 429 of ours names (fluxgate.ratelimit)
        # Admitted under a policy: what ends it (limiter, bucket, policy), once.
        self.limited: tuple[Any, str, Any] | None = None
        self.upstream: str | None = None
        self.target_url: str | None = None
        self.provider_key: str | None = None  # the id of the last attempt's key
        self.attempts = 0  # sent upstream, failover included
        self.retried: list[str | None] | None = None  # key ids of attempts retried
        self.ttfb_ms: float | None = None
        self.request_bytes = 0
        self.response_bytes = 0
        self.response_started = False
        self.client_gone = False
        self.timeout: str | None = None  # which deadline passed: total, first_byte, idle
        self.finished = False
        self.response_length: int | None = None
        self.usage: Tap | None = None  # set when the upstream has `usage` on

    @classmethod
    def rejected(cls, status: int, outcome: str) -> Exchange:
        """A request the protocol layer answered before the app saw it."""
        ex = cls()
        ex.status, ex.outcome = status, outcome
        return ex
