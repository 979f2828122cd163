"""The configuration model: frozen dataclasses built once from a validated document.

`fluxgate.validation` decides whether a parsed YAML document is acceptable;
this module turns an accepted document into a `Config` whose lookup tables
(static keys by digest, JWT keys by id, routes ordered for longest-prefix
matching) are computed here, once, so the request path only reads them.
A worker swaps one `Config` object for another; nothing in it is mutated.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from yarl import URL

from .forwarded import TrustedProxies, parse_networks
from .headers import drop_headers
from .ratelimit import POLICY_LIMITS, LimitSettings, Policy
from .tls import upstream_ssl

DEFAULT_BIND_ADDRESS = "0.0.0.0:8080"
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_REQUEST_TIMEOUT_MS = 120_000
DEFAULT_AUTH_HEADER = "authorization"
DEFAULT_METRICS = True
DEFAULT_USAGE = "off"
DEFAULT_CONNECT_TIMEOUT_MS = 10_000
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RETRY_ON = (401, 403, 429, 502, 503, 504)
DEFAULT_RETRY_BODY_LIMIT = 1 << 20
DEFAULT_RETRY_BACKOFF_MS = 100
DEFAULT_KEY_WEIGHT = 1

# Keys of the `upstreams:` mapping that are settings, not upstream names: the
# deadlines every upstream takes unless it sets its own.
TIMEOUT_SETTINGS = (
    "request_timeout_ms",
    "connect_timeout_ms",
    "first_byte_timeout_ms",
    "idle_timeout_ms",
)
UPSTREAM_SETTINGS = frozenset(TIMEOUT_SETTINGS)

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class ServerSettings:
    bind_address: str
    host: str
    port: int
    max_connections: int
    workers: int | None
    # Prometheus metrics (fluxgate.metrics): recorded and served when true;
    # served by the master on `metrics_address` instead of the main listener
    # when that is set.
    metrics: bool = True
    metrics_address: str | None = None
    # Proxies whose X-Forwarded-For names the client for the log (fluxgate.forwarded).
    trusted_proxies: TrustedProxies = field(default_factory=lambda: TrustedProxies(()))
    # How long SIGTERM and a retiring worker wait for requests in flight;
    # build_config sets it (its default is upstreams.request_timeout_ms).
    shutdown_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS


@dataclass(frozen=True, slots=True)
class ProviderKey:
    """One of an upstream's provider keys, as its pool uses it (fluxgate.keypool)."""

    id: str | None  # what logs and metrics show; None for a lone `api_key`
    weight: int
    credential: tuple[str, str] = field(repr=False)  # the header set upstream


@dataclass(frozen=True, slots=True)
class Timeouts:
    """An upstream's deadlines, in seconds (README "Upstream resilience")."""

    request: float  # the whole exchange
    connect: float  # TCP and TLS
    first_byte: float  # until the response head: the provider's time to first token
    idle: float | None  # longest silence between two body chunks; None = off


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    request_path: str
    target_url: str
    auth_header: str
    # Provider keys, in order; empty for a provider that needs none.
    keys: tuple[ProviderKey, ...]
    timeouts: Timeouts
    # Failover to the next key (fluxgate.forward): how many attempts at most, on
    # which statuses, for bodies up to how many bytes, waiting how long between.
    max_attempts: int
    retry_on: frozenset[int]
    retry_body_limit: int
    retry_backoff: float
    # Precomputed for the request path:
    prefix: bytes  # request_path without a trailing "/" ("" for "/"), matched on raw bytes
    origin: str  # scheme://host[:port], port only when non-default
    origin_url: URL  # the same, parsed once for the HTTP client
    base_path: bytes  # target_url path without its trailing "/"
    host_item: tuple[str, str]  # ("host", authority): port only when non-default
    # Client request headers never forwarded to this upstream (see fluxgate.headers).
    drop_headers: frozenset[bytes]
    usage: str | None = None  # token usage format read from responses; None = off
    # aiohttp's `ssl=` (fluxgate.tls.upstream_ssl): True = default verification,
    # False = none, else this upstream's own context (CA, client certificate),
    # built once per config generation. Not compared: a context has no value equality.
    tls: ssl.SSLContext | bool = field(default=True, repr=False, compare=False)
    # `set_headers` as (name as written, value) pairs, sent on every request;
    # their lower-case names are in drop_headers. Values may be secrets.
    set_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a credential is: its id for logs, the routes it may use, and the
    bucket its requests count in under its limits policy (fluxgate.ratelimit)."""

    key_id: str | None
    routes: tuple[Upstream, ...]  # longest prefix first
    policy: Policy | None = None
    bucket: str = ""  # "static:ID", "jwt:KID", or "jwt:KID:sub:SUBJECT" per token
    limit_by_sub: bool = False  # a JWT key whose tokens count per subject


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerSettings
    request_timeout_ms: int
    upstreams: tuple[Upstream, ...]
    # sha256(key) -> Principal: a hash lookup, so no byte-by-byte comparison
    # of the presented token against a secret can leak timing.
    static_keys: Mapping[bytes, Principal] = field(repr=False)
    jwt_keys: Mapping[str, bytes] = field(repr=False)  # kid -> HS256 secret
    jwt_principals: Mapping[str, Principal] = field(repr=False)  # kid -> Principal
    generation: int = 0
    # Running on the safe defaults: no valid file has been applied yet (health: 503).
    safe_defaults: bool = False
    limits: LimitSettings = field(default_factory=LimitSettings)
    policies: Mapping[str, Policy] = field(default_factory=dict, repr=False)
    # JWTs verified under this config: token -> (principal, valid from, valid
    # until). The one part that fills as requests come (fluxgate.auth); it goes
    # with the config, so a reload (new keys) starts it empty.
    verified_jwts: dict[bytes, tuple[Principal, float, float]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def has_credentials(self) -> bool:
        return bool(self.static_keys or self.jwt_keys)


def key_digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def split_bind_address(value: str) -> tuple[str, int]:
    """Split "host:port" / "[v6]:port"; raises ValueError when malformed."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError("IPv6 addresses take the form [addr]:port")
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("expected host:port with a port from 1 to 65535")
    return host, int(port)


def _build_upstream(name: str, doc: Mapping[str, Any], defaults: Mapping[str, Any]) -> Upstream:
    target_url: str = doc["target_url"]
    parts = urlsplit(target_url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    host_text = f"[{host}]" if ":" in host else host
    port = parts.port
    default_port = _DEFAULT_PORTS[scheme]
    authority = host_text if port in (None, default_port) else f"{host_text}:{port}"
    auth_header: str = doc.get("auth_header", DEFAULT_AUTH_HEADER).lower()
    request_path: str = doc["request_path"]
    # YAML 1.1 reads an unquoted `off` as false: both mean off.
    usage = doc.get("usage", DEFAULT_USAGE)
    set_headers = tuple((str(n), str(v)) for n, v in (doc.get("set_headers") or {}).items())
    return Upstream(
        name=name,
        request_path=request_path,
        target_url=target_url,
        auth_header=auth_header,
        keys=_provider_keys(doc, auth_header),
        timeouts=_timeouts(doc, defaults),
        max_attempts=doc.get("max_attempts", DEFAULT_MAX_ATTEMPTS),
        retry_on=frozenset(doc.get("retry_on", DEFAULT_RETRY_ON)),
        retry_body_limit=doc.get("retry_body_limit", DEFAULT_RETRY_BODY_LIMIT),
        retry_backoff=doc.get("retry_backoff_ms", DEFAULT_RETRY_BACKOFF_MS) / 1000,
        prefix=request_path.rstrip("/").encode(),
        origin=f"{scheme}://{authority}",
        origin_url=URL(f"{scheme}://{authority}", encoded=True),
        base_path=parts.path.rstrip("/").encode(),
        host_item=("host", authority if host.isascii() else authority.encode("idna").decode()),
        drop_headers=drop_headers(
            auth_header.encode(), [name.lower().encode() for name, _ in set_headers]
        ),
        usage=None if usage in (False, "off") else usage,
        tls=upstream_ssl(doc.get("tls")),
        set_headers=set_headers,
    )


def _provider_keys(doc: Mapping[str, Any], auth_header: str) -> tuple[ProviderKey, ...]:
    def credential(secret: str) -> tuple[str, str]:
        return (auth_header, f"Bearer {secret}" if auth_header == "authorization" else secret)

    if "api_key" in doc:
        return (ProviderKey(None, DEFAULT_KEY_WEIGHT, credential(doc["api_key"])),)
    return tuple(
        ProviderKey(entry["id"], entry.get("weight", DEFAULT_KEY_WEIGHT), credential(entry["key"]))
        for entry in doc.get("api_keys") or ()
    )


def _timeouts(doc: Mapping[str, Any], defaults: Mapping[str, Any]) -> Timeouts:
    def ms(name: str, default: int | None) -> int | None:
        value: int | None = doc.get(name, defaults.get(name, default))
        return value

    request = ms("request_timeout_ms", DEFAULT_REQUEST_TIMEOUT_MS)
    assert request is not None
    connect = ms("connect_timeout_ms", DEFAULT_CONNECT_TIMEOUT_MS)
    first_byte = ms("first_byte_timeout_ms", request)
    idle = ms("idle_timeout_ms", None)
    return Timeouts(
        request=request / 1000,
        connect=(connect or DEFAULT_CONNECT_TIMEOUT_MS) / 1000,
        first_byte=(first_byte or request) / 1000,
        idle=None if idle is None else idle / 1000,
    )


def _request_timeout_ms(doc: Mapping[str, Any]) -> int:
    upstreams_doc = doc.get("upstreams") or {}
    timeout: int = upstreams_doc.get("request_timeout_ms", DEFAULT_REQUEST_TIMEOUT_MS)
    return timeout


def _by_longest_prefix(upstreams: tuple[Upstream, ...]) -> tuple[Upstream, ...]:
    return tuple(sorted(upstreams, key=lambda u: len(u.prefix), reverse=True))


def build_config(doc: Mapping[str, Any], generation: int = 0) -> Config:
    """Build a `Config` from a document that `fluxgate.validation` accepted."""
    server_doc = doc.get("server") or {}
    bind_address = server_doc.get("bind_address", DEFAULT_BIND_ADDRESS)
    host, port = split_bind_address(bind_address)
    server = ServerSettings(
        bind_address=bind_address,
        host=host,
        port=port,
        max_connections=server_doc.get("max_connections", DEFAULT_MAX_CONNECTIONS),
        workers=server_doc.get("workers"),
        metrics=server_doc.get("metrics", DEFAULT_METRICS),
        metrics_address=server_doc.get("metrics_address"),
        trusted_proxies=TrustedProxies(parse_networks(server_doc.get("trusted_proxies") or ())),
        shutdown_timeout_ms=server_doc.get("shutdown_timeout_ms", _request_timeout_ms(doc)),
    )
    upstreams_doc = doc.get("upstreams") or {}
    upstreams = tuple(
        _build_upstream(name, spec, upstreams_doc)
        for name, spec in upstreams_doc.items()
        if name not in UPSTREAM_SETTINGS
    )
    by_name = {u.name: u for u in upstreams}
    all_routes = _by_longest_prefix(upstreams)

    keys_doc = doc.get("api_keys") or {}
    static_keys: dict[bytes, Principal] = {}
    limits_doc = doc.get("limits") or {}
    policies = {
        name: Policy(name, **{k: spec.get(k) for k in POLICY_LIMITS})
        for name, spec in (limits_doc.get("policies") or {}).items()
    }
    for entry in keys_doc.get("static") or ():
        allowed = entry.get("upstreams") or ()
        routes = _by_longest_prefix(tuple(by_name[n] for n in allowed)) if allowed else all_routes
        policy = policies.get(entry.get("limits") or "")
        static_keys[key_digest(entry["key"].encode())] = Principal(
            entry.get("id"), routes, policy, f"static:{entry.get('id')}"
        )
    jwt_keys: dict[str, bytes] = {}
    jwt_principals: dict[str, Principal] = {}
    for entry in keys_doc.get("jwt") or ():
        jwt_keys[entry["id"]] = entry["key"].encode()
        policy = policies.get(entry.get("limits") or "")
        by_sub = entry.get("limit_by", "kid") == "sub"
        jwt_principals[entry["id"]] = Principal(
            entry["id"], all_routes, policy, f"jwt:{entry['id']}", by_sub
        )

    return Config(
        server=server,
        request_timeout_ms=upstreams_doc.get("request_timeout_ms", DEFAULT_REQUEST_TIMEOUT_MS),
        upstreams=upstreams,
        static_keys=MappingProxyType(static_keys),
        jwt_keys=MappingProxyType(jwt_keys),
        jwt_principals=MappingProxyType(jwt_principals),
        generation=generation,
        safe_defaults=bool(doc.get(SAFE_DEFAULTS_KEY)),
        limits=LimitSettings(
            backend=limits_doc.get("backend", "local"),
            redis_url=limits_doc.get("redis_url"),
            on_backend_error=limits_doc.get("on_backend_error", "allow"),
        ),
        policies=MappingProxyType(policies),
    )


# Marks the safe defaults' document (a key no valid file can have: validation
# refuses unknown keys), so that a worker knows it has nothing to serve yet.
SAFE_DEFAULTS_KEY = "_safe_defaults"
DEFAULT_DOC: Mapping[str, Any] = MappingProxyType({"version": 1, SAFE_DEFAULTS_KEY: True})


def default_config(generation: int = 0) -> Config:
    """The safe defaults used when the file is missing or invalid at start."""
    return build_config(DEFAULT_DOC, generation)
