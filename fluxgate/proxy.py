"""The proxy: a raw ASGI application that handles one request as the README lists it.

README "Request handling": the protocol (fluxgate.protocol, which this app
requires) has already refused what HTTP itself forbids (steps 1–4) and hands
over an `Exchange` with what the request head said. Here, in order: Fluxgate's
own endpoints, the path check, authentication (5), routing (6), the policy
step (per-key limits, fluxgate.ratelimit), forwarding (7–11,
fluxgate.forward). Every refusal is a `ProxyError` around a prebuilt
response (fluxgate.errors). When the request ends, its
metrics and its log line are queued from the Exchange.

`ProxyApp.config` is the only mutable attribute: the worker replaces it with
a new immutable `Config` on reload, and each request reads it once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from .auth import AuthError, authenticate
from .config import Config, Principal, Upstream, default_config
from .endpoints import OwnEndpoints, is_reserved
from .errors import (
    DOT_SEGMENT,
    LIMIT_BACKEND_DOWN,
    NOT_FOUND,
    ErrorResponse,
    ProxyError,
    StreamAborted,
    rate_limited,
)
from .exchange import EXCHANGE_SCOPE_KEY, Exchange, Scope
from .forward import Forwarder
from .logs import TRACE, RequestLog, request_fields, request_log, request_text, request_values
from .metrics import WorkerMetrics
from .ratelimit import (
    BackendHealth,
    LimitBackendError,
    Limiter,
    LimitSettings,
    Refusal,
    Tokens,
    tokens_used,
)
from .routing import has_dot_segment, match
from .upstream import UpstreamClient


class ProxyApp:
    def __init__(
        self,
        config: Config | None = None,
        make_limiter: Callable[[LimitSettings], Limiter] | None = None,
    ) -> None:
        self.config = config or default_config()
        # Per-key limits: the worker says how to make a backend's limiter.
        self.make_limiter = make_limiter
        self.limiters: dict[LimitSettings, Limiter] = {}
        self.last_limiter: tuple[LimitSettings, Limiter] | None = None  # no hashing per request
        self.health = BackendHealth()
        self.metrics = WorkerMetrics()
        self.endpoints = OwnEndpoints(self.metrics)
        self.request_log = RequestLog(request_fields, render_text=request_text)
        self.forwarder: Forwarder | None = None  # made at lifespan startup, in the loop

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                loop = asyncio.get_running_loop()
                self.forwarder = Forwarder(UpstreamClient(), loop, self.metrics)
                logging.getLogger("uvicorn.error").addFilter(_not_stream_aborted)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.request_log.flush()
                self.metrics.flush()
                if self.forwarder is not None:
                    await self.forwarder.client.close()
                for limiter in self.limiters.values():
                    await limiter.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        # One request, in this one coroutine: its frame is held for as long as
        # the response streams, and there are thousands of those.
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        started = time.monotonic()
        config = self.config
        ex: Exchange = scope[EXCHANGE_SCOPE_KEY]
        path = ex.target.partition(b"?")[0]
        try:
            if is_reserved(path):
                await self.endpoints.serve(config, path, send, ex)
                return
            if has_dot_segment(path):
                raise ProxyError(DOT_SEGMENT)
            principal = self.authenticate(config, scope, ex)
            upstream = self.route(principal, path)
            if principal.policy is not None:
                limiter = self.limiter(config.limits)
                if limiter.immediate:  # the local backend: nothing to wait for
                    self.admit(config, principal, ex, limiter)
                else:
                    await self.admit_later(config, principal, ex, limiter)
            assert self.forwarder is not None, "lifespan startup makes it"
            await self.forwarder.forward(upstream, scope, receive, send, ex)
        except ProxyError as err:
            await self.refuse(err.response, send, ex)
        finally:
            if ex.limited is not None:
                self.end_policy(config, ex)
            self.record(config, scope, ex, time.monotonic() - started)

    def authenticate(self, config: Config, scope: Scope, ex: Exchange) -> Principal:
        try:
            principal = authenticate(config, scope["headers"])
        except AuthError as exc:
            ex.auth_error = exc.reason
            raise
        ex.key_id = principal.key_id
        return principal

    def route(self, principal: Principal, path: bytes) -> Upstream:
        upstream = match(principal.routes, path)
        if upstream is None:
            raise ProxyError(NOT_FOUND)
        return upstream

    def admit(self, config: Config, principal: Principal, ex: Exchange, limiter: Limiter) -> None:
        """The key's limits (fluxgate.ratelimit), before anything is forwarded,
        by a limiter that answers at once.

        Provider-key choice is the forwarder's (fluxgate.keypool), per attempt.
        """
        assert principal.policy is not None
        try:
            refusal = limiter.admit_now(principal.bucket, principal.policy)
        except LimitBackendError as exc:
            self.unanswered(config.limits, exc)
        else:
            self.admitted(config.limits, principal, ex, limiter, refusal)

    async def admit_later(
        self, config: Config, principal: Principal, ex: Exchange, limiter: Limiter
    ) -> None:
        """`admit`, by a limiter that asks over the network (Redis)."""
        assert principal.policy is not None
        try:
            refusal = await limiter.admit(principal.bucket, principal.policy)
        except LimitBackendError as exc:
            self.unanswered(config.limits, exc)
        else:
            self.admitted(config.limits, principal, ex, limiter, refusal)

    def unanswered(self, settings: LimitSettings, exc: LimitBackendError) -> None:
        """The backend could not tell: `on_backend_error` decides."""
        self.backend_failed(settings, exc)
        if settings.on_backend_error == "deny":
            raise ProxyError(LIMIT_BACKEND_DOWN) from None

    def admitted(
        self,
        settings: LimitSettings,
        principal: Principal,
        ex: Exchange,
        limiter: Limiter,
        refusal: Refusal | None,
    ) -> None:
        if self.health.down:
            self.health.answered(settings.backend)
        if refusal is not None:
            ex.limit = refusal.limit
            response = rate_limited(
                refusal.limit, refusal.maximum, refusal.remaining, refusal.reset
            )
            raise ProxyError(response)
        ex.limited = (limiter, principal.bucket, principal.policy)

    def end_policy(self, config: Config, ex: Exchange) -> None:
        """Give the request's concurrency place back and charge the tokens it used
        (in the background: the request has nothing left to wait for)."""
        assert ex.limited is not None
        limiter, bucket, policy = ex.limited
        ex.limited = None
        tokens: Tokens = 0
        # Parsing the usage takes time: only for a policy that counts tokens, and
        # when the limiter charges them (with other requests'), not here.
        if ex.usage is not None and (policy.tokens_per_minute or policy.tokens_per_day):
            tokens = partial(tokens_used, ex.usage)
        limiter.finish_soon(bucket, policy, tokens, self.finish_failed)

    def limiter(self, settings: LimitSettings) -> Limiter:
        """This worker's limiter for the configured backend (a reload may change it)."""
        last = self.last_limiter
        if last is not None and last[0] is settings:
            return last[1]
        limiter = self.limiters.get(settings)
        if limiter is None:
            if self.make_limiter is None:
                raise LimitBackendError("no limit backend in this process")
            limiter = self.limiters[settings] = self.make_limiter(settings)
        self.last_limiter = (settings, limiter)
        return limiter

    def backend_failed(self, settings: LimitSettings, exc: BaseException) -> None:
        self.health.failed(settings.backend, exc, settings.on_backend_error)
        self.metrics.limit_backend_error()

    def finish_failed(self, exc: BaseException) -> None:
        self.backend_failed(self.config.limits, exc)

    async def refuse(self, response: ErrorResponse, send: Any, ex: Exchange) -> None:
        ex.status, ex.outcome = response.status, response.outcome
        if ex.client_gone:
            return
        await send(
            {"type": "http.response.start", "status": response.status, "headers": response.headers}
        )
        await send({"type": "http.response.body", "body": response.body})
        ex.response_bytes = ex.response_length = len(response.body)

    def record(self, config: Config, scope: Scope, ex: Exchange, duration: float) -> None:
        """Queue the request's metrics and log line (both written in batches)."""
        if config.server.metrics:
            self.metrics.add(ex, duration)
        if request_log.isEnabledFor(TRACE):
            client = scope.get("client")
            client_ip = client[0] if client else None
            if config.server.trusted_proxies:  # behind nginx: the client X-Forwarded-For names
                client_ip = config.server.trusted_proxies.client_ip(client_ip, scope["headers"])
            self.request_log.add(request_values(ex, client_ip, duration))


def _not_stream_aborted(record: logging.LogRecord) -> bool:
    """Keep uvicorn from logging a cut stream as an application crash.

    uvicorn logs every exception out of the app at ERROR with a traceback.
    `StreamAborted` is our deliberate way to make it close the connection, and
    the request log line already records why (its outcome).
    """
    return not (record.exc_info and isinstance(record.exc_info[1], StreamAborted))
