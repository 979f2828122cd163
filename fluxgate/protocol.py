"""uvicorn's httptools protocol, hardened for a gateway (README "Request handling", steps 1–4).

uvicorn leaves several doors open that a proxy must close (docs/architecture.md, "Library traps"):
no deadline for a request head, no cap on its size, HTTP/1.0 and 0.9
accepted, CONNECT answered 400, Upgrade requests passed on, a missing or
doubled Host accepted, and the header list shared with later trailers. This
subclass answers each with a complete JSON error response and closes the
connection before the application ever sees the request. It also admits
connections against the server-wide limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final

import httptools
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .client_response import ResponseWriter
from .errors import (
    HEAD_TIMED_OUT,
    HEAD_TOO_LARGE,
    HTTP_11_ONLY,
    MALFORMED,
    METHOD_NOT_FORWARDED,
    NO_UPGRADE,
    NOT_A_PATH,
    ONE_HOST,
    ONLY_CHUNKED,
    OVER_CAPACITY,
    ErrorResponse,
)
from .exchange import CONNECTION_SCOPE_KEY, EXCHANGE_SCOPE_KEY, ClientLink, Exchange
from .limits import ConnectionGate
from .logs import TRACE, log_fields, loggable_target, request_log
from .metrics import WorkerMetrics

HEAD_TIMEOUT: Final = 15.0  # seconds from connection or message start to a full head
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_HEADERS: Final = 200
# Seconds the rest of a request body may take once the response has been sent
# (an early 401, 404, 504...): it is read and dropped, then the connection closes.
DISCARD_TIMEOUT: Final = 5.0
# The methods an HTTP API is called with. Anything else is refused (405) before
# authentication: TRACE would be forwarded with the provider key, and an
# upstream that reflects it would hand the key to the client; WebDAV and
# other methods have no use in front of an LLM API. CONNECT stays 501 (§4.2).
# Each as the parser gives it and as the exchange keeps it (decoded once, here).
FORWARDED_METHODS: Final = {
    m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")
}

log = logging.getLogger("fluxgate.protocol")


class _Rejected(Exception):
    """Stops the parser once a rejection response has been written."""


# The request headers `on_headers_complete` looks at: one set lookup passes over
# the others.
_SCANNED_HEADERS: Final = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade"}
)


def _codings(value: bytes) -> list[bytes]:
    """A Transfer-Encoding value's codings; empty list elements are allowed (RFC 9110 §5.6.1)."""
    return [coding for item in value.split(b",") if (coding := item.strip().lower())]


class _FlowControl(FlowControl):
    """uvicorn's flow control, whose asyncio.Event is made only when a write must
    wait for the client's socket buffer to drain. Every connection made one
    (and the 64-slot deque inside it); most never wait, and an open stream's
    chunks do not go through uvicorn's `send` (fluxgate.relay)."""

    _is_writable_event: asyncio.Event | None  # type: ignore[assignment]

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._is_writable_event = None

    async def drain(self) -> None:
        if self.write_paused:
            if self._is_writable_event is None:
                self._is_writable_event = asyncio.Event()
            await self._is_writable_event.wait()

    def pause_writing(self) -> None:
        if not self.write_paused:
            self.write_paused = True
            if self._is_writable_event is not None:
                self._is_writable_event.clear()

    def resume_writing(self) -> None:
        if self.write_paused:
            self.write_paused = False
            if self._is_writable_event is not None:
                self._is_writable_event.set()


class FluxgateProtocol(HttpToolsProtocol):
    # Slots for what this class adds: uvicorn's own attributes stay few enough
    # (30 at most) for CPython to keep each connection's __dict__ a compact
    # split table, about 1.3 KiB less per open connection than with these in it.
    __slots__ = (
        "_admitted", "_awaiting_head", "_discard_timer", "_head_bytes", "_head_size",
        "_head_timer", "_rejected", "gate", "link", "metrics",
    )  # fmt: skip

    def __init__(
        self,
        *args: Any,
        gate: ConnectionGate | None = None,
        metrics: WorkerMetrics | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.metrics = metrics  # counts the requests answered here, before the app
        self._admitted = False
        self._rejected = False
        # The relay sets its `on_lost` while an upstream exchange is open: called
        # once if the client goes away, so it is cancelled at once (fluxgate.exchange).
        self.link = ClientLink()
        self._awaiting_head = True
        self._head_bytes = 0  # raw bytes received while the head is incomplete
        self._head_size = 0  # bytes of request line and headers parsed so far
        self._head_timer: asyncio.TimerHandle | None = None
        self._discard_timer: asyncio.TimerHandle | None = None

    # Connection lifecycle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # In place of the one uvicorn has just made (its class cannot be chosen):
        # that one goes at once, with its Event, rather than living as long as the
        # connection.
        self.flow = _FlowControl(transport)
        # Over the limit, the connection is still read so that its request
        # gets a real 503 rather than a silent close.
        self._admitted = self.gate is None or self.gate.acquire()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        callback, self.link.on_lost = self.link.on_lost, None
        if callback is not None:
            callback()
        if self._admitted and self.gate is not None:
            self.gate.release()
            self._admitted = False
        self._cancel_head_timer()
        if self._discard_timer is not None:
            self._discard_timer.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.link.flow is not None:
            self.link.flow.pause()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.link.flow is not None:
            self.link.flow.resume()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        self._unset_keepalive_if_required()
        if self._awaiting_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # on_headers_complete has already refused it
        except httptools.HttpParserError as exc:
            if not self._rejected:
                self._reject(MALFORMED, warn=str(exc))
            return
        if self._awaiting_head and self._head_bytes > MAX_HEAD_BYTES:
            self._reject_head_too_large()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        # Answered before the request body ended (an error such as 401 or 504, or
        # an upstream that replied early). uvicorn reads and drops the rest with no
        # deadline, and those bytes cancel its keep-alive timer: a client trickling
        # a body, or idling once it is sent, would hold the connection and its
        # max_connections slot forever. Bound the rest.
        if (
            cycle is not None
            and cycle.response_complete
            and cycle.more_body
            and not self.transport.is_closing()
        ):
            self._discard_timer = self.loop.call_later(DISCARD_TIMEOUT, self._discard_ended)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        ex: Exchange | None = self.scope.get(EXCHANGE_SCOPE_KEY)  # type: ignore[assignment]
        if ex is not None and not self.cycle.more_body and not self.expect_100_continue:
            # Usually within the read that brought the head, before the app runs:
            # the forwarder then sends the body upstream in one piece.
            ex.body_arrived = True
        if self._discard_timer is not None:
            # The dropped body has ended in time: an idle keep-alive connection
            # again, which needs the keep-alive timer its bytes cancelled.
            self._discard_timer.cancel()
            self._discard_timer = None
            if not self.transport.is_closing():
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    def _discard_ended(self) -> None:
        self._discard_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    # Head deadline

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._rejected:
            return
        # Armed only at connection start and at a message's first byte, so a head
        # is always due here (`_head_bytes` does not count the bytes of the read
        # that began a keep-alive connection's next message: it cannot tell an
        # idle connection). Idle keep-alive connections are uvicorn's timer's job.
        self._reject(HEAD_TIMED_OUT, warn="request head timeout")

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._unset_keepalive_if_required()  # armed above if a dropped body just ended
        self._awaiting_head = True
        self._head_bytes = 0
        self._head_size = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_size += len(url)
        if self._head_size > MAX_HEAD_BYTES:
            raise self._reject_head_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD_BYTES or len(self.headers) > MAX_HEADERS:
            raise self._reject_head_too_large()

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._cancel_head_timer()
        parser = self.parser
        if not self._admitted:
            raise self._reject(OVER_CAPACITY, warn="connection limit reached")
        if parser.get_http_version() != "1.1":
            raise self._reject(HTTP_11_ONLY, warn="HTTP version other than 1.1")
        # One pass over the headers finds what this layer and the later steps
        # need: it runs for every request.
        hosts, upgrade, chunked, foreign_coding = 0, False, False, False
        length: int | None = None
        tokens: set[bytes] | None = None
        for name, value in self.headers:
            if name not in _SCANNED_HEADERS:
                continue
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                length = int(value) if value.isdigit() else None  # httptools refused others
            elif name == b"transfer-encoding":
                chunked = True
                foreign_coding = foreign_coding or _codings(value) != [b"chunked"]
            elif name == b"connection":
                tokens = (tokens or set()) | {t.strip().lower() for t in value.split(b",")}
            elif name == b"upgrade":
                upgrade = True
        method = parser.get_method()
        if method == b"CONNECT" or upgrade:
            raise self._reject(NO_UPGRADE, warn="CONNECT or protocol upgrade")
        method_name = FORWARDED_METHODS.get(method)
        if method_name is None:
            raise self._reject(METHOD_NOT_FORWARDED, warn="method not forwarded")
        if foreign_coding:
            # httptools accepts any list that ends in chunked ("gzip, chunked");
            # the other codings would be lost when aiohttp re-frames the body,
            # so the upstream would take gzip bytes for the body (RFC 9112 §6.1).
            raise self._reject(ONLY_CHUNKED, warn="transfer coding other than chunked")
        if not self.url.startswith(b"/"):
            raise self._reject(NOT_A_PATH, warn="absolute-form or asterisk request target")
        if hosts != 1:
            raise self._reject(ONE_HOST, warn="missing or repeated Host header")
        if chunked:  # uvicorn appends the body's trailers to this same list: a copy
            self.scope["headers"] = list(self.headers)
        self.scope[EXCHANGE_SCOPE_KEY] = Exchange(  # type: ignore[typeddict-unknown-key]
            method_name,
            self.url,
            length,
            chunked or bool(length),
            None if tokens is None else frozenset(tokens),
        )
        self.scope[CONNECTION_SCOPE_KEY] = self.link  # type: ignore[typeddict-unknown-key]
        super().on_headers_complete()
        cycle = self.cycle
        cycle.transport = ResponseWriter(self.transport, self.loop)  # type: ignore[assignment]
        if self.expect_100_continue:
            cycle.send = _closing_if_answered_before_continue(cycle)  # type: ignore[method-assign,assignment]

    # Rejections

    def _reject_head_too_large(self) -> _Rejected:
        return self._reject(HEAD_TOO_LARGE, warn="request head over the size limit")

    def _reject(self, response: ErrorResponse, warn: str | None = None) -> _Rejected:
        """Answer with a JSON error and close the connection.

        Returns the exception a parser callback raises to stop parsing.
        """
        self._rejected = True
        self._cancel_head_timer()
        client = self.client[0] if self.client else None
        url: bytes = getattr(self, "url", b"")
        if warn is not None:
            log_fields(
                log,
                logging.WARNING,
                "request rejected",
                client_ip=client,
                status=response.status,
                reason=warn,
            )
        if self.metrics is not None and self.metrics.recording:
            self.metrics.add(Exchange.rejected(response.status, response.outcome), 0.0)
        if request_log.isEnabledFor(TRACE):
            method = self.scope.get("method") if self.scope else None
            if method is None and self._awaiting_head is False:
                method = self.parser.get_method().decode("latin-1")
            log_fields(
                request_log,
                TRACE,
                "request",
                client_ip=client,
                method=method,
                request_url=loggable_target(url) if url else None,
                status=response.status,
                outcome=response.outcome,
                duration_ms=0,
            )
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            # An earlier, fully received request on this connection (pipelining)
            # is still being answered: an error written now would be read as
            # its response. Let it finish, then close (as uvicorn's shutdown does).
            cycle.keep_alive = False
        elif cycle is not None and cycle.response_started and cycle.more_body:
            # The fault is in this request's body, and its response has begun
            # (streaming) or is complete (the rest of the body is being dropped):
            # an error response now would land inside the body or be read as
            # the answer to the client's next request. Cut the connection.
            self.transport.close()
        elif not self.transport.is_closing():
            self.transport.write(response.wire)
            self.transport.close()
        return _Rejected()


def _closing_if_answered_before_continue(
    cycle: Any,
) -> Callable[[Any], Coroutine[Any, Any, None]]:
    """The cycle's `send`, closing the connection if the response begins before
    `100 Continue` was sent and the body has not been read to its end.

    The client may then never send the body (RFC 9110 §10.1.1 lets it wait for
    the 100), so the rest of the connection cannot be told apart from it:
    dropping "the rest of the body" (DISCARD_TIMEOUT) would swallow the
    client's next request instead. `Connection: close` tells the client so.
    Installed only for requests that carry the expectation.
    """
    send = cycle.send

    async def closing_send(message: Any) -> None:
        if not cycle.response_started and cycle.waiting_for_100_continue and cycle.more_body:
            cycle.keep_alive = False
        await send(message)

    closing_send.cycle = cycle  # type: ignore[attr-defined]  # for fluxgate.client_response
    return closing_send
